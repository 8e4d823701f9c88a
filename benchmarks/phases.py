"""Where `minicpm-edge quantize` spends its time: per-phase seconds, measured from outside the product code.

  python benchmarks/phases.py [--torch-loops] OUT.json quantize MODEL --out DIR ...   (then `minicpm-edge quantize`'s)

--torch-loops runs the solver's column runs and the grid search's code sums as torch operations instead of the
compiled loops (quant/kernels.py), for a before / after of the same code.

Wraps the functions each phase runs in with timers, runs the CLI in this process and writes {phase: seconds} to
OUT.json. Each phase counts its own time only (time in a wrapped function it calls goes to that function's phase):
  forwards   quantize_layer less everything below: the calibration forwards of each true-sequential group and the
             residual updates, of both streams with GPTAQ (plus a little glue: slicing, dtype casts)
  probe      the unquantised reference forward on a few samples, for the report's layer error
  hessians   GPTQ.add_batch (X^T X, the finiteness check, the running average; with GPTAQ also (Xn - X)^T X)
  target     GPTQ.target (GPTAQ's corrected weight: one Cholesky solve per Linear)
  cholesky   the damped Cholesky factorisation and the inverse's upper factor
  grid       the grid search (group_params, find_params; kquant.fit_grid for the GGML block grids)
  solver     GPTQ.quantize less cholesky and grid: the column loop and its block updates
  error      GPTQ.output_error, the report's per-module error
  packing    QuantizedLinear.from_result and to_gptq
  io         loading the layer, saving layer files and hidden states, assembling the checkpoint
  setup      the rest of quantize_checkpoint (checks, tokenising the calibration text, the embedding lookup)
On a CUDA device OUT.json also holds gpu_peak_allocated and gpu_peak_reserved (bytes, torch's allocator).
"""

from __future__ import annotations

import functools
import json
import sys
import time

import minicpm_edge  # noqa: F401  (first: it sets the OpenMP / MKL environment the CLI runs in, before torch)
import torch

from minicpm_edge.model import forward
from minicpm_edge.quant import driver, format, gptq

TOTALS: dict[str, float] = {}
_stack: list[float] = []  # per open timed call: seconds spent in timed calls nested in it


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(phase: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _sync()
        _stack.append(0.0)
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _sync()
            dt = time.perf_counter() - t
            TOTALS[phase] = TOTALS.get(phase, 0.0) + dt - _stack.pop()
            if _stack:
                _stack[-1] += dt
    return wrapper


def install() -> dict[str, float]:
    """Put the timers in place (in this process, for good); returns the dict they fill."""
    G = gptq.GPTQ
    G.add_batch = timed("hessians", G.add_batch)
    G.quantize = timed("solver", G.quantize)
    G.output_error = timed("error", G.output_error)
    G.target = timed("target", G.target)
    gptq._inverse_cholesky = timed("cholesky", gptq._inverse_cholesky)
    gptq.find_params = timed("grid", gptq.find_params)
    gptq.group_params = timed("grid", gptq.group_params)
    gptq.fit_grid = timed("grid", gptq.fit_grid)  # the GGML block grids (kquant.py)
    Q = format.QuantizedLinear
    Q.from_result = classmethod(timed("packing", Q.from_result.__func__))
    Q.to_gptq = timed("packing", Q.to_gptq)
    forward.DecoderLayer.forward = timed("probe", forward.DecoderLayer.forward)  # quantize_layer calls it for the probe only
    driver.quantize_layer = timed("forwards", driver.quantize_layer)
    for name in ("load_layer", "_atomic_save", "_assemble", "load_file"):
        setattr(driver, name, timed("io", getattr(driver, name)))
    driver.quantize_checkpoint = timed("setup", driver.quantize_checkpoint)
    return TOTALS


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["--torch-loops"]:
        from minicpm_edge.quant import kernels

        kernels.usable = lambda *tensors: False
        args = args[1:]
    if len(args) < 2:
        raise SystemExit("usage: python benchmarks/phases.py [--torch-loops] OUT.json quantize MODEL --out DIR ...")
    out, argv = args[0], args[1:]
    install()
    from minicpm_edge import cli  # after install: the CLI takes quantize_checkpoint from driver when it runs

    sys.argv = ["minicpm-edge", *argv]
    try:
        cli.run()
    finally:
        result = dict(TOTALS)
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # torch's allocator peaks, this process
            result["gpu_peak_allocated"] = torch.cuda.max_memory_allocated()
            result["gpu_peak_reserved"] = torch.cuda.max_memory_reserved()
        with open(out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
