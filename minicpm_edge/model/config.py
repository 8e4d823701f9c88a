"""Parse and validate HF config.json files of MiniCPM and llama-format MiniCPM checkpoints."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UserError
from .rope import RopeScaling, describe as describe_rope, exact_context, parse_rope_scaling

SUPPORTED = ("MiniCPMForCausalLM (MiniCPM-2B, -1B, -S-1B, -2B-128k, MiniCPM4, MiniCPM4.1), MiniCPM3ForCausalLM "
             "(MiniCPM3-4B) and LlamaForCausalLM (llama-format MiniCPM, MiniCPM5)")
# the class to build -> its model_type
CLASSES = {"MiniCPMForCausalLM": "minicpm", "MiniCPM3ForCausalLM": "minicpm3", "LlamaForCausalLM": "llama"}
# families refused by name, with the reason: (substring of the class or model_type, lower case, reason)
FAMILIES = (("moe", "mixture-of-experts models (MiniCPM-MoE-8x2B) are not supported"),
            ("sala", "MiniCPM-SALA (sparse + lightning attention) is not supported"),
            ("minicpmv", "vision/audio models (MiniCPM-V, MiniCPM-o) are not supported"),
            ("minicpmo", "vision/audio models (MiniCPM-V, MiniCPM-o) are not supported"))
ACTIVATIONS = ("silu", "relu", "fatrelu")
REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
# MiniCPM3's multi-head latent attention (MLA): the low-rank query and key/value projections
MLA_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


@dataclass(frozen=True)
class ModelConfig:
    """Everything the forward, the quantiser and the exporters need to know about a checkpoint."""

    arch: str  # "minicpm" / "minicpm3" (muP scales applied at run time) or "llama" (folded into the weights)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # MLA: the query/key head size, qk_nope_head_dim + qk_rope_head_dim
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
    use_mup: bool = True  # MiniCPM4's switch: false means all three muP factors are 1
    rope_scaling: RopeScaling | None = None
    # InfLLM-v2 (MiniCPM4): sparse attention only past sparse_config["dense_len"] tokens; below it attention is the
    # dense attention computed here, and dense attention is what phones run. Recorded, not applied.
    sparse_config: dict | None = None
    # MiniCPM3 (arch "minicpm3"): multi-head latent attention; all 0 for every other model
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    # The three muP factors (FORMATS.md section 0); all 1 for llama-format checkpoints and for use_mup false.
    # (MiniCPM4's mup_denominator is read only by its Eagle draft head: it has no effect on this forward.)
    @property
    def mup(self) -> bool:
        return self.arch in ("minicpm", "minicpm3") and self.use_mup

    @property
    def mla(self) -> bool:
        """Multi-head latent attention (MiniCPM3)."""
        return self.arch == "minicpm3"

    @property
    def rope_dim(self) -> int:
        """The part of each query/key head that is rotated: qk_rope_head_dim for MLA, the whole head otherwise."""
        return self.qk_rope_head_dim if self.mla else self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each Linear of a decoder layer, by its name within the layer, in data-flow order."""
        h, inter, n = self.hidden_size, self.intermediate_size, self.num_attention_heads
        if self.mla:
            attn = {"self_attn.q_a_proj": (self.q_lora_rank, h),
                    "self_attn.kv_a_proj_with_mqa": (self.kv_lora_rank + self.qk_rope_head_dim, h),
                    "self_attn.q_b_proj": (n * self.head_dim, self.q_lora_rank),
                    "self_attn.kv_b_proj": (n * (self.qk_nope_head_dim + self.v_head_dim), self.kv_lora_rank),
                    "self_attn.o_proj": (h, n * self.v_head_dim)}
        else:
            q, kv = n * self.head_dim, self.num_key_value_heads * self.head_dim
            attn = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                    "self_attn.o_proj": (h, q)}
        return {**attn, "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h), "mlp.down_proj": (h, inter)}

    def norm_shapes(self) -> dict[str, int]:
        """Width of each RMSNorm of a decoder layer (MLA adds the two latent norms)."""
        out = {"input_layernorm": self.hidden_size, "post_attention_layernorm": self.hidden_size}
        if self.mla:
            out.update({"self_attn.q_a_layernorm": self.q_lora_rank, "self_attn.kv_a_layernorm": self.kv_lora_rank})
        return out

    @property
    def embedding_scale(self) -> float:
        return self.scale_emb if self.mup else 1.0

    @property
    def residual_scale(self) -> float:
        return self.scale_depth / math.sqrt(self.num_hidden_layers) if self.mup else 1.0

    @property
    def logit_scale(self) -> float:
        """Final hidden states are divided by this before the LM head."""
        if not self.mup or not self.dim_model_base:
            return 1.0
        return self.hidden_size / self.dim_model_base

    @property
    def exact_context(self) -> int:
        """Context length within which fixed-table exports reproduce this model exactly (docs/ROPE.md)."""
        return exact_context(self)

    def notes(self) -> dict:
        """What an artifact records about this model's rotary scaling and sparse attention."""
        out = {"exact_context": self.exact_context}
        if self.rope_scaling is not None:
            out["rope_scaling"] = describe_rope(self)
        if self.sparse_config is not None:
            dense = self.sparse_config.get("dense_len")
            out["sparse_attention"] = (f"InfLLM-v2 sparse_config present: this artifact runs dense attention, exact "
                                       f"where the checkpoint itself is dense (up to dense_len = {dense} tokens)")
        return out

    @property
    def variant(self) -> str:
        gqa = "MLA" if self.mla else "GQA" if self.num_key_value_heads < self.num_attention_heads else "MHA"
        return f"{self.arch} {gqa} {self.hidden_act}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("raw")
        if self.rope_scaling is not None:
            d["rope_scaling"] = describe_rope(self)
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
    arch = _architecture(archs, model_type, source)
    if arch != "minicpm3" and (cfg.get("q_lora_rank") or cfg.get("kv_lora_rank")):
        raise UserError(f"{source}: q_lora_rank / kv_lora_rank (multi-head latent attention) belong to "
                        f"MiniCPM3ForCausalLM, not {archs[0] if archs else model_type}; supported: {SUPPORTED}")
    if any(cfg.get(k) not in (None, 0, 1) for k in ("num_experts", "num_local_experts", "n_routed_experts")):
        raise UserError(f"{source}: mixture-of-experts models (MiniCPM-MoE-8x2B) are not supported; supported: {SUPPORTED}")
    if cfg.get("vision_config") or cfg.get("query_num") or cfg.get("audio_config") or cfg.get("tts_config"):
        raise UserError(f"{source}: vision/audio models (MiniCPM-V, MiniCPM-o) are not supported; supported: {SUPPORTED}")
    if any("lightning" in str(k).lower() for k in cfg):
        raise UserError(f"{source}: lightning (linear) attention (MiniCPM-SALA) is not supported; supported: {SUPPORTED}")
    missing = [k for k in REQUIRED if cfg.get(k) is None]
    if missing:
        raise UserError(f"{source}: missing required key(s) {', '.join(missing)}")
    for k in REQUIRED + ("num_key_value_heads",):
        if k in cfg and cfg[k] is not None and (not isinstance(cfg[k], int) or isinstance(cfg[k], bool)
                                                 or not 0 < cfg[k] < 2**31):
            raise UserError(f"{source}: {k} must be a positive integer (below 2^31), got {cfg[k]!r}")

    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv_heads = _get(cfg, "num_key_value_heads", heads)
    mla = _mla(cfg, hidden, heads, source) if arch == "minicpm3" else {}
    if mla:
        if kv_heads != heads:
            raise UserError(f"{source}: num_key_value_heads {kv_heads} differs from num_attention_heads {heads}; "
                            "MiniCPM3's latent attention expands keys and values for every head")
        cfg = {**cfg, "head_dim": mla["qk_nope_head_dim"] + mla["qk_rope_head_dim"]}
        cfg.pop("kv_channels", None)
    # MiniCPM4 names the head size kv_channels; llama-format configs head_dim. Either may differ from hidden/heads.
    dim_key = "kv_channels" if cfg.get("kv_channels") is not None else "head_dim"
    if cfg.get(dim_key) is None and hidden % heads:
        raise UserError(f"{source}: hidden_size {hidden} is not a multiple of num_attention_heads {heads} "
                        "(and no head_dim / kv_channels is given)")
    head_dim = _number(cfg, dim_key, hidden // heads, source, int, low=1)
    if heads % kv_heads:
        raise UserError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    rope_dim = mla.get("qk_rope_head_dim", head_dim)
    if rope_dim % 2:
        what = "qk_rope_head_dim" if mla else "head_dim"
        raise UserError(f"{source}: {what} {rope_dim} must be even for rotary embeddings")

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
    if arch != "llama" and dim_model_base is not None and (
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
    use_mup = _get(cfg, "use_mup", True)
    if not isinstance(use_mup, bool):
        raise UserError(f"{source}: use_mup must be true or false, got {use_mup!r:.60}")
    sparse = cfg.get("sparse_config")
    if sparse is not None and not isinstance(sparse, dict):
        raise UserError(f"{source}: sparse_config must be an object, got {sparse!r:.60}")
    max_pos = _number(cfg, "max_position_embeddings", 4096, source, int, low=1)
    rope_scaling = parse_rope_scaling(cfg.get("rope_scaling"), head_dim=rope_dim,
                                      max_pos=max_pos, arch=arch, source=source)
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
        max_position_embeddings=max_pos,
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
        use_mup=use_mup,
        rope_scaling=rope_scaling,
        sparse_config=sparse,
        **mla,
        raw=raw,
    )


def _mla(cfg: dict, hidden: int, heads: int, source: str) -> dict:
    """MiniCPM3's latent-attention sizes, checked; v_head_dim defaults to hidden_size / heads as in transformers."""
    if cfg.get("q_lora_rank", 1) is None:
        raise UserError(f"{source}: q_lora_rank null (a dense q_proj instead of q_a_proj / q_b_proj) is not supported; "
                        "every published MiniCPM3 has q_lora_rank 768")
    missing = [k for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim") if k not in cfg]
    if missing:
        raise UserError(f"{source}: MiniCPM3ForCausalLM needs {', '.join(missing)}")
    out = {k: _number(cfg, k, None, source, int, low=1) for k in MLA_KEYS[:4]}
    if cfg.get("v_head_dim") is None and hidden % heads:
        raise UserError(f"{source}: hidden_size {hidden} is not a multiple of num_attention_heads {heads} "
                        "(and no v_head_dim is given)")
    out["v_head_dim"] = _number(cfg, "v_head_dim", hidden // heads, source, int, low=1)
    return out


def _architecture(archs: list, model_type: str | None, source: str) -> str:
    """"minicpm" or "llama": architectures names the class to build; a model_type that contradicts it is refused."""
    name = archs[0] if archs else None
    if name is None and model_type in CLASSES.values():
        return model_type
    if name not in CLASSES:
        what = name or model_type or "no architecture"
        why = next((reason for key, reason in FAMILIES if key in what.lower().replace("-", "").replace("_", "")), None)
        raise UserError(f"{source}: unsupported architecture {what}" + (f": {why}" if why else "")
                        + f"; supported: {SUPPORTED}")
    if len(set(archs)) > 1:
        raise UserError(f"{source}: architectures lists several classes ({', '.join(archs)}); expected one of "
                        f"{', '.join(CLASSES)}")
    if model_type is not None and model_type != CLASSES[name]:
        raise UserError(f"{source}: architectures names {name} but model_type is {model_type!r:.40} "
                        f"(expected {CLASSES[name]!r}); the two contradict each other")
    return CLASSES[name]


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
