"""The library gives memory back: quantise, evaluate and export two models one after the other in one process, and
resident memory after each step stays within 10% of where it started and below half a model's weights above it (the
second run working too).

Runs in a fresh subprocess (this file run as a script) so other tests' memory does not count. The models are
small_variant checkpoints at hidden size 1024 (115 MiB of float32 weights each, about 240 MiB for the two runners
`evaluate` holds): a model that stayed resident after it was released would show as a rise of at least its 115 MiB,
twice the allowance. The allowance is set by the model, not only by the baseline, which (libtorch, numba's LLVM and
compiled kernels, onnxruntime, llama.cpp) measured 518-600 MiB depending on the machine: a leak must show whatever
the baseline is.
The baseline is taken after a warm-up pass over a one-layer model of the same width, so that code the first call
pages in (libtorch's kernels for these shapes, one-time allocations of the runtimes) is not counted as a leak.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BOUND = 0.10
BIG = {"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 8, "num_key_value_heads": 8}


def test_memory_returns_to_baseline_between_models(tmp_path):
    from conftest import small_variant

    for seed in (0, 1):
        small_variant(tmp_path / f"m{seed}", seed=seed, **BIG)
    small_variant(tmp_path / "warm", seed=2, **{**BIG, "num_hidden_layers": 1})
    r = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=600)
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    base = res["baseline_mib"]
    for step, mib in res["steps"]:
        assert mib <= base * (1 + BOUND), f"{step}: {mib:.0f} MiB resident against a baseline of {base:.0f} MiB"
        assert mib - base < 0.5 * res["model_mib"], f"{step}: {mib - base:.0f} MiB above the baseline, against " \
            f"{res['model_mib']:.0f} MiB of weights per model"
    assert res["model_mib"] > 100, "models too small for a leak to show"
    assert all(d == d for d in res["drift"]) and len(res["drift"]) == 2  # both runs produced a report


def _rss_mib() -> float:
    import gc

    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def _child(work: Path) -> None:
    from minicpm_edge.evaluation import evaluate
    from minicpm_edge.export.ios import export_ios
    from minicpm_edge.export.onnx import export_onnx
    from minicpm_edge.quant import QuantSpec
    from minicpm_edge.quant.driver import QuantOptions, quantize_checkpoint

    opts = QuantOptions(spec=QuantSpec(4, 32, True), nsamples=4, seqlen=64)
    models, warm = [work / "m0", work / "m1"], work / "warm"  # written by the test, so their making is not counted
    model_mib = (models[0] / "model.safetensors").stat().st_size / 2**20
    started = _rss_mib()

    def run(src: Path, tag: str, record=None):
        q = quantize_checkpoint(src, work / f"{tag}-gptq", opts)
        record and record(f"{tag} quantize")
        report = evaluate(src, q, max_chunks=2, ctx=128)
        record and record(f"{tag} evaluate")
        export_ios(q, work / f"{tag}-ios")
        record and record(f"{tag} export ios")
        export_onnx(q, work / f"{tag}-onnx")
        record and record(f"{tag} export onnx")
        assert any((work / f"{tag}-ios").glob("*.gguf")) and (work / f"{tag}-onnx" / "model.onnx").is_file()
        return report["drift"]

    run(warm, "warm-up")
    baseline = _rss_mib()
    steps = []

    def record(step: str) -> None:
        steps.append((step, _rss_mib()))
        print(f"{step}: {steps[-1][1]:.0f} MiB ({steps[-1][1] / baseline - 1:+.1%})", flush=True)

    print(f"started at {started:.0f} MiB, baseline after warm-up {baseline:.0f} MiB; model weights {model_mib:.0f} MiB "
          "each", flush=True)
    drift = [run(m, m.name, record) for m in models]
    print(json.dumps({"started_mib": started, "baseline_mib": baseline, "model_mib": model_mib, "steps": steps,
                      "drift": drift}))


if __name__ == "__main__":
    _child(Path(sys.argv[1]))


def _rss_file_mib() -> float:
    """Resident pages of mapped files (Linux): what reading a safetensors file through a memory map leaves behind."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile in /proc/self/status")


def test_streaming_layers_does_not_keep_their_mapped_pages(tmp_path):
    """Reading a checkpoint layer by layer (as quantize and every exporter do) must not leave each layer's pages
    mapped: for a 40-layer 2B model that was 0.12 GiB of resident memory per layer read, 5 GiB by the end."""
    import pytest

    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc")
    from conftest import small_variant

    from minicpm_edge.model import Checkpoint, load_layer
    from minicpm_edge.quant import QuantSpec
    from minicpm_edge.quant.driver import QuantOptions, quantize_checkpoint

    model = small_variant(tmp_path / "m", **BIG, num_hidden_layers=8)
    with Checkpoint(model) as ckpt:
        layer_mib = sum(t.numel() * t.element_size() for t in ckpt.layer_state(0, None).values()) / 2**20
        before = _rss_file_mib()
        for i in range(8):
            layer = load_layer(ckpt, i)  # float32 copies of the mapped tensors
            del layer
        grown = _rss_file_mib() - before
    assert layer_mib > 40  # about 49 MiB per layer: large enough for kept pages to show
    assert grown < 1.5 * layer_mib, f"{grown:.0f} MiB of mapped pages kept after reading 8 layers"
    q = quantize_checkpoint(model, tmp_path / "q", QuantOptions(spec=QuantSpec(4, 32, True), method="rtn", nsamples=2,
                                                         seqlen=32))
    with Checkpoint(q) as ckpt:  # GPTQ records: int32 codes read zero-copy, unpacked, then unmapped
        before = _rss_file_mib()
        records = [ckpt.quantized(f"model.layers.{i}.mlp.down_proj").codes.shape for i in range(8)]
        grown = _rss_file_mib() - before
    assert len(records) == 8 and grown < 0.5 * layer_mib, f"{grown:.0f} MiB of mapped GPTQ pages kept"
