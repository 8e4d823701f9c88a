import json
import subprocess
import sys

import pytest

from minicpm_edge.inspect import summarize
from minicpm_edge.model import Checkpoint, Tokenizer
from minicpm_edge.model.synthetic import BUNDLED_TOKENIZER, write_synthetic

EXPECT = {  # FORMATS.md section 0
    "minicpm-2b": dict(hidden_size=2304, intermediate_size=5760, num_attention_heads=36, num_key_value_heads=36,
                       vocab_size=122753, hidden_act="silu", logit_scale=9.0),
    "minicpm-1b": dict(hidden_size=1536, intermediate_size=3840, num_attention_heads=24, num_key_value_heads=8,
                       vocab_size=73440, hidden_act="silu", logit_scale=6.0),
    "minicpm-s-1b": dict(hidden_size=1536, intermediate_size=3840, num_attention_heads=24, num_key_value_heads=8,
                         vocab_size=73440, hidden_act="fatrelu", logit_scale=6.0),
}


OLD = ("minicpm-2b", "minicpm-1b", "minicpm-s-1b")  # the 2024 models: every tensor written at its real shape


@pytest.mark.parametrize("kind", OLD)
def test_synthetic_has_real_shapes(tmp_path, kind):
    out = write_synthetic(kind, tmp_path / kind, layers=1, shard_mb=200)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2  # really sharded
    s = summarize(out)
    c = s["config"]
    for key, value in EXPECT[kind].items():
        got = s["muP"]["logit_scale"] if key == "logit_scale" else c[key]
        assert got == value, key
    assert s["tied"] and s["variant"].startswith("minicpm")
    h, inter, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["head_dim"]
    t = s["tensors"]
    assert t["model.layers.*.self_attn.k_proj.weight"]["shape"] == [kv, h]
    assert t["model.layers.*.mlp.down_proj.weight"]["shape"] == [h, inter]
    assert t["model.embed_tokens.weight"]["shape"] == [c["vocab_size"], h]
    assert s["dtypes"] == {"BF16": s["parameters"]}
    per_layer = 4 * h * h - 2 * h * (h - kv) + 3 * h * inter + 2 * h
    assert s["parameters"] == per_layer + c["vocab_size"] * h + h
    tok, bundled = Tokenizer(out / "tokenizer.model"), Tokenizer(BUNDLED_TOKENIZER)
    assert tok.vocab_size == c["vocab_size"]  # one piece per embedding row, as GGUF and MLC need
    assert tok.encode("Hello 你好 <用户>x<AI> 🚀\n\tx = 1") == bundled.encode("Hello 你好 <用户>x<AI> 🚀\n\tx = 1")


def test_synthetic_cli_and_inspect(tmp_path):
    out = tmp_path / "s1b"
    subprocess.run([sys.executable, "-m", "minicpm_edge.model.synthetic", "minicpm-s-1b", "--out", str(out),
                    "--layers", "1"], check=True, capture_output=True)
    assert Checkpoint(out).config.hidden_act_param == 0.03
    r = subprocess.run([sys.executable, "-m", "minicpm_edge", "inspect", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "MiniCPMForCausalLM" in r.stdout and "fatrelu" in r.stdout and "1536" in r.stdout


# -- the family people ship today: MiniCPM4 / 4.1 (LongRoPE), MiniCPM-2B-128k (dynamic NTK), MiniCPM5 (llama format) --
FAMILY = {  # kind: (vocab for the full-path test (None = real), what export --target android says)
    "minicpm4-0.5b": (None, "rope_scaling longrope is ignored by mlc-llm"),
    "minicpm5-1b": (8192, "head_dim 128 x 16 heads differs from hidden_size 1536"),
    "minicpm3-4b": (4096, "mlc-llm has no MiniCPM3 model"),
}


@pytest.mark.parametrize("kind, q, kv, inter, rope", [
    ("minicpm4-8b", 4096, 256, 16384, "longrope"), ("minicpm4.1-8b", 4096, 256, 16384, "longrope"),
    ("minicpm-2b-128k", 2304, 2304, 5760, "dynamic")])
def test_family_layer_shapes(tmp_path, kind, q, kv, inter, rope):
    """One real-width layer of the big models (vocab cut to keep it small): every shape checked by Checkpoint.
    Their rotary / head size / untied-head paths run end to end at small width in test_export_*."""
    out = write_synthetic(kind, tmp_path / kind, layers=1, vocab=4096)
    s = summarize(out)
    t, h = s["tensors"], s["config"]["hidden_size"]
    assert t["model.layers.*.self_attn.q_proj.weight"]["shape"] == [q, h]
    assert t["model.layers.*.self_attn.k_proj.weight"]["shape"] == [kv, h]
    assert t["model.layers.*.mlp.down_proj.weight"]["shape"] == [h, inter]
    assert t["lm_head.weight"]["shape"] == [4096, h] and not s["tied"]
    notes = s["notes"]
    assert notes["rope_scaling"]["type"] == rope
    if rope == "longrope":
        assert notes["rope_scaling"]["attention_factor"] == 1.0 and "dense_len = 8192" in notes["sparse_attention"]
    else:
        assert notes["exact_context"] == 131072 and s["config"]["rope_theta"] == 1e6


@pytest.mark.slow
@pytest.mark.parametrize("kind", FAMILY)
def test_family_quantizes_and_exports(tmp_path, kind):
    """A 2-layer cut at real width: RTN int4 g32 (GPTQ's column loop at these widths is minutes on this machine;
    the exporters see the same format), then ios (run by llama.cpp), onnx (run by onnxruntime) and android.
    Measured 94 s (0.5B) and 62 s (5-1B) on 2 shared cores at load 10."""
    import numpy as np

    from conftest import quantized
    from minicpm_edge.errors import UserError
    from minicpm_edge.export.ios import export_ios
    from minicpm_edge.export.mlc import export_mlc
    from minicpm_edge.export.onnx import export_onnx
    from minicpm_edge.runtimes import open_runner

    vocab, android = FAMILY[kind]
    src = write_synthetic(kind, tmp_path / kind, layers=2, vocab=vocab)
    q = quantized(src, tmp_path / "q", method="rtn", nsamples=2, seqlen=32)
    ids = Tokenizer(src / "tokenizer.model").encode("Hello 你好, the model family people ship today.")
    ref = open_runner(q).logits(ids)
    for name, out in (("ios", export_ios(q, tmp_path / "ios")), ("onnx", export_onnx(q, tmp_path / "onnx"))):
        got = open_runner(out, n_ctx=256).logits(ids) if name == "ios" else open_runner(out).logits(ids)
        assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max(), name
    with pytest.raises(UserError, match=android):
        export_mlc(q, tmp_path / "android")
