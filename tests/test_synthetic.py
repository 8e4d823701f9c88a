import json
import subprocess
import sys

import pytest

from minicpm_edge.inspect import summarize
from minicpm_edge.model import Checkpoint, Tokenizer
from minicpm_edge.model.synthetic import BUNDLED_TOKENIZER, SHAPES, write_synthetic

EXPECT = {  # FORMATS.md section 0
    "minicpm-2b": dict(hidden_size=2304, intermediate_size=5760, num_attention_heads=36, num_key_value_heads=36,
                       vocab_size=122753, hidden_act="silu", logit_scale=9.0),
    "minicpm-1b": dict(hidden_size=1536, intermediate_size=3840, num_attention_heads=24, num_key_value_heads=8,
                       vocab_size=73440, hidden_act="silu", logit_scale=6.0),
    "minicpm-s-1b": dict(hidden_size=1536, intermediate_size=3840, num_attention_heads=24, num_key_value_heads=8,
                         vocab_size=73440, hidden_act="fatrelu", logit_scale=6.0),
}


@pytest.mark.parametrize("kind", sorted(SHAPES))
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
