"""Our forward against transformers' GraniteForCausalLM, which computes MiniCPM's muP math."""

import math

import pytest
import torch
from transformers import GraniteConfig, GraniteForCausalLM

from conftest import TINY, random_state, write_checkpoint
from minicpm_edge.model import Checkpoint, load_layer, load_model
from minicpm_edge.model.forward import rope_tables

MHA = {**TINY, "num_key_value_heads": 4}
GQA = TINY


def granite(cfg: dict, state: dict, residual_multiplier=None) -> GraniteForCausalLM:
    L, h = cfg["num_hidden_layers"], cfg["hidden_size"]
    g = GraniteConfig(
        vocab_size=cfg["vocab_size"], hidden_size=h, intermediate_size=cfg["intermediate_size"], num_hidden_layers=L,
        num_attention_heads=cfg["num_attention_heads"], num_key_value_heads=cfg["num_key_value_heads"],
        rms_norm_eps=cfg["rms_norm_eps"], rope_theta=10000.0, max_position_embeddings=512, hidden_act="silu",
        embedding_multiplier=float(cfg["scale_emb"]),
        residual_multiplier=residual_multiplier or cfg["scale_depth"] / math.sqrt(L),
        logits_scaling=h / cfg["dim_model_base"], attention_multiplier=1 / math.sqrt(h // cfg["num_attention_heads"]),
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False)
    model = GraniteForCausalLM(g).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model


@pytest.mark.parametrize("cfg", [MHA, GQA], ids=["MHA", "GQA"])
def test_matches_granite(tmp_path, cfg):
    state = random_state(cfg, seed=1)
    ours = load_model(Checkpoint(write_checkpoint(tmp_path / "m", cfg, state)))
    ref = granite(cfg, state)
    ids = torch.randint(0, cfg["vocab_size"], (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, _ = ours(ids)
        b = ref(ids).logits
    assert a.abs().max() > 0.5  # logits are not trivially small
    assert (a - b).abs().max().item() <= 1e-4
    # the comparison can fail: a wrong residual multiplier is visible
    with torch.no_grad():
        c = granite(cfg, state, residual_multiplier=1.0)(ids).logits
    assert (a - c).abs().max().item() > 1e-2


def test_kv_cache_matches_full_recompute(tmp_path):
    model = load_model(Checkpoint(write_checkpoint(tmp_path / "m", GQA, random_state(GQA))))
    ids = torch.randint(0, 300, (1, 24))
    with torch.no_grad():
        full, _ = model(ids)
        a, past = model(ids[:, :10])
        parts = [a]
        for t in range(10, 24):
            logits, past = model(ids[:, t:t + 1], past, start=t)
            parts.append(logits)
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5


def test_piecewise_streaming_equals_whole(tmp_path):
    ckpt = Checkpoint(write_checkpoint(tmp_path / "m", GQA, random_state(GQA)))
    model = load_model(ckpt)
    ids = torch.randint(0, 300, (2, 16))
    cos, sin = rope_tables(ckpt.config, torch.arange(16))
    with torch.no_grad():
        h = model.embed(ids)
        for i in range(ckpt.config.num_hidden_layers):
            h, _ = load_layer(ckpt, i)(h, cos, sin)
        assert torch.equal(model.head(h), model(ids)[0])


@pytest.mark.parametrize("act, param", [("relu", 0.0), ("fatrelu", 0.03)])
def test_relu_family(tmp_path, act, param):
    cfg = {**GQA, "hidden_act": act, "hidden_act_param": param}
    model = load_model(Checkpoint(write_checkpoint(tmp_path / "m", cfg, random_state(cfg))))
    mlp = model.layers[0].mlp
    g = torch.tensor([-1.0, 0.0, 0.02, 0.03, 0.031, 2.0])
    expect = {"relu": [0, 0, 0.02, 0.03, 0.031, 2.0], "fatrelu": [0, 0, 0, 0, 0.031, 2.0]}[act]
    assert torch.allclose(mlp.activation(g), torch.tensor(expect))


def test_llama_format_equals_minicpm_with_folded_scales(tmp_path):
    """A llama-format variant (muP folded into weights, untied head) computes the same function."""
    state = random_state(GQA, seed=3)
    minicpm = load_model(Checkpoint(write_checkpoint(tmp_path / "a", GQA, state)))
    L = GQA["num_hidden_layers"]
    r = GQA["scale_depth"] / math.sqrt(L)
    folded = dict(state)
    folded["model.embed_tokens.weight"] = state["model.embed_tokens.weight"] * GQA["scale_emb"]
    folded["lm_head.weight"] = state["model.embed_tokens.weight"] / (GQA["hidden_size"] / GQA["dim_model_base"])
    for i in range(L):
        for n in ("self_attn.o_proj", "mlp.down_proj"):
            folded[f"model.layers.{i}.{n}.weight"] = state[f"model.layers.{i}.{n}.weight"] * r
    cfg = {**GQA, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    llama = load_model(Checkpoint(write_checkpoint(tmp_path / "b", cfg, folded)))
    ids = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        assert (minicpm(ids)[0] - llama(ids)[0]).abs().max().item() < 1e-4
