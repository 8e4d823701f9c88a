"""MiniCPM3 (multi-head latent attention): config, forward against transformers' MiniCPM3ForCausalLM, KV cache."""

import pytest
import torch

from conftest import random_state, write_checkpoint
from minicpm_edge.errors import UserError
from minicpm_edge.model import Checkpoint, load_model, parse_config

# a tiny MiniCPM3: LongRoPE with different short and long lists and max_position_embeddings > original, so both
# regimes and the attention factor are exercised
MLA = {"architectures": ["MiniCPM3ForCausalLM"], "model_type": "minicpm3", "vocab_size": 300, "hidden_size": 64,
       "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
       "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
       "scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
       "max_position_embeddings": 128, "torch_dtype": "float32",
       "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.3, 2.0, 4.0], "long_factor": [1.0, 2.5, 6.0, 16.0],
                        "original_max_position_embeddings": 32}}


def reference(cfg: dict, state: dict):
    """transformers' MiniCPM3ForCausalLM with the same weights."""
    from transformers import MiniCPM3Config, MiniCPM3ForCausalLM

    r = cfg["rope_scaling"]
    rope = {"rope_type": "longrope", "rope_theta": cfg["rope_theta"], **{k: v for k, v in r.items() if k != "type"}}
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "scale_emb",
            "scale_depth", "dim_model_base", "rms_norm_eps", "max_position_embeddings")
    model = MiniCPM3ForCausalLM(MiniCPM3Config(**{k: cfg[k] for k in keys}, rope_parameters=rope,
                                               tie_word_embeddings=True)).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model


@pytest.fixture(scope="module")
def mla(tmp_path_factory):
    state = random_state(MLA, seed=1)
    return write_checkpoint(tmp_path_factory.mktemp("mla") / "m", MLA, state), state


@pytest.mark.parametrize("T", [20, 50], ids=["short-rope", "long-rope"])
def test_matches_transformers(mla, T):
    path, state = mla
    ours = load_model(Checkpoint(path))
    ref = reference(MLA, state)
    ids = torch.randint(0, MLA["vocab_size"], (2, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ours(ids)[0]
        b = ref(ids).logits
    assert a.abs().max() > 0.5
    assert (a - b).abs().max().item() <= 1e-4
    # the comparison can fail: the other LongRoPE list is visible
    other = {**MLA, "rope_scaling": {**MLA["rope_scaling"], "short_factor": MLA["rope_scaling"]["long_factor"],
                                     "long_factor": MLA["rope_scaling"]["short_factor"]}}
    with torch.no_grad():
        c = reference(other, state)(ids).logits
    assert (a - c).abs().max().item() > 1e-2


def test_latent_cache_matches_full_recompute(mla):
    model = load_model(Checkpoint(mla[0]))
    ids = torch.randint(0, 300, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, _ = model(ids)
        a, past = model(ids[:, :10])
        parts = [a]
        for t in range(10, 30):
            b, past = model(ids[:, t:t + 1], past, start=t)
            parts.append(b)
    assert past[0][0].shape == (1, 30, MLA["kv_lora_rank"]) and past[0][1].shape == (1, 1, 30, 8)
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= 1e-4


def test_config():
    c = parse_config(MLA)
    assert c.mla and c.variant.startswith("minicpm3 MLA") and c.head_dim == 24 and c.rope_dim == 8
    assert c.v_head_dim == 16 and c.embedding_scale == 12 and c.logit_scale == 4
    assert c.linear_shapes()["self_attn.kv_b_proj"] == (4 * (16 + 16), 32)
    assert c.norm_shapes()["self_attn.kv_a_layernorm"] == 32


@pytest.mark.parametrize("change, message", [
    ({"q_lora_rank": None}, "q_lora_rank null"),
    ({"kv_lora_rank": None}, "needs kv_lora_rank"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim 7 must be even"),
    ({"num_key_value_heads": 2}, "differs from num_attention_heads"),
    ({"rope_scaling": {**MLA["rope_scaling"], "short_factor": [1.0] * 8}}, "= 4 numbers, got 8"),
    ({"architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm"}, "belong to MiniCPM3ForCausalLM"),
])
def test_config_refusals(change, message):
    cfg = {k: v for k, v in {**MLA, **change}.items() if v is not None or k == "q_lora_rank"}
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        parse_config(cfg)
