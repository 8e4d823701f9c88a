import math

import pytest

from minicpm_edge.errors import UserError
from minicpm_edge.model import parse_config
from minicpm_edge.model.synthetic import SHAPES


def test_real_configs_parse_with_formats_facts():
    c2 = parse_config(SHAPES["minicpm-2b"], has_lm_head=False)
    assert (c2.hidden_size, c2.intermediate_size, c2.num_attention_heads, c2.num_key_value_heads) == (2304, 5760, 36, 36)
    assert (c2.num_hidden_layers, c2.vocab_size, c2.head_dim) == (40, 122753, 64)
    assert c2.embedding_scale == 12 and c2.logit_scale == 9
    assert math.isclose(c2.residual_scale, 1.4 / math.sqrt(40))
    c1 = parse_config(SHAPES["minicpm-1b"], has_lm_head=False)
    assert (c1.num_attention_heads, c1.num_key_value_heads, c1.logit_scale) == (24, 8, 6)
    s = parse_config(SHAPES["minicpm-s-1b"], has_lm_head=False)
    assert s.hidden_act == "fatrelu" and s.hidden_act_param == 0.03


def test_old_config_defaults():
    cfg = dict(SHAPES["minicpm-2b"])
    assert "rope_theta" not in cfg and "tie_word_embeddings" not in cfg
    c = parse_config(cfg, has_lm_head=False)
    assert c.rope_theta == 10000.0 and c.tie_word_embeddings
    assert not parse_config(cfg, has_lm_head=True).tie_word_embeddings


def test_llama_format_has_no_runtime_mup_scales():
    cfg = {**SHAPES["minicpm-2b"], "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    c = parse_config(cfg, has_lm_head=True)
    assert c.arch == "llama" and not c.tie_word_embeddings
    assert (c.embedding_scale, c.residual_scale, c.logit_scale) == (1.0, 1.0, 1.0)


LONGROPE = {"rope_type": "longrope", "short_factor": [1.0] * 32, "long_factor": [2.0] * 32,
            "original_max_position_embeddings": 4096}


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["MiniCPM3ForCausalLM"], "model_type": "minicpm3"}, "MiniCPM3ForCausalLM needs q_lora_rank"),
    ({"q_lora_rank": 768, "kv_lora_rank": 256}, "belong to MiniCPM3ForCausalLM"),
    ({"num_experts": 8}, "mixture-of-experts"),
    ({"architectures": ["MiniCPMV"], "model_type": "minicpmv"}, "unsupported architecture"),
    ({"query_num": 64}, "MiniCPM-V"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling 'yarn' is not supported"),
    ({"rope_scaling": {"rope_type": "longrope"}}, "original_max_position_embeddings"),
    ({"rope_scaling": LONGROPE | {"short_factor": [1.0] * 31}}, "head_dim/2 = 32 numbers, got 31"),
    ({"rope_scaling": LONGROPE | {"long_factor": [1.0] * 31 + [0.0]}}, "positive finite"),
    ({"rope_scaling": LONGROPE | {"long_factor": [1.0] * 31 + [True]}}, "positive finite"),
    ({"rope_scaling": LONGROPE | {"original_max_position_embeddings": 8192}}, "below rope_scaling's original"),
    ({"rope_scaling": {"type": "dynamic"}}, "needs factor"),
    ({"rope_scaling": {"type": "dynamic", "factor": 0.5}}, "needs factor, a number >= 1"),
    ({"rope_scaling": "longrope"}, "must be an object"),
    ({"architectures": ["MiniCPM3ForCausalLM"], "model_type": "minicpm"}, "contradict"),
    ({"architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm3"}, "contradict"),
    ({"architectures": ["LlamaForCausalLM"], "model_type": "minicpm"}, "contradict"),
    ({"architectures": ["MiniCPMMoEForCausalLM"]}, "MiniCPM-MoE-8x2B"),
    ({"num_experts": 8, "num_experts_per_tok": 2}, "MiniCPM-MoE-8x2B"),
    ({"architectures": ["MiniCPMSALAForCausalLM"], "model_type": "minicpm_sala"}, "MiniCPM-SALA"),
    ({"lightning_nh": 32, "lightning_head_dim": 128}, "MiniCPM-SALA"),
    ({"architectures": ["MiniCPMO"], "model_type": "minicpmo"}, "MiniCPM-o"),
    ({"vision_config": {"hidden_size": 1152}}, "MiniCPM-V"),
    ({"use_mup": "yes"}, "use_mup must be true or false"),
    ({"kv_channels": 0}, "kv_channels must be"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"num_key_value_heads": 5}, "not a multiple"),
    ({"hidden_size": 2300}, "num_attention_heads"),
    ({"vocab_size": -3}, "positive integer"),
    ({"tie_word_embeddings": False}, "no lm_head.weight"),
])
def test_refused_with_one_line(change, message):
    with pytest.raises(UserError) as e:
        parse_config({**SHAPES["minicpm-2b"], **change}, has_lm_head=False)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unsupported_names_what_is_supported():
    with pytest.raises(UserError, match="supported: MiniCPMForCausalLM"):
        parse_config({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 8})


def test_missing_key():
    cfg = dict(SHAPES["minicpm-1b"])
    del cfg["intermediate_size"]
    with pytest.raises(UserError, match="missing required key.*intermediate_size"):
        parse_config(cfg)


def test_longrope_and_dynamic_parse():
    c = parse_config({**SHAPES["minicpm-2b"], "rope_scaling": {**LONGROPE, "rope_type": None, "type": "longrope"},
                      "max_position_embeddings": 8192}, has_lm_head=False)
    r = c.rope_scaling
    assert r.kind == "longrope" and r.original_max_position_embeddings == 4096 and r.selection == "openbmb"
    assert r.short_factor == (1.0,) * 32 and r.long_factor == (2.0,) * 32
    notes = c.notes()["rope_scaling"]
    assert math.isclose(notes["attention_factor"], math.sqrt(1 + math.log(2) / math.log(4096)))
    assert notes["list_used"] == "long" and c.exact_context == 8192  # OpenBMB: long list at every length
    d = parse_config({**SHAPES["minicpm-2b"], "rope_scaling": {"type": "dynamic", "factor": 4.0}}, has_lm_head=False)
    assert d.rope_scaling.kind == "dynamic" and d.rope_scaling.factor == 4.0 and d.exact_context == 4096
    # a llama-format checkpoint is run by transformers, which switches lists by sequence length
    ll = parse_config({**SHAPES["minicpm-2b"], "architectures": ["LlamaForCausalLM"], "model_type": "llama",
                       "rope_scaling": LONGROPE, "max_position_embeddings": 8192}, has_lm_head=True)
    assert ll.rope_scaling.selection == "transformers" and ll.exact_context == 4096
    assert parse_config({**SHAPES["minicpm-2b"], "rope_scaling": {"rope_type": "default"}}).rope_scaling is None


def test_minicpm4_keys():
    cfg = {**SHAPES["minicpm-1b"], "kv_channels": 128, "use_mup": False, "mup_denominator": 32,
           "sparse_config": {"dense_len": 8192, "topk": 64}}
    c = parse_config(cfg, has_lm_head=True)
    assert c.head_dim == 128 and c.head_dim * c.num_attention_heads != c.hidden_size
    assert (c.embedding_scale, c.residual_scale, c.logit_scale) == (1.0, 1.0, 1.0)
    assert not c.tie_word_embeddings
    assert "dense_len = 8192" in c.notes()["sparse_attention"]
    with_mup = parse_config({**cfg, "use_mup": True}, has_lm_head=True)
    assert with_mup.embedding_scale == 12 and with_mup.logit_scale == 6


def test_published_family_configs_parse():
    for kind, (arch, head_dim, tied, rope) in {
            "minicpm4-0.5b": ("minicpm", 64, True, "longrope"), "minicpm4-8b": ("minicpm", 128, False, "longrope"),
            "minicpm4.1-8b": ("minicpm", 128, False, "longrope"), "minicpm-2b-128k": ("minicpm", 64, False, "dynamic"),
            "minicpm5-1b": ("llama", 128, False, None)}.items():
        c = parse_config(SHAPES[kind], has_lm_head=not tied)
        assert (c.arch, c.head_dim, c.tie_word_embeddings) == (arch, head_dim, tied), kind
        assert (c.rope_scaling.kind if c.rope_scaling else None) == rope, kind
    assert parse_config(SHAPES["minicpm4-8b"], has_lm_head=True).sparse_config["dense_len"] == 8192
