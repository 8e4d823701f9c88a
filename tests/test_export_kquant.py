"""--format q4_k_m / q3_k_m: the checkpoint holds llama.cpp blocks, the GGUF export copies them (gguf-py reads back the
checkpoint's values exactly), llama.cpp runs each type and agrees with our forward, and the eval gate takes the file;
targets that cannot hold the blocks refuse with the reason."""

import gguf
import numpy as np
import pytest
import torch

from minicpm_edge import evaluation as ev
from minicpm_edge.errors import UserError
from minicpm_edge.export import gguf as G
from minicpm_edge.export.ios import export_ios
from minicpm_edge.model import Checkpoint, Tokenizer
from minicpm_edge.model.checkpoint import LINEARS
from minicpm_edge.quant.driver import QuantOptions, quantize_checkpoint
from minicpm_edge.runtimes import open_runner
from test_export_ios import TEXT, gguf_file


def mixed(src, out, fmt, method="gptq"):
    return quantize_checkpoint(src, out, QuantOptions(format=fmt, method=method, nsamples=16, seqlen=128))


@pytest.fixture(scope="module", params=["q4_k_m", "q3_k_m"])
def kq(request, bundled, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    q = mixed(bundled, d / "q", request.param)
    return request.param, q, export_ios(q, d / "ios")


def test_the_mix_is_llama_cpps(kq):
    """The bundled model (4 layers, hidden 256, intermediate 640): llama.cpp's rules and its fallback for K = 640."""
    fmt, q, _ = kq
    types = Checkpoint(q).quant["types"]
    want = {"q4_k_m": {"self_attn.v_proj": ["Q4_K", "Q4_K", "Q6_K", "Q6_K"],
                       "mlp.down_proj": ["Q5_0", "Q5_0", "Q8_0", "Q8_0"], "mlp.up_proj": ["Q4_K"] * 4},
            "q3_k_m": {"self_attn.v_proj": ["Q5_K", "Q5_K", "Q4_K", "Q4_K"], "mlp.down_proj": ["Q5_0"] * 4,
                       "self_attn.o_proj": ["Q4_K"] * 4, "mlp.gate_proj": ["Q3_K"] * 4}}[fmt]
    for m, per_layer in want.items():
        assert [types[f"model.layers.{i}.{m}"] for i in range(4)] == per_layer, m


def test_gguf_holds_the_checkpoints_blocks_bit_exactly(kq):
    fmt, q, ios = kq
    ckpt = Checkpoint(q)
    c = ckpt.config
    r = gguf.GGUFReader(gguf_file(ios))
    assert r.fields["general.file_type"].contents() == G.FILE_TYPES[fmt]
    tensors = {t.name: t for t in r.tensors}
    for i in range(c.num_hidden_layers):
        state = ckpt.layer_state(i)
        for m in LINEARS:
            prefix = f"model.layers.{i}.{m}"
            rec = ckpt.quantized(prefix)
            t = tensors[f"blk.{i}.{G.NAMES[m]}.weight"]
            assert t.tensor_type.name == rec.type == ckpt.quant["types"][prefix]
            heads = {"self_attn.q_proj": c.num_attention_heads, "self_attn.k_proj": c.num_key_value_heads}.get(m)
            perm = G.permute_rows(rec.shape[0], heads) if heads else torch.arange(rec.shape[0])
            assert np.array_equal(np.asarray(t.data), rec.blocks[perm].numpy())
            # gguf-py's dequantiser gives exactly the weights our forward uses
            theirs = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(rec.shape)
            assert np.array_equal(theirs, state[m + ".weight"][perm].numpy())


def test_llama_cpp_runs_every_type_and_agrees_with_our_forward(kq):
    fmt, q, ios = kq
    ids = Tokenizer(q / "tokenizer.model").encode(TEXT)
    a, b = open_runner(q).logits(ids), open_runner(ios).logits(ids)
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()  # llama.cpp rounds activations to Q8_K / Q8_0
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.95


def test_eval_gate_takes_the_gguf(kq, bundled):
    _, _, ios = kq
    report = ev.evaluate(bundled, gguf_file(ios), max_chunks=4)
    assert report["quant"]["runtime"] == "llama.cpp" and np.isfinite(report["drift"])
    assert ev.gate(report, 0.05) is None and ev.gate(report, -1.0) is not None


def test_gptq_below_rtn_on_the_mixes(kq, bundled, tmp_path):
    """Per module type, GPTQ's output error on the calibration activations is below RTN's on the same block grids."""
    import json

    fmt, q, _ = kq
    b = mixed(bundled, tmp_path / "rtn", fmt, method="rtn")
    rep = {k: json.loads((d / "quant_report.json").read_text())["layers"] for k, d in (("gptq", q), ("rtn", b))}
    for m in LINEARS:
        g = sum(layer["modules"][m]["rel_error"] for layer in rep["gptq"])
        r = sum(layer["modules"][m]["rel_error"] for layer in rep["rtn"])
        assert g < r, (m, g, r)


@pytest.mark.parametrize("target", ["onnx", "android"])
def test_targets_without_block_scales_refuse(kq, tmp_path, target):
    from minicpm_edge.export.mlc import export_mlc
    from minicpm_edge.export.onnx import export_onnx

    _, q, _ = kq
    with pytest.raises(UserError, match="two-level block scales"):
        (export_onnx if target == "onnx" else export_mlc)(q, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("embedding", ["q8_0", "q6_k"])
def test_embedding_types(bundled_gptq, tmp_path, embedding):
    out = export_ios(bundled_gptq, tmp_path / embedding, embedding=embedding)
    t = next(t for t in gguf.GGUFReader(gguf_file(out)).tensors if t.name == "token_embd.weight")
    assert t.tensor_type.name == embedding.upper()
    table = Checkpoint(bundled_gptq).embedding()
    back = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(table.shape)
    # no further from the table than llama.cpp's own quantiser of that type gets
    from minicpm_edge.runtimes.ggml_quant import ggml_quantize

    ref = gguf.quants.dequantize(ggml_quantize(table.numpy(), t.tensor_type.name), t.tensor_type).reshape(table.shape)
    assert np.linalg.norm(back - table.numpy()) <= np.linalg.norm(ref - table.numpy())
    ids = Tokenizer(bundled_gptq / "tokenizer.model").encode(TEXT)
    a, b = open_runner(bundled_gptq).logits(ids), open_runner(out).logits(ids)
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.9


def test_q6_k_embedding_needs_rows_of_256(tmp_path):
    from conftest import quantized, small_variant

    q = quantized(small_variant(tmp_path / "m"), tmp_path / "q", method="rtn")  # hidden 128
    with pytest.raises(UserError, match="not a multiple of Q6_K's block of 256"):
        export_ios(q, tmp_path / "out", embedding="q6_k")
    assert not (tmp_path / "out").exists()
