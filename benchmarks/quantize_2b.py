"""Quantisation speed and memory on MiniCPM-2B shapes (random weights, real widths), on the CPU or a CUDA GPU.

  python benchmarks/quantize_2b.py --layers 2 --nsamples 128 --seqlen 512
  python benchmarks/quantize_2b.py --layers 40 --device cuda --compare 2 --peer python3      (where a GPU is)

Writes a synthetic MiniCPM-2B-shaped checkpoint with --layers decoder layers, runs `minicpm-edge quantize` on it in a
child process (through benchmarks/phases.py, which times each phase), and prints seconds per layer (median), the
whole run, peak RSS of the child and, on a GPU, torch's peak GPU memory in it.

--compare K quantises the first K layers of the same checkpoint again, in this process, on the CPU in fp32 (and on
--device in fp32 when that is a GPU), and prints for each Linear the share of integer codes equal to the main run's
and the two runs' relative output errors: the check that the device path makes the codes the CPU path makes (bf16
compute, a GPU's default, moves some codes by one step; the error is what has to agree).

--peer PYTHON runs gptqmodel 7.6.0 in that interpreter on the same checkpoint (re-labelled GraniteForCausalLM, as in
benchmarks/gptqmodel_layer.py) and the same token ids, on --device, in the same run: seconds in quantize() and its
peak GPU memory. The CPU-only same-layer comparison is benchmarks/gptqmodel_layer.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

import minicpm_edge  # noqa: F401  (first: it sets the OpenMP / MKL environment the CLI runs in, before torch)
import torch

sys.path.insert(0, str(Path(__file__).parent))
from gptqmodel_layer import PEER_SCRIPT, cpu_name, granite_copy  # noqa: E402


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
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (minicpm-edge quantize --device)")
    ap.add_argument("--compare", type=int, default=0, metavar="K",
                    help="quantise the first K layers again on the CPU in fp32 (and on --device in fp32) and "
                    "compare codes and errors with the main run")
    ap.add_argument("--peer", default=None, metavar="PYTHON", help="a Python with gptqmodel 7.6.0: quantise the "
                    "same checkpoint and tokens with it on --device in this run")
    ap.add_argument("--keep", type=Path, default=None, help="write the checkpoints here instead of a temp dir")
    a = ap.parse_args()
    from minicpm_edge.model.synthetic import write_synthetic

    gpu = a.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        raise SystemExit(f"--device {a.device}: torch sees no CUDA device here")
    if not 0 <= a.compare <= a.layers:
        raise SystemExit(f"--compare {a.compare}: give 0 to --layers ({a.layers})")
    root = Path(a.keep or tempfile.mkdtemp(prefix="bench-2b-"))
    model = write_synthetic("minicpm-2b", root / "minicpm-2b", layers=a.layers)
    out = root / "quantized"
    cmd = [sys.executable, str(Path(__file__).with_name("phases.py")), str(root / "phases.json"), "quantize",
           str(model), "--out", str(out), "--force", "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen),
           "--method", a.method, "--compute", a.compute, "--device", a.device]
    peak, wall, rc = peak_rss(cmd)
    if rc:
        raise SystemExit(rc)
    report = json.loads((out / "quant_report.json").read_text())
    phases = json.loads((root / "phases.json").read_text())
    per_layer = [r["seconds"] for r in report["layers"]]
    med = statistics.median(per_layer)
    where = torch.cuda.get_device_name(torch.device(a.device)) if gpu else cpu_name()
    print(f"MiniCPM-2B shapes, {a.layers} layers, {a.nsamples} x {a.seqlen} calibration tokens, {a.method} w4 g32 sym, "
          f"order {report['order']}, compute {report['compute']}, device {a.device} ({where})")
    print(f"  seconds per layer: median {med:.1f} (range {min(per_layer):.1f}-{max(per_layer):.1f}; "
          f"all: {', '.join(f'{s:.1f}' for s in per_layer)})")
    print(f"  whole run: {wall:.1f} s wall; peak RSS {peak / 2**30:.2f} GiB"
          + (f"; peak GPU memory {phases['gpu_peak_allocated'] / 2**30:.2f} GiB allocated, "
             f"{phases['gpu_peak_reserved'] / 2**30:.2f} GiB reserved" if "gpu_peak_allocated" in phases else ""))
    print(f"  extrapolated to 40 layers: {med * 40 / 60:.1f} min")
    print("  seconds per phase (benchmarks/phases.py): "
          + ", ".join(f"{k} {v:.1f}" for k, v in phases.items() if not k.startswith("gpu_")))
    errors = {m: statistics.median(r["modules"][m]["rel_error"] for r in report["layers"]) for m in report["layers"][0]["modules"]}
    print("  median relative output error per module: " + ", ".join(f"{m.split('.')[-1]} {e:.4f}" for m, e in errors.items()))
    if a.compare:
        compare(model, out, report, a, root)
    if a.peer:
        peer(model, a, root, sum(per_layer), wall)


def linears_of(files: list[Path], report_layers: list[dict], k: int) -> dict[str, tuple]:
    """{"<layer>.<module>": (QuantizedLinear, relative output error)} for the first k layers."""
    from safetensors import safe_open

    from minicpm_edge.quant.format import QuantizedLinear

    out = {}
    for f in files:
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                parts = name.split(".")
                if parts[-1] != "qweight" or int(parts[2]) >= k:
                    continue
                layer, module, prefix = int(parts[2]), ".".join(parts[3:-1]), name[: -len("qweight")]
                q = QuantizedLinear.from_gptq({s: st.get_tensor(prefix + s) for s in ("qweight", "qzeros", "scales", "g_idx")},
                                              4, 32, True, name=name)
                out[f"{layer}.{module}"] = (q, report_layers[layer]["modules"][module]["rel_error"])
    return out


def compare(model: Path, out: Path, report: dict, a, root: Path) -> None:
    """The first a.compare layers again, on the CPU in fp32 (and on a.device in fp32): codes and errors."""
    from minicpm_edge.quant.driver import QuantOptions, quantize_checkpoint

    main = linears_of(sorted(out.glob("*.safetensors")), report["layers"], a.compare)
    runs = [("cpu", "fp32")] + ([(a.device, "fp32")] if a.device != "cpu" else [])
    print(f"  first {a.compare} layer(s) again in this process; per Linear: codes and group scales equal to "
          "the main run's, relative output error (main run / again)")
    for device, compute in runs:
        opts = QuantOptions(method=a.method, nsamples=a.nsamples, seqlen=a.seqlen, device=device, compute=compute)
        t = time.time()
        work = quantize_checkpoint(model, root / f"again-{device}-{compute}", opts, force=True, stop_after=a.compare)
        seconds = time.time() - t
        state = json.loads((work / "state.json").read_text())
        again = linears_of(sorted(work.glob("layer_*.safetensors")), state["report"], a.compare)
        print(f"    {device} {compute} ({seconds:.1f} s for {a.compare} layer(s)):")
        ratios = []
        for name, (q, err) in main.items():
            q2, e2 = again[name]
            same = (q.codes == q2.codes).float().mean().item()
            same_s = (q.scales == q2.scales).float().mean().item()  # float16: a scale one ulp apart moves its group
            ratios.append(err / e2)
            print(f"      {name:22s} codes equal {same:7.2%}, scales equal {same_s:7.2%}; "
                  f"error {err:.5f} / {e2:.5f} = {err / e2:.4f}")
        print(f"      error ratio median {statistics.median(ratios):.4f} (range {min(ratios):.4f}-{max(ratios):.4f}), "
              f"count of Linears {len(again)} / {len(main)}")


def peer(model: Path, a, root: Path, ours_seconds: float, ours_wall: float) -> None:
    """gptqmodel 7.6.0 on the same checkpoint and tokens, on a.device."""
    from minicpm_edge import calib
    from minicpm_edge.model import Tokenizer

    ids = calib.calibration_batches(Tokenizer(model / "tokenizer.model"), calib.load_documents(None), a.nsamples, a.seqlen)
    (root / "ids.json").write_text(json.dumps(ids.tolist()))
    granite = granite_copy(model, root / "granite")
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS=os.environ.get("GPTQMODEL_CPU_WORKERS", "2"))
    t = time.time()
    p = subprocess.run([a.peer, "-c", PEER_SCRIPT, str(granite), str(root / "peer"), str(root / "ids.json"), "auto",
                        a.device], capture_output=True, text=True, env=env)
    if p.returncode:
        sys.stderr.write(p.stderr[-3000:])
        raise SystemExit("gptqmodel run failed")
    peer_wall = time.time() - t
    r = next(json.loads(line) for line in p.stdout.splitlines() if line.startswith('{"seconds"'))
    gpu = f", peak GPU memory {r['gpu_peak_allocated'] / 2**30:.2f} GiB allocated" if r.get("gpu_peak_allocated") else ""
    print(f"  gptqmodel 7.6.0 on {a.device}: {r['seconds']:.1f} s in quantize() (wall {peer_wall:.1f} s){gpu}; "
          f"ours {ours_seconds:.1f} s in its layers ({ours_wall:.1f} s wall) = {r['seconds'] / ours_seconds:.2f}x "
          f"gptqmodel's speed ({peer_wall / ours_wall:.2f}x wall to wall)")


if __name__ == "__main__":
    main()
