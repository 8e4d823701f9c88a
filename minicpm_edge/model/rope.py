"""Rotary position embeddings with the scalings MiniCPM checkpoints ship (docs/ROPE.md).

Every scheme here is "base inverse frequencies divided by one factor per frequency, cos/sin times one attention factor";
the frequencies can depend on the sequence length (dynamic NTK beyond max_position_embeddings, LongRoPE's list choice).
- longrope (MiniCPM4 / 4.1): short_factor / long_factor lists of head_dim/2; attention factor
  sqrt(1 + ln(s) / ln(original)) with s = max_position_embeddings / original_max_position_embeddings when s > 1.
- dynamic (MiniCPM-2B-128k): plain rotary up to max_position_embeddings; beyond, the base grows with the length.
- linear: positions divided by `factor`; llama3: Llama 3.1's wavelength-banded factors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import UserError

KINDS = ("longrope", "dynamic", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    kind: str
    factor: float = 1.0
    short_factor: tuple = ()
    long_factor: tuple = ()
    original_max_position_embeddings: int = 0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # which LongRoPE list applies: "openbmb" (MiniCPMForCausalLM's modeling_minicpm.py: the cos/sin cache is built for
    # max(max_position_embeddings, sequence length), long list when that exceeds original) or "transformers"
    # (LlamaForCausalLM run by transformers: long list when the sequence itself exceeds original)
    selection: str = "openbmb"


def parse_rope_scaling(value, *, head_dim: int, max_pos: int, arch: str, source: str) -> RopeScaling | None:
    """config.json's rope_scaling as a RopeScaling (None for plain rotary), or a one-line UserError."""
    if value is None or value == {}:
        return None
    if not isinstance(value, dict):
        raise UserError(f"{source}: rope_scaling must be an object or null, got {value!r:.60}")
    kind = value.get("rope_type") or value.get("type")
    if kind == "default":
        return None
    if kind not in KINDS:
        raise UserError(f"{source}: rope_scaling {kind!r:.40} is not supported; supported: {', '.join(KINDS)} "
                        "or none (plain rotary)")
    selection = "openbmb" if arch == "minicpm" else "transformers"
    if kind == "longrope":
        orig = value.get("original_max_position_embeddings")
        if isinstance(orig, bool) or not isinstance(orig, int) or not 0 < orig < 2**31:
            raise UserError(f"{source}: rope_scaling longrope needs original_max_position_embeddings, a positive "
                            f"integer, got {orig!r:.60}")
        if max_pos < orig:
            raise UserError(f"{source}: max_position_embeddings {max_pos} is below rope_scaling's "
                            f"original_max_position_embeddings {orig}; LongRoPE only extends a context")
        lists = {k: _factors(value.get(k), k, head_dim, source) for k in ("short_factor", "long_factor")}
        return RopeScaling("longrope", short_factor=lists["short_factor"], long_factor=lists["long_factor"],
                           original_max_position_embeddings=orig, selection=selection)
    factor = value.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not (
            math.isfinite(factor) and (factor >= 1 if kind != "linear" else factor > 0) and factor < 1e6):
        need = "a number > 0" if kind == "linear" else "a number >= 1"
        raise UserError(f"{source}: rope_scaling {kind} needs factor, {need}, got {factor!r:.60}")
    if kind != "llama3":
        return RopeScaling(kind, factor=float(factor), selection=selection)
    low, high = value.get("low_freq_factor", 1.0), value.get("high_freq_factor", 4.0)
    orig = value.get("original_max_position_embeddings", 8192)
    ok = all(not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) and x > 0
             for x in (low, high, orig)) and high > low and float(orig).is_integer()
    if not ok:
        raise UserError(f"{source}: rope_scaling llama3 needs low_freq_factor < high_freq_factor (positive) and a "
                        f"positive original_max_position_embeddings, got {low!r:.20}, {high!r:.20}, {orig!r:.20}")
    return RopeScaling("llama3", factor=float(factor), low_freq_factor=float(low), high_freq_factor=float(high),
                       original_max_position_embeddings=int(orig), selection=selection)


def _factors(value, key: str, head_dim: int, source: str) -> tuple:
    if not isinstance(value, list) or len(value) != head_dim // 2:
        got = f"{len(value)} values" if isinstance(value, list) else repr(value)[:40]
        raise UserError(f"{source}: rope_scaling {key} must be a list of head_dim/2 = {head_dim // 2} numbers, got {got}")
    if not all(not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) and 0 < x < 1e30
               for x in value):
        raise UserError(f"{source}: rope_scaling {key} must hold positive finite numbers")
    return tuple(float(x) for x in value)


def attention_factor(cfg) -> float:
    """The factor on cos and sin (LongRoPE's sqrt(1 + ln s / ln original)); 1 for every other scheme."""
    r = cfg.rope_scaling
    if r is None or r.kind != "longrope":
        return 1.0
    s = cfg.max_position_embeddings / r.original_max_position_embeddings
    return math.sqrt(1 + math.log(s) / math.log(r.original_max_position_embeddings)) if s > 1 else 1.0


def uses_long_factor(cfg, seq_len: int) -> bool:
    """Whether LongRoPE's long list applies to a sequence of `seq_len` positions (see RopeScaling.selection)."""
    r = cfg.rope_scaling
    length = seq_len if r.selection == "transformers" else max(cfg.max_position_embeddings, seq_len)
    return length > r.original_max_position_embeddings


def base_inv_freq(cfg, theta: float | None = None) -> torch.Tensor:
    d = cfg.rope_dim  # the rotated part of a head (MiniCPM3: qk_rope_head_dim; otherwise the whole head)
    return 1.0 / ((cfg.rope_theta if theta is None else theta) ** (torch.arange(0, d, 2, dtype=torch.float32) / d))


def frequency_factors(cfg, seq_len: int) -> torch.Tensor | None:
    """Per-frequency divisors (float32, rope_dim/2) for a sequence of `seq_len` positions; None for plain rotary.

    Dynamic NTK beyond max_position_embeddings changes the base rather than dividing: it has no factors (None) there
    and inverse_frequencies handles it."""
    r = cfg.rope_scaling
    if r is None or r.kind == "dynamic":
        return None
    if r.kind == "longrope":
        return torch.tensor(r.long_factor if uses_long_factor(cfg, seq_len) else r.short_factor, dtype=torch.float32)
    if r.kind == "linear":
        return torch.full((cfg.rope_dim // 2,), r.factor, dtype=torch.float32)
    # llama3: long wavelengths divided by factor, short ones kept, a smooth blend between
    inv = base_inv_freq(cfg).double()
    wavelen = 2 * math.pi / inv
    orig = r.original_max_position_embeddings
    smooth = ((orig / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)).clamp(0, 1)
    scaled = inv * smooth + inv / r.factor * (1 - smooth)
    return (inv / scaled).float()


def inverse_frequencies(cfg, seq_len: int) -> torch.Tensor:
    """Inverse frequencies (float32, rope_dim/2) used for a sequence of `seq_len` positions."""
    r = cfg.rope_scaling
    if r is not None and r.kind == "dynamic" and seq_len > cfg.max_position_embeddings:
        d = cfg.rope_dim
        theta = cfg.rope_theta * (r.factor * seq_len / cfg.max_position_embeddings - (r.factor - 1)) ** (d / (d - 2))
        return base_inv_freq(cfg, theta)
    inv = base_inv_freq(cfg)
    ff = frequency_factors(cfg, seq_len)
    return inv if ff is None else inv / ff


def exact_context(cfg) -> int:
    """The longest context over which fixed rotary tables (every exporter's) reproduce the forward exactly."""
    r = cfg.rope_scaling
    if (r is not None and r.kind == "longrope" and r.selection == "transformers"
            and r.short_factor != r.long_factor):
        return r.original_max_position_embeddings  # transformers switches lists past original
    return cfg.max_position_embeddings


def describe(cfg) -> dict | None:
    """What artifacts record about the rotary scaling and the context within which they are exact."""
    r = cfg.rope_scaling
    if r is None:
        return None
    out = {"type": r.kind, "exact_up_to": exact_context(cfg)}
    if r.kind == "longrope":
        out.update(original_max_position_embeddings=r.original_max_position_embeddings,
                   attention_factor=attention_factor(cfg),
                   list_used="long" if uses_long_factor(cfg, exact_context(cfg)) else "short", selection=r.selection)
    else:
        out["factor"] = r.factor
    if r.kind == "dynamic":
        out["note"] = ("dynamic NTK: plain rotary up to max_position_embeddings; beyond it the base grows with the "
                       "sequence, which fixed tables cannot follow")
    return out
