"""The quantisation grid and GPTQ v1 packing: the one place every module takes these numbers from.

Grid: per group of `group_size` input columns, value = scale * (code - zero), codes 0..2^bits-1.
Symmetric grids use zero = 2^(bits-1) (8 for int4), the GPTQ convention that Q4_0, MLC q4f16 and MatMulNBits share;
the scale is signed, so all 2^bits levels serve the group's largest magnitude (value = -8 * scale at code 0).
Scales are rounded to fp16 when they are found, since fp16 is what checkpoints store.
Packing (FORMATS.md section 1): qweight int32 [K*bits/32, N] packed along K, qzeros int32 [groups, N*bits/32] packed
along N, lowest bits first; format v1 stores zero - 1. 3-bit values form one little-endian bit stream across words
(value i at bits 3i..3i+2 of each run of 96 bits), which is the word layout AutoGPTQ's 3-bit pack loop produces.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..errors import UserError
from . import kernels

BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128, -1)
MSE_NORM, MSE_GRID, MSE_MAXSHRINK = 2.4, 100, 0.8  # clipping search, as in the GPTQ reference quantiser
SEARCHES = ("weighted", "mse", "max")  # how find_params picks each group's scale (and zero)
# the weighted search's candidates: these multiples of the max-based scale, steps of 0.04 (steps of 0.02 lowered the
# weighted error by 0.03% for twice the time)
SEARCH_RANGE, SEARCH_STEPS = (0.7, 1.1), 11
CHUNK = 1 << 20  # weights per find_params call in group_params on the torch path (4 MiB of float32)
FP16_MAX = kernels.FP16_MAX


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


def find_params(w: torch.Tensor, spec: QuantSpec, search: str = "weighted",
                importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp16-representable float32) and zero (integral float32) per row of w [rows, cols].

    The max-based grid: symmetric d = (the row's signed value of largest magnitude) / -2^(bits-1), so that value gets
    code 0 and every one of the 2^bits levels is used (llama.cpp's Q4_0 rule; d is negative when that value is
    positive); asymmetric covers [min, max] (always including 0). `search`:
    - "weighted" (default): the scale in SEARCH_RANGE x the max-based one (SEARCH_STEPS candidates, each also refined by
      weighted least squares on its codes, every candidate rounded to fp16 before it is judged) with the lowest
      sum importance * error^2 per row; `importance` (broadcast against w) is the Hessian diagonal of each column, as
      llama.cpp's imatrix, or uniform when None. Asymmetric grids also try the zero point one step either side.
    - "mse": the GPTQ reference quantiser's unweighted clipping search (range shrunk by up to 80% in 1% steps, lowest
      sum |error|^2.4).
    - "max": the max-based grid as it is.
    """
    if search not in SEARCHES:
        raise UserError(f"grid search {search!r}: choose {', '.join(SEARCHES)}")
    w = w.float()
    if search == "weighted" and kernels.usable(w):  # compiled: the whole search per row in one pass
        imp = _row_importance(importance, *w.shape)
        if imp is not None:
            scale, zero = kernels.weighted_params(w.contiguous(), imp, spec.sym, spec.maxq, _multiples())
            return scale[0], zero[0]
    lo, hi = torch.aminmax(w, dim=1)  # one pass for both
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale, zero = _params(lo, hi, spec)
    if search == "max":
        return scale, zero
    if search == "weighted":
        return _weighted_search(w, spec, lo, hi, scale, zero, importance)
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


def group_params(w: torch.Tensor, spec: QuantSpec, search: str = "weighted",
                 importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """find_params for every contiguous group of w [N, K] in one pass: (scales, zeros), each [groups, N].
    `importance` [K]: each column's weight in the search (the Hessian diagonal), or None."""
    n, k = w.shape
    glen, groups = spec.group_len(k), spec.groups(k)
    if search == "weighted" and kernels.usable(w):  # compiled: every group of every row in place, no copies
        imp = torch.ones(1, 1, glen) if importance is None else importance.float().reshape(groups, 1, glen)
        return kernels.weighted_params(w.contiguous(), imp.contiguous(), spec.sym, spec.maxq, _multiples())
    by_group = w.reshape(n, groups, glen).transpose(0, 1)  # [groups, N, glen], a view
    imp = None if importance is None else importance.float().reshape(groups, 1, glen)
    step = max(1, CHUNK // (glen * n))  # groups per find_params call: about CHUNK weights, copied out as rows
    with one_thread(w.device):  # elementwise work per chunk
        parts = [find_params(by_group[a:a + step].reshape(-1, glen), spec, search,
                             None if imp is None else imp[a:a + step].expand(-1, n, -1).reshape(-1, glen))
                 for a in range(0, groups, step)]
    return torch.cat([p[0] for p in parts]).view(groups, n), torch.cat([p[1] for p in parts]).view(groups, n)


@contextmanager
def flush_denormals():
    """Float32 values below 2^-126 (denormals) read and computed as 0 inside (the CPU's flush-to-zero mode, torch's
    set_flush_denormal): far below anything a Hessian or a weight holds, while some CPUs take microcode assists per
    denormal operand. The Cholesky factorisation and inverse of a MiniCPM-2B down_proj Hessian measured 2.2 -> 1.6 s.
    The mode as it was is restored on leaving."""
    was = bool((torch.tensor([1e-39]) * 1.0).item() == 0)  # already flushing: a denormal reads as 0
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was)


@contextmanager
def one_thread(device: torch.device):
    """torch on one CPU thread inside: for loops of small operations, where more threads only add synchronisation
    (and, on a busy machine, wait for a descheduled worker at every operation: the weighted search on 2 threads
    under load measured 8x slower than on 1)."""
    n = torch.get_num_threads()
    if device.type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _weighted_search(w, spec, lo, hi, scale, zero, importance):
    """The "weighted" search of find_params: (scale, zero) per row, never worse than the max-based grid it starts at.

    A candidate (s, z) with codes d (centred: q - z) has weighted error sum imp*(w - s*d)^2 = C - 2*s*A + s^2*B with
    A = sum imp*w*d, B = sum imp*d^2 and C = sum imp*w^2 per row. One rounding per candidate gives A and B, which
    judge the candidate and also its codes' least-squares scale A / B (fp16): judged on the codes it was fitted to,
    an upper bound of its own rounding's error, so the refit costs no second rounding (the weighted error measured
    +0.06% symmetric / -1.5% asymmetric against judging each refit on its own codes, for 0.65-0.7x the time).
    The sums are float32 over a group, combined in float64; a candidate must win by more than their rounding
    (1e-6 C) to replace the best. Candidates are offered in order: the max-based grid, the multiples of it, then
    (asymmetric) the best zero point one step either side. Torch operations on all rows at once: the reference of
    kernels.weighted_params, which find_params and group_params run instead for float32 CPU tensors (one pass per
    group, no temporaries), and the path on other devices.
    """
    w = w.contiguous()
    imp = torch.ones_like(w) if importance is None else importance.float().expand_as(w).contiguous()
    iw = imp * w
    C = torch.linalg.vecdot(iw, w, dim=-1).double()
    margin = 1e-6 * C
    best = torch.full_like(C, float("inf"))
    p = _multiples().to(w.device)

    def offers():  # [R, c] candidates in turn; the zero steps read the best (scale, zero) found before them
        S, Z = _params(lo[:, None] * p, hi[:, None] * p, spec)
        yield torch.cat([scale[:, None], S], 1), torch.cat([zero[:, None], Z], 1)
        if not spec.sym:  # the zero point one step either side of the best so far, in 1..maxq (see _params)
            for step in (-1, 1):
                yield scale[:, None], torch.clamp(zero + step, 1, spec.maxq)[:, None]

    for S, Z in offers():
        S, Z = S.contiguous(), Z.contiguous()
        A, B = _centred_sums(w, imp, iw, S, Z, spec.maxq)
        refit = _fp16_scale(torch.where(B > 0, A / B.clamp(min=1e-30), S.double()).float(), S)
        best, scale, zero = _choose(C, margin, S, refit, Z, A, B, best, scale, zero)
    return scale, zero


def _multiples() -> torch.Tensor:
    """The weighted search's candidate scales as multiples of the max-based one (float32 [SEARCH_STEPS])."""
    lo_p, hi_p = SEARCH_RANGE
    return torch.tensor([lo_p + (hi_p - lo_p) * i / (SEARCH_STEPS - 1) for i in range(SEARCH_STEPS)])


def _row_importance(importance: torch.Tensor | None, rows: int, cols: int) -> torch.Tensor | None:
    """find_params' importance (None, one per column, or one per weight of w [rows, cols]) as the compiled search's
    [1, 1 or rows, cols]; None for any other broadcastable shape (the torch search takes those)."""
    if importance is None:
        return torch.ones(1, 1, cols)
    t = importance.float()
    if t.dim() == 1 and t.shape[0] == cols or t.dim() == 2 and t.shape[1] == cols and t.shape[0] in (1, rows):
        return t.reshape(1, -1, cols).contiguous()
    return None


def _centred_sums(w, imp, iw, S, Z, maxq):
    """For each candidate column j of S, Z [R, c]: A = sum iw d, B = sum imp d^2 over the row's centred codes
    d = clamp(round(w / s) + z, 0, maxq) - z (float32 sums, as float64) [R, c]. Torch operations: the reference of
    the sums in kernels.weighted_params."""
    d, idd = torch.empty_like(w), torch.empty_like(w)
    A, B = torch.empty(S.shape, dtype=torch.float64, device=w.device), torch.empty_like(S, dtype=torch.float64)
    for j in range(S.shape[1]):
        s, z = S[:, j], Z[:, j]
        torch.mul(w, (1 / s)[:, None], out=d).round_().add_(z[:, None]).clamp_(0, maxq).sub_(z[:, None])
        A[:, j] = torch.linalg.vecdot(iw, d, dim=-1)
        B[:, j] = torch.linalg.vecdot(torch.mul(imp, d, out=idd), d, dim=-1)
    return A, B


def _choose(C, margin, S, refit, Z, A, B, best, scale, zero):
    """Offer each candidate j (S[:, j], then refit[:, j], both with Z[:, j]) in turn: a row takes it where its error
    C - 2 s A + s^2 B is below the best so far by more than the margin. Returns (best, scale, zero); the reference
    of the choice in kernels.weighted_params."""
    for j in range(S.shape[1]):
        for cand in (S[:, j], refit[:, j]):
            c = cand.double()
            err = C - 2 * c * A[:, j] + c * c * B[:, j]
            better = err < best - margin
            best = torch.where(better, err, best)
            scale, zero = torch.where(better, cand, scale), torch.where(better, Z[:, j], zero)
    return best, scale, zero


def _fp16_scale(scale: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """scale rounded to fp16; 0 (all-zero rows) becomes 1 and fp16 underflow the smallest subnormal of `sign`'s sign."""
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    s = scale.clamp(-FP16_MAX, FP16_MAX).half().float()
    return torch.where(s == 0, torch.where(sign < 0, -(2.0 ** -24), 2.0 ** -24), s)


def _params(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    maxq = spec.maxq
    if spec.sym:
        half = (maxq + 1) // 2
        extreme = torch.where(-lo >= hi, lo, hi)  # signed value of largest magnitude: it gets code 0
        scale = _fp16_scale(extreme / -half, -extreme)
        return scale, torch.full_like(scale, half)
    scale = _fp16_scale((hi - lo) / maxq, hi - lo)
    # Zero points stay in 1..maxq: GPTQ v1 stores zero - 1, and AutoGPTQ-style readers add 1 back without
    # wrapping, so a zero of 0 (stored as maxq) would read as maxq + 1. Such groups (nothing below 0 worth a
    # step) get zero 1 and a scale stretched to keep their maximum on the grid.
    zero = torch.round(-lo / scale)
    low = zero < 1
    if low.any():
        scale = torch.where(low, _fp16_scale(hi / (maxq - 1), hi), scale)
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
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 1 << bits):
        raise ValueError(f"codes outside 0..{(1 << bits) - 1} cannot be packed in {bits} bits")
    if 32 % bits == 0:  # each word ORed together in int32 from the values' own (narrow) type: no int64 temporaries
        per = 32 // bits  # (a shift into the sign bit gives the word's two's-complement bit pattern)
        v = values.contiguous().view(r // per, per, c)
        out = v[:, 0].to(torch.int32)
        for j in range(1, per):
            out |= v[:, j].to(torch.int32) << (j * bits)
        return out
    v = values.to(torch.int64)
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
