"""GPTQ for one weight matrix (Frantar et al. 2022), in one readable file.

H = (2/n) sum x x^T over calibration tokens; columns are quantised left to right in blocks of 128 and each column's
rounding error is spread onto the not-yet-quantised columns through the upper Cholesky factor of H^-1.
Group parameters are found when a group is entered, from the error-updated weights (or up front with static groups,
which act-order requires so that groups stay contiguous along the input dimension).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..errors import UserError
from ..model.checkpoint import all_finite
from .grid import (QuantSpec, dequantize, find_params, flush_denormals, group_params, make_g_idx, one_thread,
                   quantize_codes)
from . import kernels
from .kquant import BlockGrid, BlockType, fit_grid

DAMP_TRIES = 8  # damping grows x10 per failed Cholesky factorisation, at most this many attempts
INNER = 32  # columns per run inside a block whose errors are spread one by one (then onto the rest in one product)
HESSIAN_BLOCK = 384  # block width of the symmetric X^T X: narrower saves flops, wider runs the GEMMs faster


@dataclass
class QuantResult:
    """One quantised matrix, every tensor in the original column order and on the weight's device."""

    codes: torch.Tensor  # uint8 [N, K]; on a GGML block grid, int16 signed codes
    scales: torch.Tensor | None  # float32 [groups, N] (fp16-representable); None on a block grid
    zeros: torch.Tensor | None  # int32 [groups, N] true zero points; None on a block grid
    g_idx: torch.Tensor | None  # int32 [K]; None on a block grid
    dequantized: torch.Tensor  # float32 [N, K] = scales[g_idx].T * (codes - zeros[g_idx].T) or grid.values(codes)
    damp_used: float = 0.0  # damping actually applied, as a fraction of mean(diag H)
    loss: float = 0.0  # sum over columns of err^2 / d^2 / 2 (the GPTQ objective proxy)
    perm: torch.Tensor | None = None  # act-order: the order columns were quantised in (original indices)
    grid: BlockGrid | None = None  # the GGML block grid (kquant.py) the codes lie on, when quantised onto one
    row_loss: torch.Tensor | None = None  # [N] each output row's share of `loss`

    def split(self, sizes: list[int]) -> list[QuantResult]:
        """The results of the matrices whose rows were stacked into this one (GPTQ and the grids treat every row on its
        own, so a stacked solve is the solves of its parts, with the Hessian's factorisation shared). Each part owns
        its tensors (no views shared between parts)."""
        if sum(sizes) != self.codes.shape[0]:
            raise ValueError(f"split sizes add up to {sum(sizes)}, the result has {self.codes.shape[0]} rows")
        own = lambda t: None if t is None else t.clone()  # noqa: E731
        out, a = [], 0
        for n in sizes:
            rows = lambda t, dim=0: None if t is None else t.narrow(dim, a, n).clone()  # noqa: E731
            g = self.grid
            grid = None if g is None else BlockGrid(g.type, rows(g.d), rows(g.dmin), rows(g.sc), rows(g.m))
            loss = rows(self.row_loss)
            out.append(replace(self, codes=rows(self.codes), dequantized=rows(self.dequantized), grid=grid,
                               scales=rows(self.scales, 1), zeros=rows(self.zeros, 1), g_idx=own(self.g_idx),
                               perm=own(self.perm), loss=0.0 if loss is None else float(loss.sum()), row_loss=loss))
            a += n
        return out


class GPTQ:
    """Accumulates the Hessian of one Linear's inputs, then quantises its weight."""

    def __init__(self, in_features: int, device: str | torch.device = "cpu"):
        self.k = in_features
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0
        self.dXXt = None  # GPTAQ: (2/n) sum (x_native - x) x^T, when add_batch is given the unquantised model's inputs
        self._factored = None  # (H it was computed from, key, _factor's result): shared by Linears on the same inputs

    def add_batch(self, x: torch.Tensor, mask: torch.Tensor | None = None, native: torch.Tensor | None = None) -> None:
        """x [..., K]; mask [...] (True for real tokens) leaves padding out of H and out of the token count.
        `native`: the same tokens' inputs in the unquantised model (shape of x), for `target` (GPTAQ): every batch
        of a Hessian gives them or none does."""
        if x.shape[-1] != self.k:
            raise UserError(f"calibration activations have {x.shape[-1]} features, the layer expects {self.k}")
        x = x.detach().reshape(-1, self.k).to(self.H.device)
        if x.dtype != torch.bfloat16:
            x = x.float()
        if native is not None:
            if native.shape[-1] != self.k or native.numel() != x.numel():
                raise UserError("the unquantised model's activations do not match the quantised model's")
            native = native.detach().reshape(-1, self.k).to(x.device, x.dtype)
        if (native is None) != (self.dXXt is None) and self.n:
            raise UserError("give the unquantised model's inputs with every calibration batch or with none")
        if mask is not None:
            keep = mask.reshape(-1).to(x.device, torch.bool)
            x, native = x[keep], None if native is None else native[keep]
        m = x.shape[0]
        if m == 0:
            return
        if not _finite_products(x):  # checked before H changes: H stays as it was
            raise UserError("calibration activations contain NaN or Inf (or overflow float32); check the model weights "
                            "and calibration text")
        self.n += m
        # running average: H stays (2/n) sum x x^T after every batch. x^T x is symmetric: each block row's part left
        # of the diagonal and its diagonal block only (a bit over half the product), then mirrored
        beta, alpha = (self.n - m) / self.n, 2 / self.n
        # H's products in float32 whatever the layer computed in: a bfloat16 product rounds its result to bfloat16
        # (0.4% of an entry), which on real activations (massive-activation channels 100-250x the median channel's
        # energy, first tokens 60x the median token's) outweighs 1% damping on H's near-null directions. SmolLM2-135M
        # at 128 x 512 tokens: bf16 products needed 10% damping on 5 of 210 Linears, mean KL 1.25x float32's
        xf = x.float()
        edges = _block_edges(self.k)
        for a, b in zip(edges, edges[1:]):  # one GEMM into H, no temporary
            self.H[a:b, :b].addmm_(xf[:, a:b].t(), xf[:, :b], beta=beta, alpha=alpha)
        for a, b in zip(edges[1:-1], edges[2:]):
            self.H[:a, a:b].copy_(self.H[a:b, :a].t())
        del xf
        if native is not None:  # not symmetric: one full product, in x's type (a correction to W, not factorised:
            if self.dXXt is None:  # bf16's rounding of it is 0.4% of a few percent of the weight)
                self.dXXt = torch.zeros_like(self.H)
            d = (native - x).t() @ x
            self.dXXt.mul_(beta).add_(d.float(), alpha=alpha)

    def target(self, weight: torch.Tensor, alpha: float = 1.0, damp: float = 0.01, spec: QuantSpec | None = None,
               act_order: bool = False, static_groups: bool = False, group_aware: bool = False) -> torch.Tensor:
        """The weight GPTQ should aim at so that its quantised Linear, fed the quantised model's inputs X, matches
        the unquantised Linear fed the unquantised model's inputs Xn (GPTAQ's asymmetric calibration).

        min_Q ||Q X - W Xn||^2 = ||(Q - W*) X||^2 + const exactly, for W* = W Xn X^T (X X^T)^-1; with GPTQ's
        damping lambda as a pull towards W, W* = W + W dXX^T (H + lambda I)^-1, dXX^T = (Xn - X) X^T. `alpha`
        scales the correction (0: W itself, plain GPTQ; 1: the whole of it). Without native inputs: W.
        The other keywords are quantize's: (H + lambda I)^-1 = U^T U comes from the factorisation quantize then
        uses (U = its inverse upper Cholesky factor, in its column order), made once for both."""
        W = weight.detach().to(self.H.device, torch.float32)
        if self.dXXt is None or alpha == 0:
            return W
        spec = spec or QuantSpec()
        glen = spec.group_len(self.k)
        _, dead, perm, U, _ = self._factor(W.device, damp, act_order, group_aware and spec.group_size != -1, glen)

        def inverse_times(B):  # (H + lambda I)^-1 B = P^T U^T U P B, P the factor's column order
            B = B.contiguous() if perm is None else B.index_select(0, perm)
            Y = U.t() @ (U @ B)
            return Y if perm is None else Y.index_select(0, torch.argsort(perm))

        # W dXX^T H^-1 from the cheaper end: 3 N K^2 flops, or 2 K^3 + N K^2 through the K x K (dXX^T H^-1)^T when
        # the matrix has more rows than inputs (q, k, v and gate, up stacked)
        if W.shape[0] > self.k:
            corr = W @ inverse_times(self.dXXt.t()).t()
        else:
            corr = inverse_times((W @ self.dXXt).t()).t()
        W = W + alpha * corr
        W[:, dead] = 0
        return W

    def quantize(self, weight: torch.Tensor, spec: QuantSpec, damp: float = 0.01, blocksize: int = 128,
                 act_order: bool = False, static_groups: bool = False, search: str = "weighted",
                 group_aware: bool = False, block: BlockType | None = None) -> QuantResult:
        """Quantise weight [N, K] column by column, compensating each rounding error on the columns still to come.

        Column order: natural; `act_order` (decreasing Hessian diagonal over all columns, groups then need
        `static_groups`); or `group_aware` (GAR: whole groups in decreasing order of their largest diagonal entry,
        columns within each group likewise, so every group is still one contiguous run of K and its parameters
        come from its updated columns, as in natural order). `search`: find_params' grid search, weighted by the
        Hessian diagonal of each column. `block`: a GGML block type (kquant.TYPES) whose two-level grid is fitted to
        the original weights first (weighted by the Hessian diagonal) and fixed; `spec` is then unused.
        """
        if self.n == 0:
            raise UserError("no calibration tokens reached this layer")
        if act_order and not static_groups and spec.group_size != -1 and block is None:
            raise UserError("act-order needs static groups (--static-groups) so groups stay contiguous along K")
        if damp < 0 or blocksize < 1:
            raise UserError(f"damping must be >= 0 and block size >= 1 (got {damp}, {blocksize})")
        W = weight.detach().to(torch.float32)  # read only: the solver works on a transposed copy
        n_out, k = W.shape
        if k != self.k:
            raise UserError(f"weight has {k} input features, the calibration activations {self.k}")
        if block is None:
            spec.check_k(k)
        glen, n_groups = spec.group_len(k), spec.groups(k)
        dev = W.device
        hdiag, dead, perm, Hinv, damp_used = self._factor(dev, damp, act_order, group_aware and spec.group_size != -1,
                                                          glen)
        if bool(dead.any()):  # inputs that are always zero: any weight there is free, quantise it as 0
            W = W.clone()
            W[:, dead] = 0
        grid = None
        if block is not None:  # static by construction: fixed before any error update, original column order
            grid = fit_grid(W, block, hdiag)
            scales = zeros = torch.zeros(0, n_out, device=dev)
        elif static_groups or spec.group_size == -1:  # parameters from the original weights, original column order
            scales, zeros = group_params(W, spec, search, hdiag)
        else:
            scales, zeros = torch.zeros(n_groups, n_out, device=dev), torch.zeros(n_groups, n_out, device=dev)
        static = static_groups or spec.group_size == -1 or grid is not None
        diag = hdiag if perm is None else hdiag[perm]  # processing order: each column's grid weight
        # Work on W transposed (column i of W = row i, contiguous) in processing order, in place
        Wt = W.t().contiguous()
        Wt = Wt.clone() if Wt.data_ptr() == W.data_ptr() else Wt  # a one-row or one-column W: no copy made yet
        Wt = Wt if perm is None else Wt.index_select(0, perm)  # (a row gather: faster than columns)
        order = perm.tolist() if perm is not None else list(range(k))  # original index of each processed column
        group = torch.tensor([c // glen for c in order], device=dev)  # group of each processed column
        compiled = kernels.usable(Wt, Hinv)
        ctype = torch.int16 if grid is not None else torch.uint8  # the codes' storage type
        # the compiled runs write the codes in their storage type; the torch runs use float rows as their scratch
        codes = torch.empty(Wt.shape, dtype=ctype if compiled else torch.float32, device=dev)
        losses = torch.zeros(n_out, device=dev)
        if grid is not None:  # each column's scale and offset as contiguous rows in processing order; a zero scale
            cols = torch.tensor(order, device=dev) // block.sub  # divides to code 0, as BlockGrid.codes gives it
            g_scale, g_offset = grid.scale.t()[cols].contiguous(), grid.offset.t()[cols].contiguous()
            g_div = torch.where(g_scale == 0, torch.full_like(g_scale, math.inf), g_scale)
        # a block's columns go in runs of INNER: each column's error spread onto the run's later columns one by one,
        # a finished run's onto the block's later columns in one product. Groups found on the updated weights start
        # a run of their own (so that its columns hold all the updates before it).
        # the runs' column loops: compiled for CPU tensors, torch operations elsewhere
        grid_solve, group_solve = (kernels.grid_run, kernels.group_run) if compiled else (grid_run, group_run)
        for i1 in range(0, k, blocksize):
            i2 = min(i1 + blocksize, k)
            m = i2 - i1
            W1, U1 = Wt[i1:i2], Hinv[i1:i2, i1:i2]  # W1: a view, updated in place
            Err1 = torch.empty_like(W1)  # each column's rounding error, divided by its U diagonal once its run ends
            u_diag = torch.diag(U1)
            spread = -1 / u_diag  # alpha of each column's rank-1 update: its error divided by the diagonal
            cuts = set(range(0, m, INNER)) | ({j for j in range(m) if (i1 + j) % glen == 0} if not static else set())
            cuts = sorted(cuts | {m})
            for s1, s2 in zip(cuts, cuts[1:]):
                a1, a2 = i1 + s1, i1 + s2
                if not static and a1 % glen == 0:  # entering a group (contiguous): its columns as updated
                    g = order[a1] // glen
                    inside = min(glen, m - s1)  # the rest of the group lies after this block
                    cols = W1[s1:s1 + glen] if inside == glen else torch.cat([W1[s1:], Wt[i2:i2 + glen - inside]])
                    scales[g], zeros[g] = find_params(cols.t(), spec, search, diag[a1:a1 + glen])
                W, U, E = W1[s1:s2], U1[s1:s2, s1:s2], Err1[s1:s2]
                if grid is not None:
                    grid_solve(W, U, g_scale[a1:a2], g_offset[a1:a2], g_div[a1:a2], block.lo, block.hi,
                               block.has_min, spread[s1:s2], codes[a1:a2], E)
                else:
                    g = group[a1:a2]
                    group_solve(W, U, scales[g], zeros[g], spec.maxq, spread[s1:s2], codes[a1:a2], E)
                E.div_(u_diag[s1:s2, None])  # the run done: its errors divided, then onto the block's later columns
                if s2 < m:
                    W1[s2:].addmm_(U1[s1:s2, s2:].t(), E, alpha=-1)
            losses += Err1.square().sum(0) / 2
            Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1)  # lazy update of the columns after this block

        # the codes in their storage type (1-2 bytes: cheap to move), back to the original column order, [N, K]; the
        # dequantized weight from them in one pass (every group, and every sub-block, a contiguous run of K)
        codes = codes.to(ctype)
        codes = (codes if perm is None else codes.index_select(0, torch.argsort(perm))).t().contiguous()
        if grid is not None:  # BlockGrid.values: scale q - offset
            sub = block.sub
            Q = codes.float().view(n_out, -1, sub)
            Q.mul_(grid.scale.contiguous()[:, :, None]).sub_(grid.offset.contiguous()[:, :, None])
            return QuantResult(codes, None, None, None, Q.view(n_out, k), damp_used, float(losses.sum()), perm, grid,
                               losses)
        Q = codes.float().view(n_out, n_groups, glen)  # dequantize in place: scale (q - zero)
        Q.sub_(zeros.t().contiguous()[:, :, None]).mul_(scales.t().contiguous()[:, :, None])
        return QuantResult(codes, scales, zeros.to(torch.int32), make_g_idx(k, spec, dev), Q.view(n_out, k), damp_used,
                           float(losses.sum()), perm, row_loss=losses)

    def _factor(self, device: torch.device, damp: float, act_order: bool, group_aware: bool, glen: int):
        """(H's diagonal with the dead inputs' set to 1, the dead inputs, the column order or None, the upper
        Cholesky factor of the damped inverse in that order, the damping used). Computed once per Hessian and
        options: the Linears that read the same inputs (q, k, v; gate, up) share it."""
        key = (device, damp, act_order, group_aware, glen, self.H._version)  # _version: any in-place change of H
        if self._factored is not None and self._factored[0] is self.H and self._factored[1] == key:
            return self._factored[2]
        H = self.H.to(device)
        if not all_finite(H):
            raise UserError("the calibration Hessian overflowed float32; check the model's activations")
        diag = torch.diag(H)  # a copy
        dead = diag == 0
        diag[dead] = 1
        perm = None
        if act_order:
            perm = torch.argsort(diag, descending=True)
        elif group_aware:
            perm = group_aware_order(diag, glen)
        with flush_denormals():
            Hinv, damp_used = _inverse_cholesky(H, damp, perm, diag)
        self._factored = (self.H, key, (diag, dead, perm, Hinv, damp_used))
        return self._factored[2]

    def output_error(self, weight: torch.Tensor, dequantized: torch.Tensor, result: QuantResult | None = None,
                     dtype: torch.dtype = torch.float32) -> float:
        """Relative output error ||X(W - Q)^T|| / ||XW^T|| over the calibration tokens, computed from H.
        `dtype`: the products of the denominator's quadratic form (bfloat16: half the time where the CPU has bf16
        units, within ~1e-4 of float32's value; the sums stay float32).

        With `result`, the solve of this Hessian that made `dequantized`, the numerator is the solver's own: its loss
        (sum of err^2 / d^2 / 2 over the columns) is half of D0 (Hm + lambda I) D0^T exactly (each step's error
        update is the optimal one for the columns left, so the steps' losses add up to the final quadratic error),
        with D0 = W0 - Q for W0 = W with its dead inputs zeroed and Hm = H with their diagonal set to 1. Hence
        ||X(W - Q)^T||^2 = 2 loss - lambda ||D0||^2 - ||Q_dead||^2, and only ||XW^T||^2 is a quadratic form."""
        W = weight.float().to(self.H.device)
        Q = dequantized.float().to(self.H.device)
        den = _quadratic(W, self.H, dtype)
        if result is not None and result.loss > 0 and self._factored is not None and self._factored[0] is self.H:
            hdiag, dead, perm = self._factored[2][:3]
            lam = result.damp_used * _mean_in_order(hdiag, perm)
            live, q_dead = _square_sums(W, Q, dead)
            num = 2 * result.loss - lam * (live + q_dead) - q_dead
        else:
            num = _quadratic(W - Q, self.H)
        return math.sqrt(max(num / den, 0.0)) if den > 0 else 0.0


def grid_run(W, U, scale, offset, div, lo, hi, has_min, alpha, codes, err):
    """A run of columns (rows of W [m, N], updated in place; U [m, m] their block of the inverse Cholesky factor)
    quantised one by one onto a fixed GGML block grid, value = scale q - offset with q = round((w + offset) / div) in
    lo..hi (div: the scale, infinite where it is 0, as BlockGrid.codes): each column's codes and error (w - value)
    into its rows of codes and err, the error times alpha[j] U[j] onto the run's later columns. Torch operations,
    one column at a time: the reference of kernels.grid_run, and the path on other devices."""
    m = W.shape[0]
    w_rows, u_rows, q_rows, e_rows = W.unbind(0), U.unbind(0), codes.unbind(0), err.unbind(0)
    alpha = alpha.tolist()
    with one_thread(W.device):  # one row per step: threads would only add synchronisation
        for j in range(m):
            w, q, e, s, o = w_rows[j], q_rows[j], e_rows[j], scale[j], offset[j]
            torch.add(w, o, out=q).div_(div[j]) if has_min else torch.div(w, div[j], out=q)
            q.round_().clamp_(lo, hi)
            torch.addcmul(w, s, q, value=-1, out=e)
            if has_min:
                e.add_(o)
            if j + 1 < m:
                W[j + 1:].addr_(u_rows[j][j + 1:], e, alpha=alpha[j])


def group_run(W, U, scale, zero, maxq, alpha, codes, err):
    """grid_run on GPTQ's group grid: q = clamp(round(w / scale) + zero, 0, maxq), value = scale (q - zero); scale
    and zero [m, N], each column's group's parameters (the reference of kernels.group_run)."""
    m = W.shape[0]
    w_rows, u_rows, q_rows, e_rows = W.unbind(0), U.unbind(0), codes.unbind(0), err.unbind(0)
    alpha, shifted = alpha.tolist(), torch.empty(W.shape[1], device=W.device)
    with one_thread(W.device):
        for j in range(m):
            w, q, e, s, z = w_rows[j], q_rows[j], e_rows[j], scale[j], zero[j]
            torch.div(w, s, out=q).round_().add_(z).clamp_(0, maxq)  # quantize_codes
            torch.addcmul(w, s, torch.sub(q, z, out=shifted), value=-1, out=e)  # w - dequantize
            if j + 1 < m:
                W[j + 1:].addr_(u_rows[j][j + 1:], e, alpha=alpha[j])


def group_aware_order(diag: torch.Tensor, glen: int) -> torch.Tensor:
    """GAR's column order: groups by decreasing largest diagonal entry, columns by decreasing diagonal within each."""
    within, order = torch.sort(diag.view(-1, glen), dim=1, descending=True, stable=True)
    groups = torch.argsort(within[:, 0], descending=True, stable=True)
    return (order + torch.arange(len(groups), device=diag.device)[:, None] * glen)[groups].reshape(-1)


def _finite_products(x: torch.Tensor) -> bool:
    """No NaN or Inf in x [m, K] and none in x^T x: every entry of x^T x is bounded by its diagonal's (Cauchy-Schwarz),
    each a sum of m squares, so x's largest magnitude settles it in one pass without temporaries (x^T x's diagonal
    itself, a product as large as x, only where that bound leaves an overflow possible)."""
    lo, hi = torch.aminmax(x)
    big = max(abs(float(lo)), abs(float(hi)))
    if not math.isfinite(big):
        return False
    if big * big * x.shape[0] < torch.finfo(x.dtype).max / 2:  # half: the rounding of a sum near the limit
        return True
    return bool(torch.isfinite(torch.linalg.vecdot(x, x, dim=0)).all())


def _block_edges(k: int, width: int = HESSIAN_BLOCK) -> list[int]:
    """Block boundaries along K for the symmetric Hessian product: about `width` wide, on multiples of 64."""
    n = max(1, round(k / width))
    return [i * k // n // 64 * 64 for i in range(n)] + [k]


def _square_sums(W: torch.Tensor, Q: torch.Tensor, dead: torch.Tensor) -> tuple[float, float]:
    """(||(W - Q)[:, ~dead]||^2, ||Q[:, dead]||^2) a few rows at a time (about 1 MB each): no temporaries of W's size,
    each a fresh allocation and a pass over memory."""
    rows, live, q_dead = max(1, 2**18 // W.shape[1]), 0.0, 0.0
    any_dead = bool(dead.any())
    for a in range(0, W.shape[0], rows):
        d = W[a:a + rows] - Q[a:a + rows]
        if any_dead:
            d[:, dead] = 0
            q_dead += float(Q[a:a + rows, dead].square().sum())
        live += float(torch.dot(d.view(-1), d.view(-1)))
    return live, q_dead


def _quadratic(A: torch.Tensor, H: torch.Tensor, dtype: torch.dtype = torch.float32) -> float:
    """sum over the rows a of A of a^T H a, for symmetric H: each block row of H up to its diagonal block only (the
    blocks left of it count twice), a bit over half the GEMM work of A H. The products in `dtype`, the dot products
    with the float32 rows and the sums in float32."""
    edges = _block_edges(H.shape[0])
    Ad, Hd = A.to(dtype), H.to(dtype)
    total = 0.0
    for a, b in zip(edges, edges[1:]):
        Ab = A[:, a:b]
        total += float(torch.linalg.vecdot((Ad[:, a:b] @ Hd[a:b, a:b]).float(), Ab).sum())
        if a:
            total += 2 * float(torch.linalg.vecdot((Ad[:, :a] @ Hd[a:b, :a].t()).float(), Ab).sum())
    return total


def _mean_in_order(diag: torch.Tensor, order: torch.Tensor | None) -> float:
    """mean(diag), summed in the solver's column order: the damping's unit, the same to the last bit wherever used."""
    return float((diag if order is None else diag[order]).mean())


def _inverse_cholesky(H: torch.Tensor, damp: float, order: torch.Tensor | None = None,
                      diag: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (Hp + d*mean(diag Hp)*I)^-1 and the d used, for Hp = H in the column order `order`
    (None: as it is) with its diagonal replaced by `diag` (original order; None: H's own); d starts at `damp`, x10
    per failure. H is left as it is.

    With J the reversal permutation, J Hd J = L L^T gives Hd = R R^T with R = J L J upper triangular, so
    Hd^-1 = R^-T R^-1: R^-1 is the factor sought. One Cholesky and one triangular inverse (2/3 K^3 flops) instead of
    a Cholesky, the inverse from it and a second Cholesky (4/3 K^3). J Hp J is made in one gather (the reversal
    folded into the order), the diagonal reset in place for each damping tried."""
    diag = torch.diag(H) if diag is None else diag
    if order is None:
        Hr, d_rev = H.flip(0, 1), diag.flip(0)
    else:
        rev = order.flip(0)
        Hr, d_rev = H.index_select(0, rev).index_select(1, rev), diag[rev]
    mean_diag = _mean_in_order(diag, order)
    d = damp
    for _ in range(DAMP_TRIES):
        Hr.diagonal().copy_(d_rev).add_(d * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hr)
        if int(info) == 0:
            U = _triangular_inverse(L.flip(0, 1))
            if all_finite(U):
                return U, d
        last, d = d, (0.01 if d == 0 else d * 10)
    raise UserError(f"the Hessian is not positive definite even with damping {last:g}; "
                    "give more or more varied calibration text")


def _triangular_inverse(R: torch.Tensor, base: int = 512) -> torch.Tensor:
    """Inverse of the upper-triangular R by halves, [A B; 0 C]^-1 = [A^-1, -A^-1 B C^-1; 0, C^-1]: mostly GEMMs,
    with the triangular factors' zero halves skipped (_upper_times), K^3/3 flops in all as LAPACK's trtri; twice as
    fast on CPU as one triangular solve against the identity, and 1.7x the same recursion with full products."""
    k = R.shape[0]
    if k <= base:
        return torch.linalg.solve_triangular(R, torch.eye(k, dtype=R.dtype, device=R.device), upper=True)
    h = k // 2
    out = torch.empty_like(R)
    out[h:, :h] = 0
    out[:h, :h] = A = _triangular_inverse(R[:h, :h], base)
    out[h:, h:] = C = _triangular_inverse(R[h:, h:], base)
    out[:h, h:] = _upper_times(A, _upper_times(C, R[:h, h:], base, right=True), base).neg_()
    return out


def _upper_times(T: torch.Tensor, B: torch.Tensor, base: int = 512, right: bool = False) -> torch.Tensor:
    """T @ B (`right`: B @ T) for upper-triangular T, by halves: [T1 T12; 0 T2] times B's halves, the zero block
    skipped, so half the work of a full product (BLAS's trmm, which torch does not expose)."""
    h = T.shape[0]
    if h <= base:
        return B @ T if right else T @ B
    a = h // 2
    T1, T12, T2 = T[:a, :a], T[:a, a:], T[a:, a:]
    if right:  # [B1 B2] T = [B1 T1, B1 T12 + B2 T2]
        out = torch.empty(B.shape[0], h, dtype=B.dtype, device=B.device)
        out[:, :a] = _upper_times(T1, B[:, :a], base, right=True)
        out[:, a:] = _upper_times(T2, B[:, a:], base, right=True)
        out[:, a:].addmm_(B[:, :a], T12)
    else:  # T [B1; B2] = [T1 B1 + T12 B2; T2 B2]
        out = torch.empty(h, B.shape[1], dtype=B.dtype, device=B.device)
        out[:a] = _upper_times(T1, B[:a], base)
        out[:a].addmm_(T12, B[a:])
        out[a:] = _upper_times(T2, B[a:], base)
    return out


def rtn(weight: torch.Tensor, spec: QuantSpec, search: str = "weighted",
        importance: torch.Tensor | None = None, block: BlockType | None = None) -> QuantResult:
    """Round to nearest on the same grid: the baseline every GPTQ figure is compared with. `importance` [K] (the
    Hessian diagonal, as llama.cpp's imatrix) weights the grid search; None weighs every column alike. `block`: the
    GGML block type's grid instead of `spec`'s, fitted as GPTQ.quantize fits it."""
    W = weight.detach().to(torch.float32)
    if block is not None:
        grid = fit_grid(W, block, importance)
        q = grid.codes(W)
        return QuantResult(q.to(torch.int16), None, None, None, grid.values(q), grid=grid)
    k = W.shape[1]
    spec.check_k(k)
    scales, zeros = group_params(W, spec, search, importance)
    g_idx = make_g_idx(k, spec, W.device)
    s, z = scales[g_idx.long()].t(), zeros[g_idx.long()].t()
    codes = quantize_codes(W, s, z, spec.maxq)
    deq = dequantize(codes, s, z)
    return QuantResult(codes.to(torch.uint8), scales, zeros.to(torch.int32), g_idx, deq)
