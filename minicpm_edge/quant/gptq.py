"""GPTQ for one weight matrix (Frantar et al. 2022), in one readable file.

H = (2/n) sum x x^T over calibration tokens; columns are quantised left to right in blocks of 128 and each column's
rounding error is spread onto the not-yet-quantised columns through the upper Cholesky factor of H^-1.
Group parameters are found when a group is entered, from the error-updated weights (or up front with static groups,
which act-order requires so that groups stay contiguous along the input dimension).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import UserError
from .grid import QuantSpec, dequantize, find_params, group_params, make_g_idx, quantize_codes
from .kquant import BlockGrid, BlockType, fit_grid

DAMP_TRIES = 8  # damping grows x10 per failed Cholesky factorisation, at most this many attempts


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


class GPTQ:
    """Accumulates the Hessian of one Linear's inputs, then quantises its weight."""

    def __init__(self, in_features: int, device: str | torch.device = "cpu"):
        self.k = in_features
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add_batch(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """x [..., K]; mask [...] (True for real tokens) leaves padding out of H and out of the token count."""
        if x.shape[-1] != self.k:
            raise UserError(f"calibration activations have {x.shape[-1]} features, the layer expects {self.k}")
        x = x.detach().reshape(-1, self.k).to(self.H.device)
        if x.dtype != torch.bfloat16:
            x = x.float()
        if mask is not None:
            x = x[mask.reshape(-1).to(x.device, torch.bool)]
        m = x.shape[0]
        if m == 0:
            return
        xtx = (x.t() @ x).float()  # in bfloat16 when x is (fast; the running sum stays float32)
        if not torch.isfinite(xtx.diagonal()).all():  # a NaN/Inf anywhere in x reaches its column's diagonal entry
            raise UserError("calibration activations contain NaN or Inf (or overflow float32); check the model weights "
                            "and calibration text")
        self.H *= self.n / (self.n + m)  # running average: H stays (2/n) sum x x^T after every batch
        self.n += m
        self.H.add_(xtx, alpha=2 / self.n)

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
        W = weight.detach().to(torch.float32).clone()
        n_out, k = W.shape
        if k != self.k:
            raise UserError(f"weight has {k} input features, the calibration activations {self.k}")
        if block is None:
            spec.check_k(k)
        H = self.H.to(W.device).clone()
        if not torch.isfinite(H).all():
            raise UserError("the calibration Hessian overflowed float32; check the model's activations")
        dead = torch.diag(H) == 0  # inputs that are always zero: any weight there is free, quantise it as 0
        H[dead, dead] = 1
        W[:, dead] = 0

        glen, n_groups = spec.group_len(k), spec.groups(k)
        static, grid = None, None
        if block is not None:  # static by construction: fixed before any error update, original column order
            grid = fit_grid(W, block, torch.diag(H))
            n_groups = 0
        elif static_groups or spec.group_size == -1:  # parameters from the original weights, original column order
            static = group_params(W, spec, search, torch.diag(H))
        perm = None
        if act_order:
            perm = torch.argsort(torch.diag(H), descending=True)
        elif group_aware and spec.group_size != -1:
            perm = group_aware_order(torch.diag(H), glen)
        if perm is not None:
            W, H = W[:, perm], H[perm][:, perm]
        Hinv, damp_used = _inverse_cholesky(H, damp)
        diag = torch.diag(H)  # in processing order: each column's weight in the grid search

        dev = W.device
        Q = torch.zeros_like(W)
        codes = torch.zeros_like(W)
        scales = torch.zeros(n_groups, n_out, device=dev)
        zeros = torch.zeros(n_groups, n_out, device=dev)
        losses = torch.zeros(n_out, device=dev)
        order = perm.tolist() if perm is not None else range(k)  # original index of each processed column
        for i1 in range(0, k, blocksize):
            i2 = min(i1 + blocksize, k)
            W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
            Err1 = torch.zeros_like(W1)
            for j in range(i2 - i1):
                c = order[i1 + j]
                g = c // glen
                w, d = W1[:, j], Hinv1[j, j]
                if grid is not None:
                    q = grid.codes(w, c)
                    codes[:, i1 + j] = q
                    Q[:, i1 + j] = grid.values(q, c)
                elif static is not None:
                    scale, zero = static[0][g], static[1][g]
                    scales[g], zeros[g] = scale, zero
                elif (i1 + j) % glen == 0:  # entering a group (contiguous here): its columns as updated so far
                    inside = min(glen, i2 - i1 - j)  # the rest of the group lies after this block
                    cols = W1[:, j:j + glen]
                    if inside < glen:
                        cols = torch.cat([W1[:, j:], W[:, i2:i2 + glen - inside]], 1)
                    scale, zero = find_params(cols, spec, search, diag[i1 + j:i1 + j + glen])
                    scales[g], zeros[g] = scale, zero
                if grid is None:
                    q = quantize_codes(w, scale, zero, spec.maxq)
                    codes[:, i1 + j] = q
                    Q[:, i1 + j] = dequantize(q, scale, zero)
                err = (w - Q[:, i1 + j]) / d
                losses += err ** 2 / 2
                W1[:, j:] -= err[:, None] * Hinv1[j, j:][None, :]
                Err1[:, j] = err
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy update of the columns after this block

        if perm is not None:
            inv = torch.argsort(perm)
            Q, codes = Q[:, inv], codes[:, inv]
        if grid is not None:
            return QuantResult(codes.to(torch.int16), None, None, None, Q, damp_used, float(losses.sum()), perm, grid)
        return QuantResult(codes.to(torch.uint8), scales, zeros.to(torch.int32), make_g_idx(k, spec, dev), Q,
                           damp_used, float(losses.sum()), perm)

    def output_error(self, weight: torch.Tensor, dequantized: torch.Tensor) -> float:
        """Relative output error ||X(W - Q)^T|| / ||XW^T|| over the calibration tokens, computed from H."""
        W = weight.float().to(self.H.device)
        D = W - dequantized.float().to(self.H.device)
        num = torch.einsum("nk,kl,nl->", D, self.H, D)
        den = torch.einsum("nk,kl,nl->", W, self.H, W)
        return math.sqrt(max(float(num / den), 0.0)) if den > 0 else 0.0


def group_aware_order(diag: torch.Tensor, glen: int) -> torch.Tensor:
    """GAR's column order: groups by decreasing largest diagonal entry, columns by decreasing diagonal within each."""
    within, order = torch.sort(diag.view(-1, glen), dim=1, descending=True, stable=True)
    groups = torch.argsort(within[:, 0], descending=True, stable=True)
    return (order + torch.arange(len(groups), device=diag.device)[:, None] * glen)[groups].reshape(-1)


def _inverse_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + d*mean(diag H)*I)^-1 and the d used; d starts at `damp`, x10 per failure."""
    mean_diag = float(torch.diag(H).mean())
    d = damp
    for _ in range(DAMP_TRIES):
        Hd = H.clone()
        Hd.diagonal().add_(d * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                return U, d
        last, d = d, (0.01 if d == 0 else d * 10)
    raise UserError(f"the Hessian is not positive definite even with damping {last:g}; "
                    "give more or more varied calibration text")


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
