"""Quantisation speed and memory on MiniCPM-2B shapes (random weights, real widths).

  python benchmarks/quantize_2b.py --layers 2 --nsamples 128 --seqlen 512

Writes a synthetic MiniCPM-2B-shaped checkpoint with --layers decoder layers, runs `minicpm-edge quantize` on it in a
child process, and prints seconds per layer (median) and peak RSS of the child. The same-run comparison with a peer
(gptqmodel 7.6.0 on the same layer and tokens) is benchmarks/gptqmodel_layer.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

def peak_rss(cmd: list[str]) -> tuple[int, float, int]:
    """Run cmd, polling the resident set size of it and its children; returns (peak bytes, seconds, exit code)."""
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc, peak = psutil.Process(p.pid), 0
    while p.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True)))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.05)
    if p.returncode:
        sys.stderr.write(p.stderr.read())
    return peak, time.time() - t0, p.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--compute", default="auto", help="fp32, bf16 or auto (minicpm-edge quantize --compute)")
    ap.add_argument("--keep", type=Path, default=None, help="write the checkpoints here instead of a temp dir")
    a = ap.parse_args()
    from minicpm_edge.model.synthetic import write_synthetic

    root = Path(a.keep or tempfile.mkdtemp(prefix="bench-2b-"))
    model = write_synthetic("minicpm-2b", root / "minicpm-2b", layers=a.layers)
    out = root / "quantized"
    cmd = [sys.executable, "-m", "minicpm_edge", "quantize", str(model), "--out", str(out), "--force",
           "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--method", a.method,
           "--compute", a.compute]
    peak, wall, rc = peak_rss(cmd)
    if rc:
        raise SystemExit(rc)
    report = json.loads((out / "quant_report.json").read_text())
    per_layer = [r["seconds"] for r in report["layers"]]
    med = statistics.median(per_layer)
    print(f"MiniCPM-2B shapes, {a.layers} layers, {a.nsamples} x {a.seqlen} calibration tokens, {a.method} w4 g32 sym, "
          f"order {report['order']}, compute {report['compute']}")
    print(f"  seconds per layer: median {med:.1f} (all: {', '.join(f'{s:.1f}' for s in per_layer)})")
    print(f"  whole run: {wall:.1f} s wall; peak RSS {peak / 2**30:.2f} GiB")
    print(f"  extrapolated to 40 layers: {med * 40 / 60:.1f} min")
    errors = {m: statistics.median(r["modules"][m]["rel_error"] for r in report["layers"]) for m in report["layers"][0]["modules"]}
    print("  median relative output error per module: " + ", ".join(f"{m.split('.')[-1]} {e:.4f}" for m, e in errors.items()))


if __name__ == "__main__":
    main()
