"""Our GPTQ GGUF (Q4_0 / Q4_1 / Q4_K_M / Q3_K_M) against llama.cpp's own quantiser (the same types) on the same model.

  python benchmarks/gguf_vs_llamacpp.py [--model DIR] [--work out/bench-gguf] [--runs 5] [--rounds 3] [--no-speed]

Steps: GPTQ w4 g32 sym + asym checkpoints and GPTQ + RTN checkpoints on llama.cpp's q4_k_m / q3_k_m mixes (reused from
--work when made with the same model and settings; --fresh redoes them), their GGUF exports, an F16 GGUF of the
unquantised model, and llama.cpp's quantisations of that F16 file (no imatrix: llama_model_quantize takes one only as
a C++ map).
llama.cpp keeps the (tied) token embedding in F16 like ours (--llama-embedding default: its own choice, Q6_K), so
only the decoder Linears differ. Every GGUF is scored through llama.cpp against the F16 GGUF (llama-perplexity
convention, ctx 512, bundled held-out text) and against our torch forward, then timed with `bench.run.measure` in
interleaved rounds so that the ratios compare figures taken side by side. Table on stdout, JSON in --work.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import gguf
import llama_cpp
from rich.console import Console
from rich.table import Table

from minicpm_edge import evaluation
from minicpm_edge.bench import roofline
from minicpm_edge.bench.run import measure
from minicpm_edge.errors import UserError
from minicpm_edge.export.ios import export_ios
from minicpm_edge.model import Tokenizer
from minicpm_edge.quant.driver import QuantOptions, quantize_checkpoint
from minicpm_edge.quant.grid import QuantSpec
from minicpm_edge.runtimes import open_runner

MODEL = Path(__file__).resolve().parents[1] / "minicpm_edge" / "assets" / "minicpm-tiny"
LLAMA_TYPES = {"Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "Q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1,
               "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "Q3_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_M}
MIXES = {"Q4_K_M": "q4_k_m", "Q3_K_M": "q3_k_m"}  # ours on llama.cpp's mixes (quantize --format)
PAIRS = (("ours-Q4_K_M", "llama-Q4_K_M"), ("ours-Q3_K_M", "llama-Q3_K_M"), ("ours-Q4_K_M", "rtn-Q4_K_M"),
         ("ours-Q3_K_M", "rtn-Q3_K_M"))  # (ours, peer): paired per position like HEADS
HEADS = ("ours-Q4_0", "llama-Q4_0", "llama-Q4_K_M")  # compared with each other, position by position
LINEAR = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
console = Console(width=170)


class Cached:
    """A runner whose logits are kept per window, so each GGUF runs every window once across all comparisons."""

    def __init__(self, runner):
        self.runner, self.cache = runner, {}
        self.name, self.threads, self.vocab_size = runner.name, runner.threads, runner.vocab_size

    def logits(self, ids):
        key = tuple(ids)
        if key not in self.cache:
            self.cache[key] = self.runner.logits(ids)
        return self.cache[key]


@contextlib.contextmanager
def output_to(path: Path):
    """Send what C code prints (llama.cpp's quantiser log) to a file."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "a") as f:
        for fd in (1, 2):
            os.dup2(f.fileno(), fd)
        try:
            yield
        finally:
            for fd, s in zip((1, 2), saved):
                os.dup2(s, fd)
                os.close(s)


def gptq(model: Path, work: Path, sym: bool, nsamples: int, seqlen: int, fresh: bool, fmt: str | None = None,
         method: str = "gptq") -> Path:
    """GPTQ w4 g32 (sym or asym), or `method` on the llama.cpp mix `fmt`; reused from `work` when made alike."""
    grid = fmt or f"w4g32-{'sym' if sym else 'asym'}"
    out = work / f"{model.name}-{method}-{grid}"
    rep = out / "quant_report.json"
    if not fresh and rep.is_file():
        r = json.loads(rep.read_text())
        if (Path(r["model"]).resolve() == model.resolve() and r["sym"] == sym and r["method"] == method
                and r.get("format", "gptq") == (fmt or "gptq")
                and r["calibration"]["nsamples"] == nsamples and r["calibration"]["seqlen"] == seqlen):
            return out
    t = time.time()
    quantize_checkpoint(model, out, QuantOptions(spec=QuantSpec(4, 32, sym), nsamples=nsamples, seqlen=seqlen,
                                                 format=fmt, method=method), force=True)
    console.print(f"{method} {grid}: {time.time() - t:.0f} s")
    return out


def gguf_of(src: Path, out: Path, **kw) -> Path:
    return next(export_ios(src, out, force=True, **kw).glob("*.gguf"))


def llama_quantize(f16: Path, out: Path, kind: str, keep_embedding: bool) -> Path:
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.nthread = LLAMA_TYPES[kind], 2
    if keep_embedding:  # tied model: token_embd is also the head, so both fields
        p.token_embedding_type = p.output_tensor_type = llama_cpp.GGML_TYPE_F16
    with output_to(out.parent / "llama-quantize.log"):
        rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), p)
    if rc:
        raise SystemExit(f"llama_model_quantize {kind} failed ({rc}); see {out.parent / 'llama-quantize.log'}")
    return out


def tensor_info(path: Path) -> dict:
    """Types actually stored (linear layers / embedding), MiB and bits per weight of the linear layers."""
    r = gguf.GGUFReader(path)
    lin = [t for t in r.tensors if t.name.split(".")[-2] in LINEAR]
    types = {t.name: t.tensor_type.name for t in r.tensors}
    return {"linear_types": dict(Counter(t.tensor_type.name for t in lin)),
            "embedding_type": types["token_embd.weight"], "output_type": types.get("output.weight", "tied"),
            "types": types, "mib": path.stat().st_size / 2**20,
            "linear_bpw": 8 * sum(int(t.n_bytes) for t in lin) / sum(int(t.n_elements) for t in lin)}


def quality(files: dict, model: Path, tokens, bos: int, max_chunks, use_torch: bool, threads: int) -> dict:
    """Every file against the F16 GGUF (and our torch forward); our Q4_0 against llama.cpp's Q4_0 and Q4_K_M."""
    runners = {k: Cached(open_runner(p, threads=threads, n_ctx=512)) for k, p in files.items()}
    torch_ref = open_runner(model, threads=threads) if use_torch else None  # cheap: not cached
    cmp = lambda ref, quant: evaluation.compare(ref, quant, tokens, 512, "llama", bos, max_chunks)
    out, heads = {}, {}
    for k, r in runners.items():
        t = time.time()
        out[k] = cmp(runners["F16"], r)
        if torch_ref:
            out[k]["vs_torch"] = cmp(torch_ref, r)
        if k in HEADS[1:]:  # paired per position: llama.cpp's file as 'ref', our Q4_0 as 'quant'
            heads[k] = {x: cmp(r, runners[HEADS[0]])[x] for x in ("drift", "drift_se")}
        for ours, peer in PAIRS:
            if k == peer and ours in runners:
                heads[f"{ours} vs {peer}"] = {x: cmp(r, runners[ours])[x] for x in ("drift", "drift_se")}
        if k not in ("F16", HEADS[0]) and k not in {o for o, _ in PAIRS}:
            r.cache.clear()  # ~8 MiB of logits per window
        console.print(f"  {k}: PPL {out[k]['quant']['ppl']:.3f}, KL {out[k]['kl_mean']:.5f} ({time.time() - t:.0f} s)")
    for rep in out.values():
        rep.pop("chunk_ppl")
        rep.get("vs_torch", {}).pop("chunk_ppl", None)
    return {"rows": out, "head_to_head": heads}


def speed(files: dict, runs: int, rounds: int, bandwidth: float, threads: int) -> dict:
    """measure() every file once per round, pairs side by side, order reversed every other round (ABBA), so that
    slow spells of the shared CPU hit the files of a pair alike."""
    order = [k for k in ("ours-Q4_0", "llama-Q4_0", "ours-Q4_1", "llama-Q4_1", "ours-Q4_K_M", "llama-Q4_K_M",
                         "ours-Q3_K_M", "llama-Q3_K_M", "F16") if k in files]
    runners = {k: open_runner(files[k], threads=threads, n_ctx=512) for k in order}
    per = {k: [] for k in order}
    for i in range(rounds):
        for k, r in (list(runners.items()) if i % 2 == 0 else reversed(runners.items())):
            try:
                s = measure(r, n_prompt=128, n_gen=64, runs=runs, artifact=files[k], bandwidth_gbs=bandwidth)
            except UserError as e:  # every run's decode lost in timing noise: this round has no figure
                console.print(f"  {k}: {e}")
                s = {"decode": {"tokens_per_s": float("nan")}, "prefill": {"tokens_per_s": float("nan")}}
            s.pop("rows", None)
            per[k].append(s)
    med = lambda xs: statistics.median([x for x in xs if x == x] or [float("nan")])
    out = {k: {"decode": med([s["decode"]["tokens_per_s"] for s in ss]),
               "prefill": med([s["prefill"]["tokens_per_s"] for s in ss]),
               "decode_bound": roofline.decode_bound(bandwidth, roofline.bytes_per_token(files[k])["bytes_per_token"]),
               "rounds": ss} for k, ss in per.items()}
    ratios = [a["decode"]["tokens_per_s"] / b["decode"]["tokens_per_s"] for a, b in zip(per["ours-Q4_0"], per["llama-Q4_0"])]
    return {"rows": out, "decode_ratio_ours_llama_q4_0": med(ratios), "decode_ratio_rounds": ratios}


def report(files, info, q, s, torch_ppl) -> None:
    nan = {"decode": float("nan"), "prefill": float("nan"), "decode_bound": float("nan")}
    s = s or {"rows": {}, "decode_ratio_ours_llama_q4_0": float("nan"), "decode_ratio_rounds": []}
    qt = Table(title="Quality through llama.cpp (llama-perplexity convention, ctx 512); reference: F16 GGUF")
    st = Table(title="Speed through llama.cpp (bench.run.measure, pp128 / tg64, median of rounds)")
    for t, cols in ((qt, ("file", "linear types", "embd", "MiB", "bpw lin", "PPL ref", "PPL", "drift ±se",
                          "KL vs F16", "KL vs torch", "top-1")),
                    (st, ("file", "decode t/s", "prefill t/s", "roofline t/s", "meas/roof"))):
        for c in cols:
            t.add_column(c, justify="left" if c in ("file", "linear types", "embd") else "right")
    for k in files:
        r, i, sp = q["rows"][k], info[k], s["rows"].get(k, nan)
        kt = r.get("vs_torch", {}).get("kl_mean")
        qt.add_row(k, " ".join(f"{n}x{ty}" for ty, n in i["linear_types"].items()), i["embedding_type"],
                   f"{i['mib']:.2f}", f"{i['linear_bpw']:.2f}", f"{r['ref']['ppl']:.3f}", f"{r['quant']['ppl']:.3f}",
                   f"{r['drift']:+.2%} ±{r['drift_se']:.2%}", f"{r['kl_mean']:.3g}",
                   "-" if kt is None else f"{kt:.3g}", f"{r['top1']:.4f}")
        st.add_row(k, f"{sp['decode']:.0f}", f"{sp['prefill']:.0f}", f"{sp['decode_bound']:.0f}",
                   f"{sp['decode'] / sp['decode_bound']:.1%}")
    console.print(qt, *([st] if s["rows"] else []))
    for k in files:  # where llama.cpp's mixes (or fallbacks) put other types than the file's main one
        types = {n: ty for n, ty in info[k]["types"].items() if n.split(".")[-2] in LINEAR}
        main_type = Counter(types.values()).most_common(1)[0][0]
        if len(set(types.values())) > 1:
            console.print(f"{k}: {main_type} except " + ", ".join(f"{n.removesuffix('.weight')} {ty}"
                                                                 for n, ty in types.items() if ty != main_type))
    r0 = q["rows"]["F16"]
    console.print(f"{r0['chunks']} windows, {r0['tokens_scored']} scored tokens; torch forward PPL {torch_ppl}")
    if s["rows"]:
        console.print(f"decode tok/s ours-Q4_0 / llama-Q4_0: {s['decode_ratio_ours_llama_q4_0']:.3f} (median of "
                      f"per-round ratios {', '.join(f'{x:.3f}' for x in s['decode_ratio_rounds'])})")
    rows, hh = q["rows"], q["head_to_head"]
    for other, goal in (("llama-Q4_0", "below"), ("llama-Q4_K_M", "at or below")):
        d, se = hh[other]["drift"], hh[other]["drift_se"]
        # met: below by more than 2 se; 'at' (for at or below): within 2 se
        ppl_ok = d < -2 * se or (goal == "at or below" and d <= 2 * se)
        verdict = "MET" if ppl_ok else "NOT met" if d > 2 * se else "NOT shown (within noise)"
        kl_ok = rows["ours-Q4_0"]["kl_mean"] < rows[other]["kl_mean"]
        console.print(f"goal: ours-Q4_0 PPL {goal} {other}: {verdict} (paired PPL ratio {d:+.3%} ±{se:.3%}, "
                      f"{d / se:+.1f} se); KL {rows['ours-Q4_0']['kl_mean']:.5f} vs {rows[other]['kl_mean']:.5f}: "
                      f"{'lower' if kl_ok else 'NOT lower'}")
        q["goals"] = {**q.get("goals", {}), f"ppl {goal} {other}": verdict, f"kl below {other}": kl_ok}
    for ours, peer in PAIRS:
        if ours not in rows or peer not in rows:
            continue
        d, se = hh[f"{ours} vs {peer}"]["drift"], hh[f"{ours} vs {peer}"]["drift_se"]
        ratio = rows[ours]["kl_mean"] / rows[peer]["kl_mean"]
        console.print(f"{ours} vs {peer}: KL {rows[ours]['kl_mean']:.5f} vs {rows[peer]['kl_mean']:.5f} (ratio "
                      f"{ratio:.3f}), {info[ours]['mib']:.2f} vs {info[peer]['mib']:.2f} MiB; paired PPL ratio "
                      f"{d:+.3%} ±{se:.3%}")
        q["goals"][f"kl ratio {ours} / {peer}"] = ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=MODEL, help="HF MiniCPM checkpoint (default: the bundled tiny model)")
    ap.add_argument("--work", type=Path, default=Path("out/bench-gguf"))
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--runs", type=int, default=5, help="measure() runs per file and round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    ap.add_argument("--max-chunks", type=int, default=None, help="evaluate only the first N windows of 512 tokens")
    ap.add_argument("--llama-embedding", choices=("f16", "default"), default="f16")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads for the timing")
    ap.add_argument("--eval-threads", type=int, default=1,
                    help="llama.cpp threads for scoring (logits are bit-identical for any count; 1 is fastest on a busy CPU)")
    ap.add_argument("--no-torch", action="store_true", help="skip the KL against our torch forward")
    ap.add_argument("--fresh", action="store_true", help="re-quantise even when --work holds the checkpoints")
    ap.add_argument("--no-speed", action="store_true", help="skip the timing rounds")
    ap.add_argument("--embedding", choices=("f16", "q8_0", "q6_k"), default="f16",
                    help="our files' embedding type (q6_k with --llama-embedding default: llama.cpp's own choice)")
    a = ap.parse_args()
    t0, work, model = time.time(), a.work, a.model
    work.mkdir(parents=True, exist_ok=True)
    ckpts = {s: gptq(model, work, s, a.nsamples, a.seqlen, a.fresh) for s in (True, False)}
    emb = a.embedding
    files = {"F16": gguf_of(model, work / "gguf-f16", dtype="f16"),
             "ours-Q4_0": gguf_of(ckpts[True], work / "gguf-ours-q4_0", embedding=emb),
             "ours-Q4_1": gguf_of(ckpts[False], work / "gguf-ours-q4_1", embedding=emb)}
    for kind, fmt in MIXES.items():
        for who, method in (("ours", "gptq"), ("rtn", "rtn")):
            ck = gptq(model, work, True, a.nsamples, a.seqlen, a.fresh, fmt, method)
            files[f"{who}-{kind}"] = gguf_of(ck, work / f"gguf-{who}-{fmt}", embedding=emb)
    (work / "gguf-llama").mkdir(exist_ok=True)
    for kind in LLAMA_TYPES:
        files[f"llama-{kind}"] = llama_quantize(files["F16"], work / "gguf-llama" / f"{model.name}-llama-{kind}.gguf",
                                                kind, a.llama_embedding == "f16")
    info = {k: tensor_info(p) for k, p in files.items()}
    console.print(f"files ready ({time.time() - t0:.0f} s); scoring through llama.cpp")
    tok = Tokenizer(model / "tokenizer.model")
    tokens = tok.encode(evaluation.eval_text(None), bos=True)
    q = quality(files, model, tokens, tok.bos_id, a.max_chunks, not a.no_torch, a.eval_threads)
    torch_ppl = f"{q['rows']['F16']['vs_torch']['ref']['ppl']:.3f}" if not a.no_torch else "(skipped)"
    console.print(f"scored ({time.time() - t0:.0f} s); timing {a.rounds} rounds x {a.runs} runs")
    bandwidth = roofline.measure_bandwidth()
    s = None if a.no_speed else speed(files, a.runs, a.rounds, bandwidth, a.threads)
    report(files, info, q, s, torch_ppl)
    result = {"model": str(model), "llama_embedding": a.llama_embedding, "bandwidth_gbs": bandwidth,
              "files": {k: str(p) for k, p in files.items()}, "tensors": info, "quality": q, "speed": s,
              "seconds": time.time() - t0}
    (work / "gguf_vs_llamacpp.json").write_text(json.dumps(result, indent=1) + "\n")
    console.print(f"wrote {work / 'gguf_vs_llamacpp.json'} ({time.time() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
