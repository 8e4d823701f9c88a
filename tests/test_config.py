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


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["MiniCPM3ForCausalLM"], "model_type": "minicpm3"}, "unsupported architecture"),
    ({"q_lora_rank": 768, "kv_lora_rank": 256}, "MiniCPM3"),
    ({"num_experts": 8}, "mixture-of-experts"),
    ({"architectures": ["MiniCPMV"], "model_type": "minicpmv"}, "unsupported architecture"),
    ({"query_num": 64}, "MiniCPM-V"),
    ({"rope_scaling": {"rope_type": "longrope"}}, "rope_scaling 'longrope'"),
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
