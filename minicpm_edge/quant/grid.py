"""The quantisation grid and GPTQ v1 packing: the one place every module takes these numbers from.

Grid: per group of `group_size` input columns, value = scale * (code - zero), codes 0..2^bits-1.
Symmetric grids use zero = 2^(bits-1) (8 for int4), the GPTQ convention that Q4_0, MLC q4f16 and MatMulNBits share.
Packing (FORMATS.md section 1): qweight int32 [K*bits/32, N] packed along K, qzeros int32 [groups, N*bits/32] packed
along N, lowest bits first; format v1 stores zero - 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError

BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128, -1)


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 32  # -1: one group per output channel (per-channel)
    sym: bool = True

    def __post_init__(self):
        if self.bits not in BITS:
            raise UserError(f"--bits {self.bits} is not supported; choose one of {', '.join(map(str, BITS))}")
        if self.group_size not in GROUP_SIZES:
            raise UserError(f"--group-size {self.group_size} is not supported; choose 32, 64, 128 or -1 (per channel)")

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    def groups(self, k: int) -> int:
        return 1 if self.group_size == -1 else k // self.group_size

    def group_len(self, k: int) -> int:
        return k if self.group_size == -1 else self.group_size

    def check_k(self, k: int, name: str = "weight") -> None:
        if self.group_size != -1 and k % self.group_size:
            raise UserError(f"{name}: group size {self.group_size} does not divide the input dimension {k}")
        if (k * self.bits) % 32:
            raise UserError(f"{name}: input dimension {k} x {self.bits} bits is not a whole number of 32-bit words")


def find_params(w: torch.Tensor, spec: QuantSpec, mse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero per row of w [rows, cols]. Scales are rounded to fp16 (what checkpoints store)."""
    w = w.float()
    maxq = spec.maxq
    lo = torch.minimum(w.min(dim=1).values, torch.zeros(1))
    hi = torch.maximum(w.max(dim=1).values, torch.zeros(1))
    scale, zero = _params(lo, hi, spec)
    if mse:
        best = torch.full_like(scale, float("inf"))
        for i in range(int(0.8 * 100)):  # shrink the range by up to 80% in 1% steps, keep the lowest |err|^2.4
            p = 1 - i / 100
            s, z = _params(p * lo, p * hi, spec)
            q = torch.clamp(torch.round(w / s[:, None]) + z[:, None], 0, maxq)
            err = (s[:, None] * (q - z[:, None]) - w).abs().pow(2.4).sum(1)
            better = err < best
            best = torch.where(better, err, best)
            scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def _params(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    maxq = spec.maxq
    if spec.sym:
        amax = torch.maximum(lo.abs(), hi)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        scale = (hi - lo) / maxq
        zero = None
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # all-zero rows
    scale = scale.half().float()
    scale = torch.where(scale == 0, torch.full_like(scale, 2.0 ** -24), scale)  # fp16 underflow
    if zero is None:
        zero = torch.clamp(torch.round(-lo / scale), 0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


# -- GPTQ v1 packing -----------------------------------------------------------------------------------------------
def _pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ints [R, C] along R into int32 [R*bits/32, C], lowest bits holding the first element (any of 2/3/4/8)."""
    r, c = values.shape
    v = values.to(torch.int64)
    out = torch.zeros((r * bits + 31) // 32, c, dtype=torch.int64)
    for i in range(r):
        bit = i * bits
        word, off = divmod(bit, 32)
        out[word] |= (v[i] << off) & 0xFFFFFFFF
        if off + bits > 32:  # 3-bit values straddle words (AutoGPTQ layout)
            out[word + 1] |= v[i] >> (32 - off)
    return _to_int32(out)


def _unpack_rows(packed: torch.Tensor, bits: int, r: int) -> torch.Tensor:
    p = packed.to(torch.int64) & 0xFFFFFFFF
    mask = (1 << bits) - 1
    out = torch.empty(r, p.shape[1], dtype=torch.int64)
    for i in range(r):
        word, off = divmod(i * bits, 32)
        v = p[word] >> off
        if off + bits > 32:
            v = v | (p[word + 1] << (32 - off))
        out[i] = v & mask
    return out


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    x = x & 0xFFFFFFFF
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def pack_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [N, K] -> qweight int32 [K*bits/32, N]."""
    if bits in (2, 4, 8):
        return _pack_fast(codes.t().contiguous(), bits)
    return _pack_rows(codes.t(), bits)


def unpack_qweight(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """qweight int32 [K*bits/32, N] -> codes uint8 [N, K]."""
    if bits in (2, 4, 8):
        return _unpack_fast(qweight, bits, k).t().contiguous().to(torch.uint8)
    return _unpack_rows(qweight, bits, k).t().contiguous().to(torch.uint8)


def pack_qzeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """True zero points [groups, N] -> qzeros int32 [groups, N*bits/32] holding zero - 1 (format v1)."""
    z = (zeros.to(torch.int64) - 1) & ((1 << bits) - 1)
    if bits in (2, 4, 8):
        return _pack_fast(z.t().contiguous(), bits).t().contiguous()
    return _pack_rows(z.t(), bits).t().contiguous()


def unpack_qzeros(qzeros: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """qzeros int32 [groups, N*bits/32] (v1) -> true zero points int32 [groups, N]."""
    if bits in (2, 4, 8):
        z = _unpack_fast(qzeros.t().contiguous(), bits, n).t()
    else:
        z = _unpack_rows(qzeros.t(), bits, n).t()
    return ((z + 1) & ((1 << bits) - 1)).to(torch.int32).contiguous()


def _pack_fast(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] -> int32 [R*bits/32, C] for bit widths that divide 32."""
    per = 32 // bits
    r, c = values.shape
    v = values.to(torch.int64).view(r // per, per, c)
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
    return _to_int32((v << shifts).sum(dim=1))


def _unpack_fast(packed: torch.Tensor, bits: int, r: int) -> torch.Tensor:
    per = 32 // bits
    p = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
    return ((p.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1, p.shape[1])[:r]


def make_g_idx(k: int, spec: QuantSpec) -> torch.Tensor:
    return (torch.arange(k, dtype=torch.int32) // spec.group_len(k)).to(torch.int32)
