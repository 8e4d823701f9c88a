"""llama.cpp's block grids: the K-quants (Q4_K, Q5_K, Q6_K, Q3_K) and the blocks of 32 their mixes fall back to.

Every type here dequantises one run of `sub` weights along K (a sub-block) as value = scale * q - offset with a signed
integer code q in lo..hi, where (ggml-quants.c / gguf-py's quants.py):
- Q4_K / Q5_K: super-blocks of 256 = 8 sub-blocks of 32; scale = d * sc, offset = dmin * m with fp16 d, dmin per
  super-block and 6-bit sc, m (0..63) per sub-block; codes 0..15 / 0..31.
- Q6_K: 16 sub-blocks of 16; scale = d * sc with int8 sc; codes -32..31 (stored q + 32).
- Q3_K: 16 sub-blocks of 16; scale = d * sc with 6-bit signed sc (-32..31); codes -4..3 (stored q + 4).
- Q4_0 / Q5_0 / Q8_0: blocks of 32, scale = fp16 d, codes -8..7 / -16..15 / -128..127; Q5_1: value = d * q + m,
  codes 0..31 (offset = -m).
The products are those of the dequantiser, in float32 ((d * sc) * q - dmin * m), so `BlockGrid.values` is exactly what
llama.cpp and gguf-py read back from `pack`'s bytes.

The grid of a matrix is fixed before GPTQ's error updates (static groups), found by a search weighted by each column's
importance (the Hessian diagonal, as llama.cpp's imatrix): per sub-block the (scale, offset) with the lowest weighted
error, then the super-block's d (and dmin) over a range of candidates, judged on the whole super-block's weighted
error after re-rounding the sub-block scales, and refitted by weighted least squares on the chosen codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError
from . import kernels
from .grid import one_thread

# Scale candidates: multiples of the max-based scale. Coarse to fine where the error is smooth in the scale: a coarse
# range, then FINE steps around each row's best coarse multiple (a 0.01-step grid's resolution for half the tries).
# The K types' d / dmin and Q8_0's d try every SUPER_CANDIDATES multiple: the error of a re-levelled super-block, or
# of fp16 steps at 8 bits, is too rugged for coarse to fine (1-18% more error measured).
CANDIDATES = torch.linspace(0.7, 1.1, 11).tolist()  # sub-block scales, then FINE
SUPER_COARSE = torch.linspace(0.85, 1.1, 9).tolist()  # blocks of 32 up to 5 bits: the fp16 d (and m), then FINE
SUPER_CANDIDATES = torch.linspace(0.85, 1.1, 26).tolist()
FINE = (-0.02, -0.01, 0.01, 0.02)
FP16_MAX = 65504.0
FIT_ELEMENTS = 1 << 20  # weights per slice of rows in fit_grid


@dataclass(frozen=True)
class BlockType:
    name: str
    block: int  # weights per (super-)block along K
    sub: int  # weights sharing one scale (and offset)
    lo: int  # codes lo..hi
    hi: int
    sc: tuple[int, int] | None  # range of the integer sub-block scales; None: the block's d is the scale
    has_min: bool  # an offset per sub-block (dmin * m; Q5_1: -m)
    nbytes: int  # bytes per block

    @property
    def nsub(self) -> int:
        return self.block // self.sub


TYPES = {t.name: t for t in (
    BlockType("Q4_K", 256, 32, 0, 15, (0, 63), True, 144),
    BlockType("Q5_K", 256, 32, 0, 31, (0, 63), True, 176),
    BlockType("Q6_K", 256, 16, -32, 31, (-128, 127), False, 210),
    BlockType("Q3_K", 256, 16, -4, 3, (-32, 31), False, 110),
    BlockType("Q4_0", 32, 32, -8, 7, None, False, 18),
    BlockType("Q5_0", 32, 32, -16, 15, None, False, 22),
    BlockType("Q5_1", 32, 32, 0, 31, None, True, 24),
    BlockType("Q8_0", 32, 32, -128, 127, None, False, 34),
)}


@dataclass
class BlockGrid:
    """The fixed grid of one matrix [N, K]: d (and dmin) [N, K/block] fp16 values as float32, sc (and m) [N, K/sub]."""

    type: BlockType
    d: torch.Tensor
    dmin: torch.Tensor | None
    sc: torch.Tensor | None
    m: torch.Tensor | None

    def __post_init__(self):
        t = self.type
        rep = t.nsub
        d = self.d.repeat_interleave(rep, 1)
        self.scale = d if self.sc is None else d * self.sc.float()  # [N, K/sub], exact in float32
        if not t.has_min:
            self.offset = torch.zeros_like(self.scale)
        else:
            dmin = self.dmin.repeat_interleave(rep, 1)
            self.offset = dmin if self.m is None else dmin * self.m.float()

    def codes(self, w: torch.Tensor, cols: slice | int = slice(None)) -> torch.Tensor:
        """Nearest codes (float) of w [N, k] (or a column [N] when `cols` is an index) on the grid of those columns."""
        s, o = self._at(cols)
        q = torch.round((w + o) / s)
        q = torch.where(s == 0, torch.zeros_like(q), q)
        return q.clamp_(self.type.lo, self.type.hi)

    def values(self, q: torch.Tensor, cols: slice | int = slice(None)) -> torch.Tensor:
        s, o = self._at(cols)
        return s * q - o

    def _at(self, cols):
        sub = self.type.sub
        if isinstance(cols, int):
            return self.scale[:, cols // sub], self.offset[:, cols // sub]
        s, o = self.scale, self.offset
        if cols != slice(None):
            s, o = s[:, cols.start // sub:cols.stop // sub], o[:, cols.start // sub:cols.stop // sub]
        return s.repeat_interleave(sub, 1), o.repeat_interleave(sub, 1)


def block_type(name: str) -> BlockType:
    if name not in TYPES:
        raise UserError(f"GGML type {name!r}: choose {', '.join(TYPES)}")
    return TYPES[name]


def check_k(t: BlockType, k: int, name: str = "weight") -> None:
    if k % t.block:
        raise UserError(f"{name}: input dimension {k} is not a multiple of {t.name}'s blocks of {t.block}")


def fit_grid(w: torch.Tensor, t: BlockType, importance: torch.Tensor | None = None) -> BlockGrid:
    """The weighted-search grid of w [N, K] for type t; importance [K] (Hessian diagonal) or None (uniform).
    Every row is fitted on its own: large matrices go in slices of rows of at most FIT_ELEMENTS weights, whose
    candidate passes stay in cache (2-3x faster on a 3072 x 576 matrix than one pass over all of it)."""
    n, k = w.shape
    check_k(t, k)
    imp = torch.ones(k) if importance is None else importance.float().cpu()
    imp = imp.to(w.device).clamp(min=0)
    if float(imp.sum()) <= 0:
        imp = torch.ones_like(imp)
    parts = -(-w.numel() // FIT_ELEMENTS)
    # many small operations, which torch's threads only slow down (a wake-up each: SmolLM2 Q4_K_M's grid fitting
    # measured 11.1 s on 2 threads, 9.5 s on one); the compiled code sums have threads of their own
    with one_thread(w.device):
        if parts > 1:
            grids = [_fit_rows(p, t, imp) for p in w.split(-(-n // parts))]
            fields = [[getattr(g, f) for g in grids] for f in ("d", "dmin", "sc", "m")]
            return BlockGrid(t, *(None if f[0] is None else torch.cat(f) for f in fields))
        return _fit_rows(w, t, imp)


def _fit_rows(w: torch.Tensor, t: BlockType, imp: torch.Tensor) -> BlockGrid:
    n, k = w.shape
    w = w.float()
    r = n * (k // t.block)
    x = w.reshape(r, t.nsub, t.sub)
    iw = imp.reshape(1, k // t.block, t.nsub, t.sub).expand(n, -1, -1, -1).reshape(r, t.nsub, t.sub)
    s, o = _fit_sub(x.reshape(-1, t.sub), iw.reshape(-1, t.sub), t)
    s, o = s.view(r, t.nsub), o.view(r, t.nsub)
    d, dmin, sc, m = _fit_super(x, iw, s, o, t)
    view = lambda a: None if a is None else a.reshape(n, -1)  # noqa: E731
    return BlockGrid(t, view(d), view(dmin), view(sc), view(m))


def round_table(table: torch.Tensor, name: str, rows: int = 4096):
    """A table [V, K] (embedding or head) rounded to nearest on our grid of GGML type `name`, every column weighted
    alike: (grid, int16 codes) per slice of `rows` rows, so that only one slice is held in float32 at a time."""
    for part in table.split(rows):
        w = part.float()
        grid = fit_grid(w, TYPES[name])
        yield grid, grid.codes(w).to(torch.int16)


def _code_sums(x, iw, iwx, scale, offset, t):
    """Weighted sums over the last axis of the nearest codes q of x [..., L] on scale / offset [...]: Sq (None for
    types without an offset), Sqq, Sqx; iwx = iw * x. With the data's own Sw, Sx, Sxx they give the weighted error of
    value = s q - o for any (s, o) on those codes. Compiled (kernels.code_sums) for float32 CPU tensors."""
    if kernels.usable(x, iw, iwx, scale, offset):
        return kernels.code_sums(x, iw, iwx, scale, offset, t.lo, t.hi, t.has_min)
    inv = torch.where(scale == 0, torch.zeros_like(scale), 1 / scale)[..., None]
    q = (torch.addcmul(offset[..., None] * inv, x, inv) if t.has_min else x * inv).round_().clamp_(t.lo, t.hi)
    dot = lambda a, b: torch.linalg.vecdot(a, b, dim=-1)  # noqa: E731  (no temporary for the product)
    sqx, sq = dot(q, iwx), (dot(q, iw) if t.has_min else None)
    return sq, dot(q.square_(), iw), sqx  # q^2 is exact: one temporary less


def _sq_err(s, o, sums, data):
    """sum iw (s q - o - x)^2 from the code sums and the data sums (sw, sx, sxx)."""
    sq, sqq, sqx = sums
    sw, sx, sxx = data
    if sq is None:  # no offset
        return s * s * sqq - 2 * s * sqx + sxx
    return s * s * sqq - 2 * s * o * sq + o * o * sw - 2 * s * sqx + 2 * o * sx + sxx


def _fit_sub(x, iw, t):
    """Float (scale, offset) per row of x [R, L]: the lowest weighted error over CANDIDATES (then FINE), each refitted
    by weighted least squares on its codes. A try and its refit are judged from one rounding's code sums; the refit,
    judged on the codes it was fitted to, can only gain from re-rounding."""
    iwx = iw * x
    data = iw.sum(1), iwx.sum(1), torch.linalg.vecdot(iwx, x, dim=-1)
    mn, mx = torch.aminmax(x, dim=1)  # one pass for both
    if t.has_min:
        lo = mn.clamp(max=0)
        base_s, base_o = (mx - lo) / (t.hi - t.lo), -lo
    else:
        ext = torch.where(-mn >= mx, mn, mx)
        base_s, base_o = ext / t.lo, torch.zeros_like(ext)  # the signed extreme gets code lo (all levels used)
    best = torch.full_like(base_s, float("inf"))
    s_best, o_best, p_best = base_s.clone(), base_o.clone(), torch.ones_like(base_s)

    def consider(s, o, sums):
        nonlocal best, s_best, o_best
        err = _sq_err(s, o, sums, data)
        better = err < best
        best = torch.where(better, err, best)
        s_best, o_best = torch.where(better, s, s_best), torch.where(better, o, o_best)
        return better

    def attempt(s, o, p):
        """(s, o) and its refit; p: the multiple of the max-based scale they came from."""
        nonlocal p_best
        sums = _code_sums(x, iw, iwx, s, o, t)
        won = consider(s, o, sums)
        sq, sqq, sqx = sums
        if t.has_min:  # value = s q - o
            ns, no = _lsq2(sqq, sq, data[0], sqx, data[1], s, o)
            won |= consider(ns, no.clamp(min=0) if t.sc is not None else no, sums)  # K types: offset >= 0
        else:
            won |= consider(torch.where(sqq > 0, sqx / sqq.clamp(min=1e-30), s), o, sums)
        p_best = torch.where(won, p, p_best)

    def at(p):
        attempt(base_s * p, base_o * p, p)  # the range shrunk (clipped) or widened around 0
        if t.has_min:
            attempt(base_s * p, base_o, p)  # or at its top only

    attempt(base_s, base_o, 1.0)
    if t.hi - t.lo >= 255:  # 8 bits: the max-based scale and its refit suffice
        return s_best, o_best
    for p in CANDIDATES:
        at(p)
    centre = p_best.clone()
    for dp in FINE:
        at(centre + dp)
    return s_best, o_best


def _lsq2(saa, sab, sbb, sax, sbx, a0, b0):
    """Weighted least squares (a, b) of x ~ a u - b v from the weighted sums of u u, u v, v v, u x, v x; (a0, b0)
    where the system is singular."""
    det = saa * sbb - sab * sab
    ok = det.abs() > 1e-12 * (saa * sbb).clamp(min=1e-30)
    safe = torch.where(ok, det, torch.ones_like(det))
    return torch.where(ok, (sbb * sax - sab * sbx) / safe, a0), torch.where(ok, (sab * sax - saa * sbx) / safe, b0)


def _fp16(v):
    return v.clamp(-FP16_MAX, FP16_MAX).half().float()


def _level(v, rng, p):
    """Quantise per-sub-block values v [R, S] to d [R] (fp16) x integer levels in rng."""
    lo, hi = rng
    if lo < 0:  # signed: the extreme gets level lo
        mn, mx = torch.aminmax(v, dim=1)
        d = torch.where(-mn >= mx, mn, mx) / lo
    else:
        d = v.max(dim=1).values.clamp(min=0) / hi
    d = _fp16(d * p)
    lev = torch.where(d[:, None] == 0, torch.zeros_like(v), torch.round(v / d[:, None])).clamp_(lo, hi)
    return d, lev


def _fit_super(x, iw, s, o, t):
    """Super-block parameters from the float sub-block (s, o) [R, S]: d / dmin over the candidates, judged on the
    super-block's weighted error, each with the weighted least-squares refit of (d, dmin) on its codes and levels, then
    the integer levels nudged where that lowers a sub-block's error, and refitted again."""
    iwx = iw * x
    data = iw.sum(-1), iwx.sum(-1), torch.linalg.vecdot(iwx, x, dim=-1)  # [R, S]
    ones = torch.ones_like(s)
    if t.sc is None:  # blocks of 32: d (and -m) are the scale and offset themselves, rounded to fp16
        def make(p, pm):
            return _fp16(s[:, 0] * p), ones, (_fp16(o[:, 0] * pm) if t.has_min else None), ones
    else:
        def make(p, pm):
            d, sc = _level(s, t.sc, p)
            dmin, m = _level(o, (0, 63), pm) if t.has_min else (None, None)
            return d, sc, dmin, m

    params = list(make(1.0, 1.0))
    best = torch.full_like(s[:, 0], float("inf"))

    def consider(cand, err):
        nonlocal best
        better = err < best
        best = torch.where(better, err, best)
        for i, c in enumerate(cand):
            if c is not None:
                params[i] = torch.where(better[:, None] if c.dim() == 2 else better, c, params[i])
        return better

    def judge(cand):
        """Offer cand and its refit on cand's codes; the rows where either won."""
        d, sc, dmin, m = cand
        scale = d[:, None] * sc
        offset = dmin[:, None] * m if t.has_min else torch.zeros_like(scale)
        sums = _code_sums(x, iw, iwx, scale, offset, t)
        won = consider(cand, _sq_err(scale, offset, sums, data).sum(1))
        sq, sqq, sqx = sums
        saa, sax = (sc * sc * sqq).sum(1), (sc * sqx).sum(1)  # value = d (sc q) - dmin m
        if t.has_min:
            nd, ndm = _lsq2(saa, (sc * m * sq).sum(1), (m * m * data[0]).sum(1), sax, (m * data[1]).sum(1), d, dmin)
            nd, ndm = _fp16(nd), _fp16(ndm)
            offset = ndm[:, None] * m
        else:
            nd, ndm = _fp16(torch.where(saa > 0, sax / saa.clamp(min=1e-30), d)), dmin
        return won | consider((nd, sc, ndm, m), _sq_err(nd[:, None] * sc, offset, sums, data).sum(1))

    def scale_d(p):
        d, sc, _, _ = make(p, 1.0)
        return judge((d, sc, params[2], params[3]))

    def scale_dmin(p):
        _, _, dmin, m = make(1.0, p)
        return judge((params[0], params[1], dmin, m))

    judge(params)
    smooth = t.sc is None and t.hi - t.lo < 255
    for offer in (scale_d, scale_dmin) if t.has_min else (scale_d,):
        p_best = torch.ones_like(best)
        for p in SUPER_COARSE if smooth else SUPER_CANDIDATES:
            p_best = torch.where(offer(p), p, p_best)
        for dp in FINE if smooth else ():
            offer(p_best + dp)
    if t.sc is not None:
        for _ in range(2):
            _nudge_levels(x, iw, iwx, data, params, t)
            best = torch.full_like(best, float("inf"))  # the nudged levels are better per sub-block, hence overall
            judge(list(params))
    d, sc, dmin, m = params
    if t.sc is None:
        return d[:, None], (dmin[:, None] if t.has_min else None), None, None
    return d[:, None], (dmin[:, None] if t.has_min else None), sc.to(torch.int16), (m.to(torch.int16) if t.has_min else None)


def _nudge_levels(x, iw, iwx, data, params, t):
    """Each sub-block's integer scale (and min) one step either way, where that lowers its own weighted error."""
    d, sc, dmin, m = params
    lo, hi = t.sc

    def sub_err(sc_, m_):
        scale = d[:, None] * sc_
        offset = dmin[:, None] * m_ if t.has_min else torch.zeros_like(scale)
        return _sq_err(scale, offset, _code_sums(x, iw, iwx, scale, offset, t), data)  # [R, S]

    best = sub_err(sc, m)
    steps = [(a, b) for a in (-1, 0, 1) for b in ((-1, 0, 1) if t.has_min else (0,)) if (a, b) != (0, 0)]
    for a, b in steps:
        sc_ = (sc + a).clamp(lo, hi)
        m_ = (m + b).clamp(0, 63) if t.has_min else m
        err = sub_err(sc_, m_)
        better = err < best
        best = torch.where(better, err, best)
        sc = torch.where(better, sc_, sc)
        if t.has_min:
            m = torch.where(better, m_, m)
    params[1], params[3] = sc, m


# -- GGML bytes ----------------------------------------------------------------------------------------------------
def pack(grid: BlockGrid, codes: torch.Tensor) -> np.ndarray:
    """Codes [N, K] (signed, lo..hi) on `grid` -> the GGML blocks, uint8 [N, K/block * nbytes], as llama.cpp lays
    them out (ggml-common.h's block_q4_K etc.)."""
    t = grid.type
    n, k = codes.shape
    nb = k // t.block
    q = (codes.to(torch.int64) - (t.lo if t.lo < 0 else 0)).numpy().astype(np.uint8).reshape(n * nb, t.block)
    f16 = lambda v: v.reshape(n * nb, 1).numpy().astype(np.float16).view(np.uint8)  # noqa: E731
    d = f16(grid.d)
    if t.name in ("Q4_0", "Q5_0", "Q5_1"):
        qs = (q[:, :16] & 15) | ((q[:, 16:] & 15) << 4)
        parts = [d] + ([f16(-grid.dmin)] if t.has_min else [])
        if t.name != "Q4_0":
            parts.append(np.packbits(q >> 4, axis=1, bitorder="little"))
        out = np.concatenate(parts + [qs], axis=1)
    elif t.name == "Q8_0":
        out = np.concatenate([d, (q.astype(np.int16) - 128).astype(np.int8).view(np.uint8)], axis=1)
    elif t.name in ("Q4_K", "Q5_K"):
        sc = grid.sc.reshape(n * nb, 8).numpy().astype(np.uint8)
        m = grid.m.reshape(n * nb, 8).numpy().astype(np.uint8)
        scales = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), m[:, :4] | ((m[:, 4:] >> 4) << 6),
                                 (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)], axis=1)
        c = q.reshape(n * nb, 4, 2, 32)  # 64 weights per 32 bytes: the first sub-block low, the second high
        qs = ((c[:, :, 0] & 15) | ((c[:, :, 1] & 15) << 4)).reshape(n * nb, 128)
        parts = [d, f16(grid.dmin), scales]
        if t.name == "Q5_K":  # bit j of byte l: the high bit of weight l of sub-block j
            hb = (q >> 4).reshape(n * nb, 8, 32)
            parts.append((hb << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8))
        out = np.concatenate(parts + [qs], axis=1)
    elif t.name == "Q6_K":
        c = q.reshape(n * nb, 2, 4, 32)  # per half of 128: quarters 0..3
        ql = np.concatenate([(c[:, :, 0] & 15) | ((c[:, :, 2] & 15) << 4),
                             (c[:, :, 1] & 15) | ((c[:, :, 3] & 15) << 4)], axis=2).reshape(n * nb, 128)
        qh = ((c >> 4) << (np.arange(4, dtype=np.uint8) * 2)[None, None, :, None]).sum(axis=2, dtype=np.uint8)
        sc = grid.sc.reshape(n * nb, 16).numpy().astype(np.int8).view(np.uint8)
        out = np.concatenate([ql, qh.reshape(n * nb, 64), sc, d], axis=1)
    elif t.name == "Q3_K":
        hmask = ((q >> 2).reshape(n * nb, 8, 32) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(
            axis=1, dtype=np.uint8)
        c = (q & 3).reshape(n * nb, 2, 4, 32)
        qs = (c << (np.arange(4, dtype=np.uint8) * 2)[None, None, :, None]).sum(axis=2, dtype=np.uint8)
        u = (grid.sc.reshape(n * nb, 16).numpy() + 32).astype(np.uint8)  # 6 bits: 4 low in 0..7, 2 high in 8..11
        low = (u[:, :8] & 15) | ((u[:, 8:] & 15) << 4)
        high = ((u >> 4).reshape(n * nb, 4, 4) << (np.arange(4, dtype=np.uint8) * 2)[None, :, None]).sum(
            axis=1, dtype=np.uint8)
        out = np.concatenate([hmask, qs.reshape(n * nb, 64), low, high, d], axis=1)
    else:
        raise AssertionError(t.name)
    assert out.shape[1] == t.nbytes, (t.name, out.shape)
    return np.ascontiguousarray(out.reshape(n, nb * t.nbytes))


def dequantize_blocks(blocks: np.ndarray | torch.Tensor, name: str, k: int) -> torch.Tensor:
    """GGML blocks uint8 [N, row bytes] -> float32 [N, K], by gguf-py's dequantiser (the reader we did not write)."""
    import gguf

    b = blocks.numpy() if isinstance(blocks, torch.Tensor) else blocks
    return torch.from_numpy(gguf.quants.dequantize(np.ascontiguousarray(b), gguf.GGMLQuantizationType[name])
                            .reshape(b.shape[0], k).astype(np.float32))


def row_bytes(name: str, k: int) -> int:
    t = block_type(name)
    return k // t.block * t.nbytes


# -- llama.cpp's mixes (src/llama-quant.cpp, llama_tensor_get_type) --------------------------------------------------
FORMATS = ("q4_0", "q4_1", "q4_k_m", "q3_k_m")  # quantize --format: the first two are GPTQ v1 presets (exact in GGUF)
MIXES = ("q4_k_m", "q3_k_m")  # these write GGML blocks per Linear
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "Q3_K": "Q4_0"}  # K not a multiple of 256


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the layers that get more bits in the _M mixes: the first and last eighth, every third."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def mix_type(fmt: str, module: str, layer: int, n_layers: int, k: int) -> str:
    """The GGML type llama.cpp's `fmt` mix gives the Linear `module` (e.g. "self_attn.v_proj") of decoder layer `layer`
    with k input features (dense models other than Falcon; the counters of attn_v / ffn_down are the layer index)."""
    if fmt == "q4_k_m":
        more = module in ("self_attn.v_proj", "mlp.down_proj") and use_more_bits(layer, n_layers)
        t = "Q6_K" if more else "Q4_K"
    elif fmt == "q3_k_m":
        t = {"self_attn.v_proj": "Q5_K" if layer < 2 else "Q4_K",
             "mlp.down_proj": "Q5_K" if layer < n_layers // 16 else "Q4_K",
             "self_attn.o_proj": "Q4_K"}.get(module, "Q3_K")
    else:
        raise UserError(f"--format {fmt!r}: choose {', '.join(FORMATS)}")
    if k % 256:
        t = FALLBACK[t]
    if k % 32:
        raise UserError(f"{module}: input dimension {k} is not a multiple of 32, which every GGML block type needs")
    return t
