"""Our ONNX export against onnxruntime-genai's own model builder, both decoded by onnxruntime-genai, same threads.

  python benchmarks/onnx_vs_genai_builder.py --work out/bench-onnx-genai [--threads 2 --rounds 5]

The bundled model: ours is the GPTQ w4 g32 checkpoint exported with `minicpm-edge export --target onnx`; the builder's
is `python -m onnxruntime_genai.models.builder -p int4 -e cpu` on the llama-format fold of the same model
(benchmarks/quality_vs_peers.py fold_to_llama: the builder has no MiniCPM). The builder needs `onnx_ir`, which the
onnxruntime-genai wheel does not pull in (put it on PYTHONPATH, e.g. pip install --target DIR onnx_ir). Rounds
interleave the two models; prints median and range of prefill and decode tokens/s, the ratio, and each folder's size.

Measured on AMD EPYC (2 cores, shared), onnxruntime-genai 0.18.0, 2 threads. MiniCPM-2B shapes, 8 layers, pp128
tg32, 5 rounds: ours / builder decode 0.41x (float32 head), 0.80x (q8_0 head), 0.99x (q4_0 head, the builder's
bytes per token; per-round median 1.00), prefill 0.96-1.05x; sizes 840 / 1144 / 1009 MiB against 1544. Bundled model,
pp128 tg128, 15 rounds: decode 1.00-1.11x the builder's for all three heads (per round 0.5-3.2: noise). Before the
fused graph (GroupQueryAttention, SkipSimplifiedLayerNormalization, stacked q|k|v and gate|up) ours was 0.35-0.81x.
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

from quality_vs_peers import fold_to_llama

from minicpm_edge.bench import roofline
from minicpm_edge.bench.run import local_device

PY = [sys.executable, "-m"]


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build(work: Path, model: str, layers: int) -> dict[str, Path]:
    """Our exports (f16, q8_0 and q4_0 heads) and the builder's int4 model of the same checkpoint: the bundled
    model's GPTQ w4 g32, or a MiniCPM-2B-shaped synthetic one (`layers` decoder layers at the real widths and
    vocabulary, RTN w4 g32: the codes' values do not matter for speed)."""
    from minicpm_edge.cli import BUNDLED_MODEL
    from minicpm_edge.model.synthetic import write_synthetic

    if model == "bundled":
        src, quant = BUNDLED_MODEL, ["--bits", "4", "--group-size", "32"]
    else:
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
    return {**ours, "builder": theirs}


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bundled", help="bundled, or a synthetic kind such as minicpm-2b")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of a synthetic model")
    ap.add_argument("--work", type=Path, default=None, help="default: out/bench-onnx-genai-<model>")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n-prompt", type=int, default=128)
    ap.add_argument("--n-gen", type=int, default=128)
    a = ap.parse_args()
    import onnxruntime_genai as og

    work = a.work or Path("out") / f"bench-onnx-genai-{a.model}"
    work.mkdir(parents=True, exist_ok=True)
    folders = build(work, a.model, a.layers)
    models = {}
    for name, folder in folders.items():
        config = og.Config(str(folder))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": a.threads, "inter_op_num_threads": 1}}}}))
        models[name] = og.Model(config)
        run_once(models[name], 16, 8)  # warm-up
    results = {name: ([], []) for name in models}
    for r in range(a.rounds):
        for name, model in (list(models.items()) if r % 2 == 0 else reversed(models.items())):
            pp, tg = run_once(model, a.n_prompt, a.n_gen)
            results[name][0].append(pp)
            results[name][1].append(tg)
    print(f"onnxruntime-genai {og.__version__}, {a.threads} threads, pp{a.n_prompt} tg{a.n_gen}, {a.rounds} rounds")
    bw = roofline.measure_bandwidth()
    print(f"{local_device()}, measured bandwidth {bw:.1f} GB/s")
    print(f"{'model':12} {'size MiB':>9} {'prefill tok/s (range)':>26} {'decode tok/s (range)':>26} "
          f"{'MiB/token':>9} {'of bound':>8}")
    med = {}
    for name, (pp, tg) in results.items():
        med[name] = statistics.median(pp), statistics.median(tg)
        per_token = roofline.bytes_per_token(folders[name])["bytes_per_token"]
        print(f"{name:12} {size(folders[name]) / 2**20:9.2f} {med[name][0]:9.1f} ({min(pp):7.1f}-{max(pp):7.1f}) "
              f"{med[name][1]:9.1f} ({min(tg):7.1f}-{max(tg):7.1f}) {per_token / 2**20:9.1f} "
              f"{med[name][1] / roofline.decode_bound(bw, per_token):8.0%}")
    for name in med:
        if name != "builder":  # per round: the two models ran back to back, so the ratio is less noisy than medians
            rounds = [a / b for a, b in zip(results[name][1], results["builder"][1])]
            print(f"{name} / builder: prefill {med[name][0] / med['builder'][0]:.2f}x, decode "
                  f"{med[name][1] / med['builder'][1]:.2f}x (per round {min(rounds):.2f}-{max(rounds):.2f}, median "
                  f"{statistics.median(rounds):.2f})")


if __name__ == "__main__":
    main()
