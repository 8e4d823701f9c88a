import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from minicpm_edge.cli import BUNDLED_MODEL

TINY = {"architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm", "vocab_size": 300, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 16, "rms_norm_eps": 1e-5, "torch_dtype": "float32"}


def random_state(cfg: dict, seed: int = 0, lm_head: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = cfg.get("kv_channels") or cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * d, cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * d
    sd = {"model.embed_tokens.weight": torch.randn(v, h, generator=g) * 0.1,
          "model.norm.weight": 1 + 0.3 * torch.randn(h, generator=g)}
    if cfg.get("kv_lora_rank"):  # MiniCPM3 (MLA): the shapes ModelConfig gives
        from minicpm_edge.model import parse_config

        c = parse_config(cfg)
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            for name, shape in c.linear_shapes().items():
                sd[p + name + ".weight"] = torch.randn(*shape, generator=g) / math.sqrt(shape[1])
            for name, width in c.norm_shapes().items():
                sd[p + name + ".weight"] = 1 + 0.3 * torch.randn(width, generator=g)
        if lm_head:
            sd["lm_head.weight"] = torch.randn(v, h, generator=g) * 0.1
        return sd
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (q, h)), ("self_attn.k_proj", (kv, h)), ("self_attn.v_proj", (kv, h)),
                            ("self_attn.o_proj", (h, q)), ("mlp.gate_proj", (inter, h)), ("mlp.up_proj", (inter, h)),
                            ("mlp.down_proj", (h, inter))):
            sd[p + name + ".weight"] = torch.randn(*shape, generator=g) / math.sqrt(shape[1])
        for name in ("input_layernorm", "post_attention_layernorm"):
            sd[p + name + ".weight"] = 1 + 0.3 * torch.randn(h, generator=g)
    if lm_head:
        sd["lm_head.weight"] = torch.randn(v, h, generator=g) * 0.1
    return sd


def write_checkpoint(path: Path, cfg: dict, state: dict, fmt: str = "safetensors", shards: int = 1) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    names = list(state)
    parts = [names[i::shards] for i in range(shards)]
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for k, part in enumerate(parts, 1):
        fname = f"{stem}.{ext}" if shards == 1 else f"{stem}-{k:05d}-of-{shards:05d}.{ext}"
        tensors = {n: state[n].contiguous() for n in part}
        if fmt == "safetensors":
            save_file(tensors, str(path / fname))
        else:
            torch.save(tensors, path / fname)
        weight_map.update({n: fname for n in part})
    if shards > 1:
        (path / f"{stem}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


@pytest.fixture
def tiny_ckpt(tmp_path):
    return write_checkpoint(tmp_path / "tiny", TINY, random_state(TINY))


@pytest.fixture(scope="session")
def bundled():
    return BUNDLED_MODEL


def small_variant(path: Path, seed: int = 0, **overrides) -> Path:
    """A random small MiniCPM that uses the bundled tokenizer (vocab 4096), with config keys overridden.

    E.g. small_variant(p, num_key_value_heads=8) for MHA, small_variant(p, hidden_act="fatrelu", hidden_act_param=0.03).
    """
    import shutil

    cfg = json.loads((BUNDLED_MODEL / "config.json").read_text())
    cfg.update({"hidden_size": 128, "intermediate_size": 320, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 4, "torch_dtype": "float32"})
    cfg.update(overrides)
    write_checkpoint(path, cfg, random_state(cfg, seed=seed, lm_head=not cfg.get("tie_word_embeddings", True)))
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(BUNDLED_MODEL / name, path / name)
    return path


def quantized(src: Path, out: Path, method: str = "gptq", bits: int = 4, group_size: int = 32, sym: bool = True,
              nsamples: int = 16, seqlen: int = 128, compute: str = "auto") -> Path:
    """A GPTQ checkpoint of `src` made by our quantiser (small calibration, for tests)."""
    from minicpm_edge.quant import QuantSpec
    from minicpm_edge.quant.driver import QuantOptions, quantize_checkpoint

    opts = QuantOptions(spec=QuantSpec(bits, group_size, sym), method=method, nsamples=nsamples, seqlen=seqlen,
                        compute=compute)
    return quantize_checkpoint(src, out, opts)


@pytest.fixture(scope="session")
def bundled_gptq(bundled, tmp_path_factory):
    """The bundled model quantised GPTQ w4 g32 symmetric (shared by the exporter and eval tests)."""
    return quantized(bundled, tmp_path_factory.mktemp("bundled_gptq") / "gptq", nsamples=32, seqlen=256)


def stepwise_logits(model, ids: torch.Tensor, prefix: int):
    """Logits of ids [1, T] from the first `prefix` tokens at once, then one token at a time through the cache;
    returns (logits [1, T, V], the final cache)."""
    with torch.no_grad():
        logits, past = model(ids[:, :prefix])
        parts = [logits]
        for t in range(prefix, ids.shape[1]):
            logits, past = model(ids[:, t:t + 1], past, start=t)
            parts.append(logits)
    return torch.cat(parts, dim=1), past
