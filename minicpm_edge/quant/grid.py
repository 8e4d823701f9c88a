"""The quantisation grid and GPTQ v1 packing: the one place every module takes these numbers from.

Grid: per group of `group_size` input columns, value = scale * (code - zero), codes 0..2^bits-1.
Symmetric grids use zero = 2^(bits-1) (8 for int4), the GPTQ convention that Q4_0, MLC q4f16 and MatMulNBits share.
Scales are rounded to fp16 when they are found, since fp16 is what checkpoints store.
Packing (FORMATS.md section 1): qweight int32 [K*bits/32, N] packed along K, qzeros int32 [groups, N*bits/32] packed
along N, lowest bits first; format v1 stores zero - 1. 3-bit values form one little-endian bit stream across words
(value i at bits 3i..3i+2 of each run of 96 bits), which is the word layout AutoGPTQ's 3-bit pack loop produces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError

BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128, -1)
MSE_NORM, MSE_GRID, MSE_MAXSHRINK = 2.4, 100, 0.8  # clipping search, as in the GPTQ reference quantiser
FP16_MAX = 65504.0


@dataclass(frozen=True)
class QuantSpec:
    """Bits, group size along K (-1: one group per output channel) and symmetric or asymmetric grid."""

    bits: int = 4
    group_size: int = 32
    sym: bool = True

    def __post_init__(self):
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise UserError(f"--bits {self.bits} is not supported; choose one of {', '.join(map(str, BITS))}")
        if isinstance(self.group_size, bool) or self.group_size not in GROUP_SIZES:
            raise UserError(f"--group-size {self.group_size} is not supported; choose 32, 64, 128 or -1 (per channel)")

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    def groups(self, k: int) -> int:
        return 1 if self.group_size == -1 else k // self.group_size

    def group_len(self, k: int) -> int:
        return k if self.group_size == -1 else self.group_size

    def check_k(self, k: int, name: str = "weight") -> None:
        """Refuse an input dimension the grid or the int32 packing cannot hold."""
        if self.group_size != -1 and k % self.group_size:
            raise UserError(f"{name}: group size {self.group_size} does not divide the input dimension {k}")
        if (k * self.bits) % 32:
            raise UserError(f"{name}: input dimension {k} x {self.bits} bits is not a whole number of 32-bit words")


def find_params(w: torch.Tensor, spec: QuantSpec, mse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp16-representable float32) and zero (integral float32) per row of w [rows, cols].

    The range always includes 0. With `mse`, the range is shrunk by up to 80% in 1% steps and the shrink with the
    lowest sum |error|^2.4 is kept, per row.
    """
    w = w.float()
    lo = w.min(dim=1).values.clamp(max=0)
    hi = w.max(dim=1).values.clamp(min=0)
    scale, zero = _params(lo, hi, spec)
    if not mse:
        return scale, zero
    best = torch.full_like(scale, float("inf"))
    for i in range(int(MSE_MAXSHRINK * MSE_GRID)):
        p = 1 - i / MSE_GRID
        s, z = _params(p * lo, p * hi, spec)
        q = quantize_codes(w, s[:, None], z[:, None], spec.maxq)
        err = (dequantize(q, s[:, None], z[:, None]) - w).abs().pow(MSE_NORM).sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def _params(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    maxq = spec.maxq
    scale = 2 * torch.maximum(-lo, hi) / maxq if spec.sym else (hi - lo) / maxq
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # all-zero rows: any scale, codes land on zero
    scale = scale.clamp(max=FP16_MAX).half().float()
    scale = torch.where(scale == 0, torch.full_like(scale, 2.0 ** -24), scale)  # fp16 underflow: smallest subnormal
    if spec.sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        # Zero points stay in 1..maxq: GPTQ v1 stores zero - 1, and AutoGPTQ-style readers add 1 back without
        # wrapping, so a zero of 0 (stored as maxq) would read as maxq + 1. Such groups (nothing below 0 worth a
        # step) get zero 1 and a scale stretched to keep their maximum on the grid.
        zero = torch.round(-lo / scale)
        low = zero < 1
        if low.any():
            stretched = (hi / (maxq - 1)).clamp(max=FP16_MAX).half().float()
            stretched = torch.where(stretched == 0, torch.ones_like(stretched), stretched)
            scale = torch.where(low, stretched, scale)
        zero = torch.clamp(zero, 1, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (as float) clamp(round(w / scale) + zero, 0, maxq); scale and zero broadcast against w."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def make_g_idx(k: int, group: int | QuantSpec, device: str | torch.device | None = None) -> torch.Tensor:
    """Group of each of the k input columns for contiguous groups (group size, -1 for one group, or a spec)."""
    size = group.group_len(k) if isinstance(group, QuantSpec) else (k if group == -1 else group)
    return torch.div(torch.arange(k, device=device), size, rounding_mode="floor").to(torch.int32)


# -- GPTQ v1 packing -----------------------------------------------------------------------------------------------
def pack_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [N, K] (0..2^bits-1) -> qweight int32 [K*bits/32, N], packed along K, first element in the lowest bits."""
    return _pack(codes.t(), bits)


def unpack_qweight(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """qweight int32 [K*bits/32, N] -> codes uint8 [N, K]."""
    return _unpack(qweight, bits, k).t().contiguous().to(torch.uint8)


def pack_qzeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """True zero points [groups, N] -> qzeros int32 [groups, N*bits/32] holding zero - 1 (format v1), packed along N.

    A zero of 0 is stored as 2^bits - 1 (wrapped); `unpack_qzeros` reads it back as 0, but AutoGPTQ-style v1 readers
    add 1 without wrapping and see 2^bits, so asymmetric checkpoints with zero 0 are exact only for v1-aware readers
    that wrap (or in format v2).
    """
    z = (zeros.to(torch.int64) - 1) & ((1 << bits) - 1)
    return _pack(z.t(), bits).t().contiguous()


def unpack_qzeros(qzeros: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """qzeros int32 [groups, N*bits/32] (format v1) -> true zero points int32 [groups, N]."""
    z = _unpack(qzeros.t(), bits, n).t()
    return ((z + 1) & ((1 << bits) - 1)).to(torch.int32).contiguous()


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise UserError(f"{bits}-bit packing is not supported; choose one of {', '.join(map(str, BITS))}")


def _pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Ints [R, C] -> int32 [R*bits/32, C]: column c is one bit stream, element r at bits r*bits (little-endian)."""
    _check_bits(bits)
    r, c = values.shape
    if (r * bits) % 32:
        raise UserError(f"{r} values of {bits} bits do not fill whole 32-bit words")
    v = values.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 1 << bits):
        raise ValueError(f"codes outside 0..{(1 << bits) - 1} cannot be packed in {bits} bits")
    if 32 % bits == 0:
        per = 32 // bits
        shifts = (torch.arange(per, device=v.device) * bits).view(1, per, 1)
        return _to_int32((v.view(r // per, per, c) << shifts).sum(dim=1))
    out = torch.zeros(r * bits // 32, c, dtype=torch.int64, device=v.device)
    for i in range(r):  # 3-bit: some values straddle two words
        word, off = divmod(i * bits, 32)
        out[word] |= (v[i] << off) & 0xFFFFFFFF
        if off + bits > 32:
            out[word + 1] |= v[i] >> (32 - off)
    return _to_int32(out)


def _unpack(packed: torch.Tensor, bits: int, r: int) -> torch.Tensor:
    """int32 [W, C] -> int64 [r, C], the inverse of `_pack`."""
    _check_bits(bits)
    if r * bits > packed.shape[0] * 32:
        raise UserError(f"{packed.shape[0]} packed words cannot hold {r} values of {bits} bits")
    p = packed.to(torch.int64) & 0xFFFFFFFF
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        per = 32 // bits
        shifts = (torch.arange(per, device=p.device) * bits).view(1, per, 1)
        return ((p.unsqueeze(1) >> shifts) & mask).reshape(-1, p.shape[1])[:r]
    out = torch.empty(r, p.shape[1], dtype=torch.int64, device=p.device)
    for i in range(r):
        word, off = divmod(i * bits, 32)
        v = p[word] >> off
        if off + bits > 32:
            v = v | (p[word + 1] << (32 - off))
        out[i] = v & mask
    return out


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 -> the same bits as int32 (two's complement)."""
    x = x & 0xFFFFFFFF
    return torch.where(x >= 2 ** 31, x - 2 ** 32, x).to(torch.int32)
