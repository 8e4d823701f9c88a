"""Our forward against transformers' GraniteForCausalLM, which computes MiniCPM's muP math."""

import math

import pytest
import torch
from transformers import GraniteConfig, GraniteForCausalLM

import numpy as np

from conftest import TINY, random_state, stepwise_logits, write_checkpoint
from minicpm_edge.model import Checkpoint, load_layer, load_model, parse_config
from minicpm_edge.model.forward import rope_tables

MHA = {**TINY, "num_key_value_heads": 4}
GQA = TINY


def granite(cfg: dict, state: dict, residual_multiplier=None, rope_parameters=None) -> GraniteForCausalLM:
    """transformers' Granite with MiniCPM's muP mapping (the factors 1 when use_mup is false), head size, untied head
    and rope scaling taken from a MiniCPM config dict."""
    L, h = cfg["num_hidden_layers"], cfg["hidden_size"]
    mup = cfg.get("use_mup", True)
    head_dim = cfg.get("kv_channels") or h // cfg["num_attention_heads"]
    tied = cfg.get("tie_word_embeddings", True)
    rope = {"rope_type": "default", "rope_theta": cfg.get("rope_theta", 10000.0)}
    scaling = cfg.get("rope_scaling")
    if scaling:
        rope = {**rope, **scaling, "rope_type": scaling.get("rope_type") or scaling["type"]}
        rope.pop("type", None)
    g = GraniteConfig(
        vocab_size=cfg["vocab_size"], hidden_size=h, intermediate_size=cfg["intermediate_size"], num_hidden_layers=L,
        num_attention_heads=cfg["num_attention_heads"], num_key_value_heads=cfg["num_key_value_heads"],
        rms_norm_eps=cfg["rms_norm_eps"], rope_parameters=rope_parameters or rope,
        max_position_embeddings=cfg.get("max_position_embeddings", 512), hidden_act="silu",
        embedding_multiplier=float(cfg["scale_emb"]) if mup else 1.0,
        residual_multiplier=residual_multiplier or (cfg["scale_depth"] / math.sqrt(L) if mup else 1.0),
        logits_scaling=h / cfg["dim_model_base"] if mup else 1.0, attention_multiplier=1 / math.sqrt(head_dim),
        head_dim=head_dim, tie_word_embeddings=tied, attention_bias=False, mlp_bias=False)
    model = GraniteForCausalLM(g).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if tied else set())
    if tied:
        model.tie_weights()
    return model


def logits_pair(tmp_path, cfg, T, seed=1, **granite_kw):
    """(ours, Granite's) logits on the same random ids of length T."""
    state = random_state(cfg, seed=seed, lm_head=cfg.get("tie_word_embeddings") is False)
    ours = load_model(Checkpoint(write_checkpoint(tmp_path / f"m{T}", cfg, state)))
    ids = torch.randint(0, cfg["vocab_size"], (1, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return ours(ids)[0], granite(cfg, state, **granite_kw)(ids).logits


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
    stepped, _ = stepwise_logits(model, ids, 10)
    assert (stepped - full).abs().max().item() < 1e-5


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
    assert torch.equal(mlp.activation(g.clone(), inplace=True), mlp.activation(g))


@pytest.mark.parametrize("act", ["silu", "relu", "fatrelu"])
def test_mlp_hidden_in_place_without_autograd_is_the_same(tmp_path, act):
    """Without autograd the MLP makes act(gate) * up in gate's output; bit-identical to the autograd path's."""
    cfg = {**GQA, "hidden_act": act, "hidden_act_param": 0.01}
    mlp = load_model(Checkpoint(write_checkpoint(tmp_path / "m", cfg, random_state(cfg)))).layers[0].mlp
    x = torch.randn(3, 5, cfg["hidden_size"])
    with torch.no_grad():
        fast = mlp.hidden(x)
    slow = mlp.hidden(x)
    assert slow.requires_grad and torch.equal(fast, slow.detach())


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


# -- rope scaling, MiniCPM4 keys: against transformers' Granite (longrope / dynamic) and a numpy OpenBMB reference ----
SHORT = [1.0 + 0.05 * i for i in range(8)]  # head_dim 16 -> 8 values each; the two lists differ a lot
LONG = [1.0 + 1.5 * i for i in range(8)]


def longrope(max_pos, original):
    return {**TINY, "max_position_embeddings": max_pos, "rope_scaling": {
        "rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
        "original_max_position_embeddings": original}}


@pytest.mark.parametrize("max_pos, original, T", [
    (64, 64, 40),    # short regime: both use short_factor, attention factor 1
    (128, 64, 100),  # long regime: both use long_factor, attention factor sqrt(1 + ln 2 / ln 64)
    (64, 64, 80),    # past max_position_embeddings: OpenBMB regrows its cache with long_factor, transformers too
], ids=["short", "long", "beyond-max-pos"])
def test_longrope_matches_granite(tmp_path, max_pos, original, T):
    cfg = longrope(max_pos, original)
    a, b = logits_pair(tmp_path, cfg, T)
    assert a.abs().max() > 0.5
    assert (a - b).abs().max().item() <= 1e-4
    # the list matters: the same model with the lists swapped is visibly different
    swapped = {**cfg["rope_scaling"], "short_factor": LONG, "long_factor": SHORT}
    _, c = logits_pair(tmp_path / "swap", {**cfg, "rope_scaling": swapped}, T)
    assert (a - c).abs().max().item() > 1e-2


def openbmb_tables(cfg, seq_len):
    """cos/sin as OpenBMB's MiniCPMLongRoPE computes them (numpy, float64): a cache of max(max_pos, seq_len) rows,
    long_factor when that exceeds original, cos/sin times sqrt(1 + ln(max_pos / original) / ln(original))."""
    r, d = cfg["rope_scaling"], cfg["hidden_size"] // cfg["num_attention_heads"]
    max_pos, orig = cfg["max_position_embeddings"], r["original_max_position_embeddings"]
    inv = 1.0 / (10000.0 ** (np.arange(0, d, 2) / d))
    cache = max(max_pos, seq_len)
    ext = np.array(r["long_factor"] if cache > orig else r["short_factor"])
    freqs = np.outer(np.arange(cache), 1.0 / ext) * inv
    emb = np.concatenate([freqs, freqs], axis=-1)
    scale = math.sqrt(1 + math.log(max_pos / orig) / math.log(orig))
    return np.cos(emb)[:seq_len] * scale, np.sin(emb)[:seq_len] * scale


def test_longrope_openbmb_regime_differs_from_transformers(tmp_path):
    """max_pos > original, sequence <= original: OpenBMB uses long_factor, transformers short_factor. Ours follows
    OpenBMB: checked against Granite running on the numpy OpenBMB tables instead of its own rotary."""
    cfg, T = longrope(128, 64), 40
    cos, sin = openbmb_tables(cfg, T)
    ours_cos, ours_sin = rope_tables(parse_config(cfg), torch.arange(T))
    assert np.abs(ours_cos.numpy() - cos).max() < 1e-4 and np.abs(ours_sin.numpy() - sin).max() < 1e-4
    state = random_state(cfg, seed=1)
    ours = load_model(Checkpoint(write_checkpoint(tmp_path / "m", cfg, state)))
    ref = granite(cfg, state)
    ids = torch.randint(0, cfg["vocab_size"], (1, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ours(ids)[0]
        transformers_logits = ref(ids).logits
        table = (torch.tensor(cos, dtype=torch.float32), torch.tensor(sin, dtype=torch.float32))
        ref.model.rotary_emb.forward = lambda x, position_ids, *args, **kw: (table[0][position_ids], table[1][position_ids])
        b = ref(ids).logits
    assert (a - b).abs().max().item() <= 1e-4
    assert (a - transformers_logits).abs().max().item() > 1e-2  # the two rules really differ here


def test_longrope_attention_factor_and_kv_cache(tmp_path):
    cfg = longrope(1024, 512)
    assert round(rope_tables(parse_config(cfg), torch.arange(1))[0][0, 0].item(), 3) == 1.054  # cos(0) x factor
    model = load_model(Checkpoint(write_checkpoint(tmp_path / "m", longrope(128, 64), random_state(TINY))))
    ids = torch.randint(0, 300, (1, 30))
    with torch.no_grad():
        full, _ = model(ids)
        a, past = model(ids[:, :20])
        b, _ = model(ids[:, 20:], past, start=20)
    assert (torch.cat([a, b], 1) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("T", [24, 48], ids=["within-max-pos", "beyond-max-pos"])
def test_dynamic_ntk_matches_granite(tmp_path, T):
    cfg = {**TINY, "max_position_embeddings": 32, "rope_theta": 1e6, "rope_scaling": {"type": "dynamic", "factor": 4.0}}
    a, b = logits_pair(tmp_path, cfg, T)
    assert (a - b).abs().max().item() <= 1e-4
    plain, _ = logits_pair(tmp_path / "plain", {**cfg, "rope_scaling": None}, T)
    if T <= 32:  # exact plain rotary up to max_position_embeddings
        assert (a - plain).abs().max().item() < 1e-5
    else:
        assert (a - plain).abs().max().item() > 1e-3


@pytest.mark.parametrize("use_mup", [True, False])
def test_minicpm4_head_dim_untied_mup_switch(tmp_path, use_mup):
    """kv_channels (head size != hidden / heads), an untied head with muP, and use_mup false (all factors 1)."""
    cfg = {**TINY, "kv_channels": 32, "tie_word_embeddings": False, "use_mup": use_mup, "mup_denominator": 8}
    a, b = logits_pair(tmp_path, cfg, 20)
    assert a.abs().max() > 0.5 and (a - b).abs().max().item() <= 1e-4
    other, _ = logits_pair(tmp_path / "other", {**cfg, "use_mup": not use_mup}, 20)
    assert (a - other).abs().max().item() > 1e-2


@pytest.mark.parametrize("past", [0, 37])
@pytest.mark.parametrize("kv_heads", [3, 1])
def test_blocked_causal_attention_is_full_causal_attention(past, kv_heads):
    """Long prompts attend in blocks of queries, each over the keys up to its last query: the same attention as one
    call with the whole causal mask, across block edges and after a cache of `past` positions; with fewer key/value
    heads than query heads (GQA), each shared by its query heads as if repeated."""
    import math

    import torch.nn.functional as F

    from minicpm_edge.model.forward import QUERY_BLOCK, causal_attention

    g = torch.Generator().manual_seed(0)
    T = 2 * QUERY_BLOCK + 45
    S = T + past
    q = torch.randn(2, 3, T, 16, generator=g)
    k, v = torch.randn(2, kv_heads, S, 16, generator=g), torch.randn(2, kv_heads, S, 16, generator=g)
    mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    rep = 3 // kv_heads
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask,
                                          scale=1 / math.sqrt(16))
    got = causal_attention(q, k, v, 1 / math.sqrt(16))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    one = causal_attention(q[:, :, -1:], k, v, 1 / math.sqrt(16))  # a decode step sees every key
    torch.testing.assert_close(one, want[:, :, -1:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_is_the_rotate_half_formula_bit_for_bit(dtype):
    """apply_rope works in x cos's halves; it computes x cos + [-x2, x1] sin exactly as written (also on a slice of
    the last axis, as MLA's rotary part)."""
    from minicpm_edge.model.forward import apply_rope

    g = torch.Generator().manual_seed(0)
    cos, sin = (torch.randn(5, 16, generator=g).to(dtype) for _ in range(2))
    whole, wider = torch.randn(2, 3, 5, 16, generator=g), torch.randn(2, 3, 5, 24, generator=g)
    for x in (whole.to(dtype), wider.to(dtype)[..., 8:]):
        x1, x2 = x.chunk(2, dim=-1)
        assert torch.equal(apply_rope(x, cos, sin), x * cos + torch.cat([-x2, x1], dim=-1) * sin)


@pytest.mark.parametrize("wdt, xdt", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                      (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_rms_norm_in_place_without_autograd_is_the_same(wdt, xdt):
    """Without autograd the norm scales by its weight in place where the result type allows; same bits and dtype."""
    from minicpm_edge.model.forward import RMSNorm

    norm = RMSNorm(64, 1e-5)
    norm.weight.data = torch.randn(64, generator=torch.Generator().manual_seed(1)).to(wdt)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2)).to(xdt)
    slow = norm(x)
    with torch.no_grad():
        fast = norm(x)
    assert slow.requires_grad and slow.dtype == fast.dtype and torch.equal(slow.detach(), fast)
