"""Compiled inner loops (numba) for CPU tensors: the GPTQ solver's column runs and the grid searches.

Both are loops of many small steps that torch runs one dispatched operation at a time (a few microseconds each, for
a few hundred weights of arithmetic). The torch code in gptq.py, grid.py and kquant.py stays the reference and the
path for other devices (and where numba does not import); tests/test_kernels.py checks that the two agree.

numba is imported on first use (it takes a few tenths of a second), and the compiled functions are cached on disk.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch


FP16_MAX = 65504.0  # fp16's largest finite value
ROWS = 64  # output rows per parallel chunk of a run: a chunk's run of columns stays in L1 (32 x 64 x 4 bytes)


@functools.cache
def _compiled():
    import numba

    jit = functools.partial(numba.njit, cache=True, nogil=True)
    # the helpers are module globals, not closure variables of the kernels that call them: numba keys its disk cache
    # on the pickled closure cells, and a compiled function pickles with an id new in every process, so runs closing
    # over one were compiled afresh (1.3-1.6 s) in every process instead of loaded from the cache
    global _spread, _fp16, _fp16_scale, _params, _centred, _judge

    @jit
    def _spread(W, U, err, j, alpha, r0, r1):
        """Column j's error onto the run's later columns, rows r0..r1: W[jj] += alpha U[j, jj] err[j] (1-D views of
        the rows: what lets LLVM vectorise the loop, 4-5x over 2-D indexing)."""
        e = err[j, r0:r1]
        for jj in range(j + 1, W.shape[0]):
            a = np.float32(alpha * U[j, jj])
            w = W[jj, r0:r1]
            for r in range(r1 - r0):
                w[r] += a * e[r]

    @jit(parallel=True)
    def grid_run(W, U, scale, offset, div, lo, hi, has_min, alpha, codes, err):
        """A run of columns (rows of W [m, N], U its [m, m] block of the inverse Cholesky factor) onto a fixed GGML
        block grid: value = scale q - offset, q = round((w + offset) / div) within lo..hi (div: the scale, infinite
        where it is 0). Each column's error goes onto the run's later columns at once, times alpha. The output rows
        (columns of W) are independent: chunks of ROWS of them run in parallel, each through the whole run."""
        m, n = W.shape
        flo, fhi = np.float32(lo), np.float32(hi)
        for c in numba.prange((n + ROWS - 1) // ROWS):
            r0 = c * ROWS
            r1 = min(r0 + ROWS, n)
            for j in range(m):
                x, s, o, dv = W[j, r0:r1], scale[j, r0:r1], offset[j, r0:r1], div[j, r0:r1]
                q, e = codes[j, r0:r1], err[j, r0:r1]
                for r in range(r1 - r0):
                    c_ = np.rint((x[r] + o[r]) / dv[r]) if has_min else np.rint(x[r] / dv[r])
                    c_ = min(max(c_, flo), fhi)
                    q[r] = c_
                    e[r] = x[r] - s[r] * c_ + o[r] if has_min else x[r] - s[r] * c_
                _spread(W, U, err, j, alpha[j], r0, r1)

    @jit(parallel=True)
    def group_run(W, U, scale, zero, maxq, alpha, codes, err):
        """A run of columns on GPTQ's group grid: q = clamp(round(w / scale) + zero, 0, maxq),
        value = scale (q - zero); scale and zero [m, N], each column's group's."""
        m, n = W.shape
        fmax = np.float32(maxq)
        for c in numba.prange((n + ROWS - 1) // ROWS):
            r0 = c * ROWS
            r1 = min(r0 + ROWS, n)
            for j in range(m):
                x, s, z = W[j, r0:r1], scale[j, r0:r1], zero[j, r0:r1]
                q, e = codes[j, r0:r1], err[j, r0:r1]
                for r in range(r1 - r0):
                    c_ = min(max(np.rint(x[r] / s[r]) + z[r], np.float32(0)), fmax)
                    q[r] = c_
                    e[r] = x[r] - s[r] * (c_ - z[r])
                _spread(W, U, err, j, alpha[j], r0, r1)

    @numba.njit(cache=True, nogil=True, parallel=True, fastmath=True)
    def code_sums(x, iw, iwx, scale, offset, lo, hi, has_min, sq, sqq, sqx):
        """Per row r of x [R, L]: the nearest codes q on (scale[r], offset[r]) and their weighted sums
        sq = sum iw q, sqq = sum iw q^2, sqx = sum iwx q (rows in parallel)."""
        rows, length = x.shape
        flo, fhi = np.float32(lo), np.float32(hi)
        for r in numba.prange(rows):
            s = scale[r]
            inv = np.float32(0) if s == 0 else np.float32(1) / s
            oi = offset[r] * inv
            xr, pr, wr = x[r], iw[r], iwx[r]  # 1-D views: the loop vectorises
            a = b = c = np.float32(0)
            for i in range(length):
                q = np.rint(xr[i] * inv + oi) if has_min else np.rint(xr[i] * inv)
                q = min(max(q, flo), fhi)
                a += q * pr[i]
                b += q * q * pr[i]
                c += q * wr[i]
            sq[r], sqq[r], sqx[r] = a, b, c

    @jit(inline="always")
    def _fp16(x, fb, ub):
        """float32 x (|x| <= 65504) rounded to the nearest fp16 value, ties to even (numba has no float16), through
        fb, a 1-element float32 array, and ub, its uint32 view: the significand cut to fp16's 10 bits (a carry into
        the exponent is right), or, below fp16's normal range, to a multiple of 2^-24."""
        if abs(x) < np.float32(2.0 ** -14):
            return np.rint(x * np.float32(2.0 ** 24)) * np.float32(2.0 ** -24)
        fb[0] = x
        u = ub[0]
        ub[0] = (u + np.uint32(0xFFF) + ((u >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)
        return fb[0]

    @jit(inline="always")
    def _fp16_scale(scale, sign, fb, ub):
        """grid._fp16_scale for one value."""
        if scale == 0:
            scale = np.float32(1)
        s = _fp16(min(max(scale, np.float32(-FP16_MAX)), np.float32(FP16_MAX)), fb, ub)
        if s == 0:
            s = np.float32(-(2.0 ** -24)) if sign < 0 else np.float32(2.0 ** -24)
        return s

    @jit(inline="always")
    def _params(lo, hi, sym, maxq, fb, ub):
        """grid._params for one group's (lo, hi): (scale, zero), float32."""
        if sym:
            half = np.float32((maxq + 1) // 2)
            extreme = lo if -lo >= hi else hi
            return _fp16_scale(extreme / -half, -extreme, fb, ub), half
        scale = _fp16_scale((hi - lo) / np.float32(maxq), hi - lo, fb, ub)
        zero = np.rint(-lo / scale)
        if zero < 1:
            scale = _fp16_scale(hi / np.float32(maxq - 1), hi, fb, ub)
        return scale, min(max(zero, np.float32(1)), np.float32(maxq))

    @numba.njit(cache=True, nogil=True, fastmath=True)
    def _centred(x, imp, iw, S, Z, count, fmax, A, B):
        """Candidates j < count of one group: A[j] = sum iw d, B[j] = sum imp d^2 for the centred codes
        d = clamp(round(x / S[j]) + Z[j], 0, maxq) - Z[j] (float32 sums in any order: the loop vectorises). One
        call per group and offer: a call passing arrays counts references on each, dearer than a candidate's sums."""
        for j in range(count):
            inv, z = np.float32(1) / S[j], Z[j]
            a = b = np.float32(0)
            for i in range(x.shape[0]):
                d = min(max(np.rint(x[i] * inv) + z, np.float32(0)), fmax) - z
                a += iw[i] * d
                b += imp[i] * d * d
            A[j], B[j] = a, b

    @jit(inline="always")
    def _judge(s, A, B, C, margin, best, fb, ub):
        """grid._choose for one candidate s with sums A, B (float64), then for its codes' least-squares scale:
        (error, scale) of the last of the two to beat the best so far by more than margin (grid._choose's float64
        error, same order of operations), or (best, nan) when neither does."""
        refit = _fp16_scale(np.float32(A / max(B, 1e-30)) if B > 0 else s, s, fb, ub)
        won = np.float32(np.nan)
        for cand in (s, refit):
            c = np.float64(cand)
            err = C - 2 * c * A + c * c * B
            if err < best - margin:
                best, won = err, cand
        return best, won

    @jit(parallel=True)
    def weighted_params(w, imp, p, sym, maxq, scale_out, zero_out):
        """grid.find_params' "weighted" search for every group of L = imp.shape[2] columns of every row of w [N, K]
        (rows contiguous): scale and zero into scale_out, zero_out [K / L, N]. imp [Gi, Ni, L]: each column's
        importance, for each group (Gi = K / L) or all alike (Gi = 1), each row (Ni = N) or all alike (Ni = 1).
        p: the candidates' multiples of the max-based scale. Rows in parallel, in chunks of ROWS; every step as
        grid._weighted_search takes it, in its order, on one group at a time."""
        n, k = w.shape
        length, m = imp.shape[2], p.shape[0] + 1
        groups, fmax = k // length, np.float32(maxq)
        for c in numba.prange((n + ROWS - 1) // ROWS):
            # scratch of this chunk's own: the group's weights, importance and their products, the candidates and
            # their sums (slices of the shared arrays per group would each count a reference on them, an atomic
            # operation the threads contend for)
            x, im, iw = np.empty(length, np.float32), np.empty(length, np.float32), np.empty(length, np.float32)
            S, Z, A, B = np.empty(m, np.float32), np.empty(m, np.float32), np.empty(m), np.empty(m)
            fb = np.empty(1, dtype=np.float32)
            ub = fb.view(np.uint32)
            for r in range(c * ROWS, min((c + 1) * ROWS, n)):
                for g in range(groups):
                    gi, ri = (g if imp.shape[0] > 1 else 0), (r if imp.shape[1] > 1 else 0)
                    lo = hi = cf = np.float32(0)
                    for i in range(length):
                        v = w[r, g * length + i]
                        x[i], im[i] = v, imp[gi, ri, i]
                        iw[i] = im[i] * v
                        cf += iw[i] * v
                        lo, hi = min(lo, v), max(hi, v)
                    C = np.float64(cf)
                    margin, best = 1e-6 * C, np.inf
                    S[0], Z[0] = _params(lo, hi, sym, maxq, fb, ub)  # the max-based grid, then its multiples
                    for j in range(1, m):
                        S[j], Z[j] = _params(lo * p[j - 1], hi * p[j - 1], sym, maxq, fb, ub)
                    _centred(x, im, iw, S, Z, m, fmax, A, B)
                    scale, zero = S[0], Z[0]
                    for j in range(m):
                        best, won = _judge(S[j], A[j], B[j], C, margin, best, fb, ub)
                        if won == won:
                            scale, zero = won, Z[j]
                    if not sym:  # the zero point one step either side of the best so far
                        for step in (-1, 1):
                            S[0], Z[0] = scale, min(max(zero + np.float32(step), np.float32(1)), fmax)
                            _centred(x, im, iw, S, Z, 1, fmax, A, B)
                            best, won = _judge(S[0], A[0], B[0], C, margin, best, fb, ub)
                            if won == won:
                                scale, zero = won, Z[0]
                    scale_out[g, r], zero_out[g, r] = scale, zero

    return grid_run, group_run, code_sums, weighted_params


@functools.cache
def available() -> bool:
    """numba imports here (a dependency, but a platform without its wheels still quantises, through torch)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def usable(*tensors: torch.Tensor) -> bool:
    """The compiled loops take float32 CPU tensors."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and available()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.numpy()  # a view: the kernels write through it


def grid_run(W, U, scale, offset, div, lo, hi, has_min, alpha, codes, err):
    """gptq's run of columns (rows of W [m, N]; U [m, m]) on a GGML block grid (see _compiled); float32 tensors,
    rows contiguous, but codes, which may be of any numeric type (the solver's: int16); W, codes and err are
    written."""
    _compiled()[0](_np(W), _np(U), _np(scale), _np(offset), _np(div), lo, hi, has_min, _np(alpha), _np(codes),
                   _np(err))


def group_run(W, U, scale, zero, maxq, alpha, codes, err):
    """gptq's run of columns on its group grid; scale, zero [m, N]; codes of any numeric type (the solver's:
    uint8)."""
    _compiled()[1](_np(W), _np(U), _np(scale), _np(zero), maxq, _np(alpha), _np(codes), _np(err))


def code_sums(x, iw, iwx, scale, offset, lo, hi, has_min):
    """kquant._code_sums for x, iw, iwx [..., L] and scale, offset [...]: (sq or None, sqq, sqx) [...]."""
    shape, length = scale.shape, x.shape[-1]
    flat = lambda t: t.reshape(-1, length).contiguous()  # noqa: E731
    out = [torch.empty(shape) for _ in range(3)]
    _compiled()[2](_np(flat(x)), _np(flat(iw)), _np(flat(iwx)), _np(scale.reshape(-1).contiguous()),
                   _np(offset.reshape(-1).contiguous()), lo, hi, has_min, *(_np(o.view(-1)) for o in out))
    sq, sqq, sqx = out
    return (sq if has_min else None), sqq, sqx


def weighted_params(w, imp, sym, maxq, multiples):
    """grid's "weighted" search for every group of L columns of every row of w [N, K] (float32): (scales, zeros)
    [K / L, N]. imp [Gi, Ni, L] (contiguous): the columns' importance per group (Gi = K / L, or 1: the same for all)
    and per row (Ni = N, or 1); multiples: grid.SEARCH_RANGE's candidates."""
    n, k = w.shape
    out = torch.empty(k // imp.shape[2], n), torch.empty(k // imp.shape[2], n)
    _compiled()[3](_np(w), _np(imp), _np(multiples), sym, maxq, *(_np(o) for o in out))
    return out
