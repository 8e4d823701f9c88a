"""Export memory and speed on MiniCPM-2B shapes: do the exporters stream?

  python benchmarks/export_2b.py --layers 40            # the whole 2B shape (about 10 GB of disk in the work folder)

Writes a synthetic MiniCPM-2B-shaped checkpoint (random bf16 weights, real widths), quantises it with RTN w4 g32
(the codes' values do not matter for memory; GPTQ would take an hour here), then runs each `minicpm-edge export`
target in a child process and prints its seconds, peak RSS and the artifact's size. A streaming exporter's peak stays
near one decoder layer plus the embedding however many layers there are; one that holds the model grows with it.
Compare --layers 8 and --layers 40 to see which.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from quantize_2b import peak_rss

TARGETS = ("ios", "android", "onnx")


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    a = ap.parse_args()
    from minicpm_edge.model.synthetic import write_synthetic

    root = Path(a.work or tempfile.mkdtemp(prefix="bench-export-2b-"))
    model, quant = root / "minicpm-2b", root / "minicpm-2b-rtn-w4g32"
    if not (quant / "manifest.json").is_file():
        write_synthetic("minicpm-2b", model, layers=a.layers)
        peak, wall, rc = peak_rss([sys.executable, "-m", "minicpm_edge", "quantize", str(model), "--out", str(quant),
                                   "--method", "rtn", "--nsamples", "4", "--seqlen", "64", "--force"])
        if rc:
            raise SystemExit(rc)
        print(f"quantize (rtn, {a.layers} layers): {wall:.0f} s, peak RSS {peak / 2**30:.2f} GiB")
    print(f"MiniCPM-2B shapes, {a.layers} layers: GPTQ checkpoint {size(quant) / 2**30:.2f} GiB")
    print(f"{'target':8} {'seconds':>8} {'peak RSS GiB':>13} {'artifact GiB':>13} {'peak / artifact':>16}")
    for target in TARGETS:
        out = root / f"export-{target}"
        peak, wall, rc = peak_rss([sys.executable, "-m", "minicpm_edge", "export", str(quant), "--target", target,
                                   "--out", str(out), "--force"])
        if rc:
            raise SystemExit(rc)
        art = size(out)
        print(f"{target:8} {wall:8.1f} {peak / 2**30:13.2f} {art / 2**30:13.2f} {peak / art:16.2f}")


if __name__ == "__main__":
    main()
