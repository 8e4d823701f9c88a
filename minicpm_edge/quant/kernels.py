"""Compiled inner loops (numba) for CPU tensors: the GPTQ solver's column runs and the grid searches' code sums.

Both are loops of many small steps that torch runs one dispatched operation at a time (a few microseconds each, for
a few hundred weights of arithmetic). The torch code in gptq.py, grid.py and kquant.py stays the reference and the
path for other devices (and where numba does not import); tests/test_kernels.py checks that the two agree.

numba is imported on first use (it takes a few tenths of a second), and the compiled functions are cached on disk.
"""

from __future__ import annotations

import functools

import numpy as np
import torch


ROWS = 64  # output rows per parallel chunk of a run: a chunk's run of columns stays in L1 (32 x 64 x 4 bytes)


@functools.cache
def _compiled():
    import numba

    jit = functools.partial(numba.njit, cache=True, nogil=True)
    # a module global, not a closure variable of the runs that call it: numba keys its disk cache on the pickled
    # closure cells, and a compiled function pickles with an id new in every process, so runs closing over it were
    # compiled afresh (1.3-1.6 s) in every process instead of loaded from the cache
    global _spread

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

    @numba.njit(cache=True, nogil=True, parallel=True, fastmath=True)
    def centred_sums(x, imp, iwx, inv, zero, maxq, a_out, b_out):
        """Per row r of x [R, L] and candidate j: the centred codes d = clamp(round(x inv[r, j]) + zero[r, j], 0,
        maxq) - zero[r, j] and A[r, j] = sum iwx d, B[r, j] = sum imp d^2 (rows in parallel)."""
        rows, length = x.shape
        fmax = np.float32(maxq)
        for r in numba.prange(rows):
            xr, pr, wr = x[r], imp[r], iwx[r]  # 1-D views: the loop vectorises
            for j in range(inv.shape[1]):
                v, z = inv[r, j], zero[r, j]
                a = b = np.float32(0)
                for i in range(length):
                    d = min(max(np.rint(xr[i] * v) + z, np.float32(0)), fmax) - z
                    a += wr[i] * d
                    b += pr[i] * d * d
                a_out[r, j], b_out[r, j] = a, b

    @numba.njit(cache=True, nogil=True)
    def choose(C, margin, S, refit, Z, A, B, best, scale, zero):
        """grid._choose, in place (float64 errors in the same order of operations)."""
        for r in range(S.shape[0]):
            for j in range(S.shape[1]):
                for k in range(2):
                    cand = S[r, j] if k == 0 else refit[r, j]
                    c = np.float64(cand)
                    err = C[r] - 2 * c * A[r, j] + c * c * B[r, j]
                    if err < best[r] - margin[r]:
                        best[r], scale[r], zero[r] = err, cand, Z[r, j]

    return grid_run, group_run, code_sums, centred_sums, choose


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


def centred_sums(x, imp, iwx, scale, zero, maxq):
    """grid._centred_sums for x, imp, iwx [R, L] (contiguous) and the candidates' scale, zero [R, c]: (A, B) [R, c],
    float32 sums as float64."""
    a, b = torch.empty(scale.shape), torch.empty(scale.shape)
    inv = (1 / scale).contiguous()  # as torch's path: w times the reciprocal
    _compiled()[3](_np(x), _np(imp), _np(iwx), _np(inv), _np(zero.contiguous()), maxq, _np(a), _np(b))
    return a.double(), b.double()


def choose(C, margin, S, refit, Z, A, B, best, scale, zero):
    """grid._choose on CPU tensors: (best, scale, zero), updated in place (copies first where not contiguous)."""
    best, scale, zero = (t.contiguous() for t in (best, scale, zero))
    _compiled()[4](*(_np(t.contiguous()) for t in (C, margin, S, refit, Z, A, B)), _np(best), _np(scale), _np(zero))
    return best, scale, zero
