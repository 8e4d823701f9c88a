"""Our ONNX export against onnxruntime-genai's own model builder, both decoded by onnxruntime-genai, same threads.

  python benchmarks/onnx_vs_genai_builder.py --work out/bench-onnx-genai [--threads 2 --rounds 5]

The bundled model: ours is the GPTQ w4 g32 checkpoint exported with `minicpm-edge export --target onnx`; the builder's
is `python -m onnxruntime_genai.models.builder -p int4 -e cpu` on the llama-format fold of the same model
(benchmarks/quality_vs_peers.py fold_to_llama: the builder has no MiniCPM). The builder needs `onnx_ir`, which the
onnxruntime-genai wheel does not pull in (put it on PYTHONPATH, e.g. pip install --target DIR onnx_ir). Rounds
interleave the two models; prints median and range of prefill and decode tokens/s, the ratio, and each folder's size.

Measured on AMD EPYC (2 cores, shared), onnxruntime-genai 0.18.0, 2 threads, pp128 tg128, four runs of 5-9 rounds:
ours 3.95 MiB, decode medians 778-1510 tok/s; builder 6.64 MiB (float32 embedding, int4 head), 1677-3046 tok/s;
ours / builder decode 0.35x-0.81x (median of the four 0.5x), prefill 0.65x-1.20x. The builder's graph fuses what ours
does not yet: GroupQueryAttention, SkipSimplifiedLayerNormalization, one MatMulNBits for q/k/v (issue 19).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from quality_vs_peers import fold_to_llama

PY = [sys.executable, "-m"]


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build(work: Path) -> dict[str, Path]:
    from minicpm_edge.cli import BUNDLED_MODEL

    gptq, ours, theirs = work / "gptq", work / "ours-onnx", work / "builder-int4"
    if not (gptq / "manifest.json").is_file():
        subprocess.run(PY + ["minicpm_edge", "quantize", str(BUNDLED_MODEL), "--bits", "4", "--group-size", "32",
                             "--out", str(gptq), "--force"], check=True)
    if not (ours / "model.onnx").is_file():
        subprocess.run(PY + ["minicpm_edge", "export", str(gptq), "--target", "onnx", "--out", str(ours), "--force"],
                       check=True)
    if not (theirs / "model.onnx").is_file():
        llama = fold_to_llama(BUNDLED_MODEL, work / "llama")
        subprocess.run(PY + ["onnxruntime_genai.models.builder", "-i", str(llama), "-o", str(theirs), "-p", "int4",
                             "-e", "cpu", "-c", str(work / "builder-cache")], check=True)
    return {"ours": ours, "builder": theirs}


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
    ap.add_argument("--work", type=Path, default=Path("out/bench-onnx-genai"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n-prompt", type=int, default=128)
    ap.add_argument("--n-gen", type=int, default=128)
    a = ap.parse_args()
    import onnxruntime_genai as og

    folders = build(a.work)
    models = {}
    for name, folder in folders.items():
        config = og.Config(str(folder))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": a.threads, "inter_op_num_threads": 1}}}}))
        models[name] = og.Model(config)
        run_once(models[name], 16, 8)  # warm-up
    results = {name: ([], []) for name in models}
    for _ in range(a.rounds):
        for name, model in models.items():
            pp, tg = run_once(model, a.n_prompt, a.n_gen)
            results[name][0].append(pp)
            results[name][1].append(tg)
    print(f"onnxruntime-genai {og.__version__}, {a.threads} threads, pp{a.n_prompt} tg{a.n_gen}, {a.rounds} rounds")
    print(f"{'model':8} {'size MiB':>9} {'prefill tok/s (range)':>26} {'decode tok/s (range)':>26}")
    med = {}
    for name, (pp, tg) in results.items():
        med[name] = statistics.median(pp), statistics.median(tg)
        print(f"{name:8} {size(folders[name]) / 2**20:9.2f} {med[name][0]:9.0f} ({min(pp):6.0f}-{max(pp):6.0f}) "
              f"{med[name][1]:9.0f} ({min(tg):6.0f}-{max(tg):6.0f})")
    print(f"ours / builder: prefill {med['ours'][0] / med['builder'][0]:.2f}x, "
          f"decode {med['ours'][1] / med['builder'][1]:.2f}x")


if __name__ == "__main__":
    main()
