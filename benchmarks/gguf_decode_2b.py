"""Our Q4_0 GGUF against llama.cpp's own Q4_0 of the same F16 GGUF, on MiniCPM-2B shapes: decode, prefill, size.

  python benchmarks/gguf_decode_2b.py [--layers 40] [--work out/bench-gguf-2b] [--rounds 6] [-p 128 -n 64]

A synthetic MiniCPM-2B-shaped checkpoint (random bf16 weights, real widths) is quantised with RTN w4 g32 (the codes'
values do not change the speed of a format; GPTQ would take an hour here) and exported by `minicpm-edge export
--target ios`; its unquantised original goes to an F16 GGUF that llama.cpp's own `llama-quantize` turns into Q4_0 with
the same embedding type (F16, --token-embedding-type f16). Both files are timed by llama.cpp's own `llama-bench`
(benchmarks/llama_tools.py builds it from the llama-cpp-python sdist) in interleaved rounds, order reversed every
other round (ABBA), so that slow spells of a shared CPU hit both alike. Prints medians, ranges and the median of the
per-round ratios ours / llama.cpp, sizes, and the decode bound from the measured memory bandwidth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_tools  # noqa: E402

from minicpm_edge.bench import roofline  # noqa: E402
from minicpm_edge.bench.run import child_env, local_device  # noqa: E402
from minicpm_edge.export.ios import export_ios  # noqa: E402
from minicpm_edge.model.synthetic import write_synthetic  # noqa: E402
from minicpm_edge.quant.driver import QuantOptions, quantize_checkpoint  # noqa: E402
from minicpm_edge.quant.grid import QuantSpec  # noqa: E402


def bench(tool: Path, gguf: Path, p: int, n: int, reps: int, threads: int) -> dict:
    """llama-bench's mean tokens/s for pp<p> and tg<n> (one process, `reps` repetitions after its warm-up)."""
    cmd = [str(tool), "-m", str(gguf), "-p", str(p), "-n", str(n), "-r", str(reps), "-t", str(threads), "-o", "json"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=child_env())  # OpenMP's default wait, as llama.cpp's
    if r.returncode:
        raise SystemExit(f"llama-bench failed on {gguf}: {r.stderr.strip().splitlines()[-1:]}")
    rows = json.loads(r.stdout)
    return {"prefill": next(x["avg_ts"] for x in rows if x["n_prompt"] == p and x["n_gen"] == 0),
            "decode": next(x["avg_ts"] for x in rows if x["n_gen"] == n and x["n_prompt"] == 0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--work", type=Path, default=Path("out/bench-gguf-2b"))
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--reps", type=int, default=3, help="llama-bench repetitions per file and round")
    ap.add_argument("-p", type=int, default=128, help="prompt tokens (prefill test)")
    ap.add_argument("-n", type=int, default=64, help="generated tokens (decode test)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    tools = llama_tools.build()
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    model, quant = work / f"minicpm-2b-{a.layers}l", work / f"minicpm-2b-{a.layers}l-rtn-w4g32"
    if not (model / "manifest.json").is_file():
        write_synthetic("minicpm-2b", model, layers=a.layers)
    if not (quant / "manifest.json").is_file():
        quantize_checkpoint(model, quant, QuantOptions(spec=QuantSpec(4, 32, True), method="rtn", search="max",
                                                       nsamples=4, seqlen=64), force=True)
    files = {"ours": work / "ours-Q4_0.gguf", "llama.cpp": work / "llama-Q4_0.gguf"}
    if not files["ours"].is_file():
        next(export_ios(quant, work / "export-ours", force=True).glob("*.gguf")).rename(files["ours"])
    if not files["llama.cpp"].is_file():
        f16 = next(export_ios(model, work / "export-f16", force=True, dtype="f16").glob("*.gguf"))
        with open(work / "llama-quantize.log", "w") as log:
            rc = subprocess.run([str(tools["llama-quantize"]), "--token-embedding-type", "f16", "--output-tensor-type",
                                 "f16", str(f16), str(files["llama.cpp"]), "Q4_0", str(a.threads)],
                                stdout=log, stderr=subprocess.STDOUT).returncode
        if rc:
            raise SystemExit(f"llama-quantize failed; see {work / 'llama-quantize.log'}")
        f16.unlink()  # 5 GB
    per = {k: [] for k in files}
    for i in range(a.rounds):
        for k in (list(files) if i % 2 == 0 else list(reversed(files))):
            per[k].append(bench(tools["llama-bench"], files[k], a.p, a.n, a.reps, a.threads))
            print(f"round {i + 1} {k}: pp{a.p} {per[k][-1]['prefill']:.2f} t/s, tg{a.n} {per[k][-1]['decode']:.2f} t/s",
                  flush=True)
    bw = roofline.measure_bandwidth()
    out = {"cpu": local_device(), "layers": a.layers, "threads": a.threads, "bandwidth_gbs": bw, "rounds": per}
    print(f"\n{local_device()}, {a.threads} threads, {a.layers} layers, {a.rounds} rounds x {a.reps} reps, "
          f"bandwidth {bw:.1f} GB/s")
    for k, path in files.items():
        bound = roofline.decode_bound(bw, roofline.bytes_per_token(path)["bytes_per_token"])
        row = {m: statistics.median(r[m] for r in per[k]) for m in ("prefill", "decode")}
        row.update(bytes=path.stat().st_size, decode_bound=bound)
        out[k] = row
        print(f"{k:10} {path.stat().st_size / 2**30:.4f} GiB  prefill {row['prefill']:.2f} t/s "
              f"[{min(r['prefill'] for r in per[k]):.2f}-{max(r['prefill'] for r in per[k]):.2f}]  decode "
              f"{row['decode']:.2f} t/s [{min(r['decode'] for r in per[k]):.2f}-{max(r['decode'] for r in per[k]):.2f}]"
              f"  = {row['decode'] / bound:.0%} of the bound {bound:.1f} t/s")
    for m in ("prefill", "decode"):
        ratios = [x[m] / y[m] for x, y in zip(per["ours"], per["llama.cpp"])]
        out[f"{m}_ratio"] = statistics.median(ratios)
        print(f"{m} ours / llama.cpp: {statistics.median(ratios):.3f} (per round {', '.join(f'{r:.3f}' for r in ratios)})")
    out["size_ratio"] = out["ours"]["bytes"] / out["llama.cpp"]["bytes"]
    print(f"size ours / llama.cpp: {out['size_ratio']:.5f}")
    (work / "gguf_decode_2b.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
