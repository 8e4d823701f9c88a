"""Parse and validate HF config.json files of MiniCPM and llama-format MiniCPM checkpoints."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UserError

SUPPORTED = "MiniCPMForCausalLM (MiniCPM-2B, MiniCPM-1B, MiniCPM-S-1B) and LlamaForCausalLM (llama-format MiniCPM)"
ACTIVATIONS = ("silu", "relu", "fatrelu")
REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


@dataclass(frozen=True)
class ModelConfig:
    """Everything the forward, the quantiser and the exporters need to know about a checkpoint."""

    arch: str  # "minicpm" (muP scales applied at run time) or "llama" (folded into the weights)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    hidden_act: str = "silu"
    hidden_act_param: float = 0.0
    scale_emb: float = 1.0
    scale_depth: float = 1.0
    dim_model_base: int | None = None
    tie_word_embeddings: bool = True
    bos_token_id: int = 1
    eos_token_id: int = 2
    torch_dtype: str = "bfloat16"
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    # The three muP factors (FORMATS.md section 0); all 1 for llama-format checkpoints.
    @property
    def embedding_scale(self) -> float:
        return self.scale_emb if self.arch == "minicpm" else 1.0

    @property
    def residual_scale(self) -> float:
        return self.scale_depth / math.sqrt(self.num_hidden_layers) if self.arch == "minicpm" else 1.0

    @property
    def logit_scale(self) -> float:
        """Final hidden states are divided by this before the LM head."""
        if self.arch != "minicpm" or not self.dim_model_base:
            return 1.0
        return self.hidden_size / self.dim_model_base

    @property
    def variant(self) -> str:
        gqa = "GQA" if self.num_key_value_heads < self.num_attention_heads else "MHA"
        return f"{self.arch} {gqa} {self.hidden_act}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("raw")
        return d


def _get(cfg: dict, key: str, default=None):
    value = cfg.get(key, default)
    return default if value is None else value


def parse_config(cfg: dict, *, has_lm_head: bool | None = None, source: str = "config.json") -> ModelConfig:
    """Validate a config.json dict. `has_lm_head` says whether the checkpoint holds lm_head.weight."""
    raw = cfg
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise UserError(f"{source}: architectures must be a list of names, got {archs!r}")
    if model_type is not None and not isinstance(model_type, str):
        raise UserError(f"{source}: model_type must be a name, got {model_type!r}")
    if "MiniCPMForCausalLM" in archs or model_type == "minicpm":
        arch = "minicpm"
    elif "LlamaForCausalLM" in archs or model_type == "llama":
        arch = "llama"
    else:
        name = ", ".join(archs) or model_type or "no architecture"
        raise UserError(f"{source}: unsupported architecture {name}; supported: {SUPPORTED}")
    if cfg.get("q_lora_rank") or cfg.get("kv_lora_rank"):
        raise UserError(f"{source}: multi-head latent attention (MiniCPM3) is not supported; supported: {SUPPORTED}")
    if any(cfg.get(k) not in (None, 0, 1) for k in ("num_experts", "num_local_experts", "n_routed_experts")):
        raise UserError(f"{source}: mixture-of-experts models are not supported; supported: {SUPPORTED}")
    if cfg.get("vision_config") or cfg.get("query_num"):
        raise UserError(f"{source}: vision-language models (MiniCPM-V) are not supported; supported: {SUPPORTED}")
    if cfg.get("rope_scaling"):
        kind = cfg["rope_scaling"].get("rope_type") or cfg["rope_scaling"].get("type") if isinstance(cfg["rope_scaling"], dict) else cfg["rope_scaling"]
        raise UserError(f"{source}: rope_scaling {kind!r} is not implemented; only plain rotary (rope_scaling null) is supported")
    missing = [k for k in REQUIRED if cfg.get(k) is None]
    if missing:
        raise UserError(f"{source}: missing required key(s) {', '.join(missing)}")
    for k in REQUIRED + ("num_key_value_heads",):
        if k in cfg and cfg[k] is not None and (not isinstance(cfg[k], int) or isinstance(cfg[k], bool)
                                                 or not 0 < cfg[k] < 2**31):
            raise UserError(f"{source}: {k} must be a positive integer (below 2^31), got {cfg[k]!r}")

    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv_heads = _get(cfg, "num_key_value_heads", heads)
    head_dim = _number(cfg, "head_dim", hidden // heads, source, int, low=1)
    if head_dim * heads != hidden:
        raise UserError(f"{source}: hidden_size {hidden} is not num_attention_heads {heads} x head_dim {head_dim}")
    if heads % kv_heads:
        raise UserError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if head_dim % 2:
        raise UserError(f"{source}: head_dim {head_dim} must be even for rotary embeddings")

    act = str(_get(cfg, "hidden_act", "silu")).lower()
    if act not in ACTIVATIONS:
        raise UserError(f"{source}: hidden_act {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    act_param = _number(cfg, "hidden_act_param", 0.0, source)

    # Old MiniCPM configs lack tie_word_embeddings: the checkpoint decides (no lm_head.weight means tied).
    declared = cfg.get("tie_word_embeddings")
    if has_lm_head is None:
        tied = True if declared is None else bool(declared)
    elif has_lm_head:
        tied = False  # an explicit head is used even when the config claims tying
    else:
        if declared is False:
            raise UserError(f"{source}: tie_word_embeddings is false but the checkpoint has no lm_head.weight")
        tied = True

    dim_model_base = cfg.get("dim_model_base")
    if arch == "minicpm" and dim_model_base is not None and (
            isinstance(dim_model_base, bool) or not isinstance(dim_model_base, (int, float))
            or not 0 < dim_model_base < 1e300 or not math.isfinite(dim_model_base)):
        raise UserError(f"{source}: dim_model_base must be positive, got {dim_model_base!r:.60}")
    eos = _get(cfg, "eos_token_id", 2)
    if isinstance(eos, list):
        if not eos:
            raise UserError(f"{source}: eos_token_id is an empty list")
        cfg = {**cfg, "eos_token_id": eos[0]}  # the first is the one written to the artifacts
    if cfg.get("pad_token_id") is not None:
        _number(cfg, "pad_token_id", 0, source, int, low=0)
    dtype = _get(cfg, "torch_dtype", "bfloat16")
    if not isinstance(dtype, str):
        raise UserError(f"{source}: torch_dtype must be a name such as bfloat16, got {dtype!r}")
    return ModelConfig(
        arch=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=_number(cfg, "max_position_embeddings", 4096, source, int, low=1),
        rms_norm_eps=_number(cfg, "rms_norm_eps", 1e-6, source, low=0),
        rope_theta=_number(cfg, "rope_theta", 10000.0, source, positive=True),
        hidden_act=act,
        hidden_act_param=act_param,
        scale_emb=_number(cfg, "scale_emb", 1.0, source),
        scale_depth=_number(cfg, "scale_depth", 1.0, source),
        dim_model_base=dim_model_base,
        tie_word_embeddings=tied,
        bos_token_id=_number(cfg, "bos_token_id", 1, source, int, low=0),
        eos_token_id=_number(cfg, "eos_token_id", 2, source, int, low=0),
        torch_dtype=dtype,
        raw=raw,
    )


def _number(cfg: dict, key: str, default, source: str, kind=float, low: float | None = None, positive: bool = False):
    """cfg[key] (default when absent or null) as a finite `kind`, at least `low` (or > 0 when `positive`)."""
    value = _get(cfg, key, default)
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and abs(value) < 1e300 and math.isfinite(value)
    if ok and kind is int:  # the artifacts store these as 32-bit integers
        ok = float(value).is_integer() and abs(value) < 2**31
    if ok and ((low is not None and value < low) or (positive and value <= 0)):
        ok = False
    if not ok:
        what = "a whole number (below 2^31)" if kind is int else "a number"
        bound = f" >= {low}" if low is not None else " > 0" if positive else ""
        raise UserError(f"{source}: {key} must be {what}{bound}, got {value!r:.60}")
    return kind(value)


def read_config_json(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{model_dir}: no config.json (expected a Hugging Face checkpoint directory)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"{path}: not valid JSON ({str(e)[:160]})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a JSON object")
    return cfg
