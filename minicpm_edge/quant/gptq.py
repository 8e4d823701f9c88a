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
from .grid import QuantSpec, dequantize, find_params, make_g_idx, quantize_codes


@dataclass
class QuantResult:
    codes: torch.Tensor  # uint8 [N, K]
    scales: torch.Tensor  # float32 [groups, N] (fp16-representable)
    zeros: torch.Tensor  # int32 [groups, N] true zero points
    g_idx: torch.Tensor  # int32 [K]
    dequantized: torch.Tensor  # float32 [N, K] = scales[g_idx].T * (codes - zeros[g_idx].T)
    damp_used: float = 0.0
    loss: float = 0.0  # sum over columns of err^2 / d^2 (the GPTQ objective proxy)


class GPTQ:
    """Accumulates the Hessian of one Linear's inputs, then quantises its weight."""

    def __init__(self, in_features: int, device: str | torch.device = "cpu"):
        self.k = in_features
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add_batch(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """x [..., K]; mask [...] (True for real tokens) leaves padding out of H and out of the token count."""
        x = x.reshape(-1, self.k).float()
        if mask is not None:
            x = x[mask.reshape(-1).bool()]
        if not torch.isfinite(x).all():
            raise UserError("calibration activations contain NaN or Inf; check the model weights and calibration text")
        m = x.shape[0]
        if m == 0:
            return
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * math.sqrt(2 / self.n)
        self.H.addmm_(x.t(), x)

    def quantize(self, weight: torch.Tensor, spec: QuantSpec, damp: float = 0.01, blocksize: int = 128,
                 act_order: bool = False, static_groups: bool = False, mse: bool = False) -> QuantResult:
        if self.n == 0:
            raise UserError("no calibration tokens reached this layer")
        if act_order and not static_groups and spec.group_size != -1:
            raise UserError("act-order needs static groups (--static-groups) so groups stay contiguous along K")
        W = weight.detach().float().clone()
        n_out, k = W.shape
        spec.check_k(k)
        H = self.H.clone()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0

        glen = spec.group_len(k)
        static = None
        if static_groups or spec.group_size == -1:
            static = [find_params(W[:, g * glen:(g + 1) * glen], spec, mse) for g in range(spec.groups(k))]
        perm = None
        if act_order:
            perm = torch.argsort(torch.diag(H), descending=True)
            W, H = W[:, perm], H[perm][:, perm]
        Hinv, damp_used = _inverse_cholesky(H, damp)

        Q = torch.zeros_like(W)
        codes = torch.zeros_like(W)
        scales = torch.zeros(spec.groups(k), n_out)
        zeros = torch.zeros(spec.groups(k), n_out)
        losses = torch.zeros(n_out)
        col = perm if perm is not None else torch.arange(k)
        scale = zero = None
        for i1 in range(0, k, blocksize):
            i2 = min(i1 + blocksize, k)
            W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
            Err1 = torch.zeros_like(W1)
            for j in range(i2 - i1):
                c = int(col[i1 + j])  # original column index
                g = c // glen
                if static is not None:
                    scale, zero = static[g]
                elif c % glen == 0:  # entering a group: its columns as updated so far
                    scale, zero = find_params(torch.cat([W1[:, j:], W[:, i2:]], 1)[:, :glen], spec, mse)
                scales[g], zeros[g] = scale, zero
                w, d = W1[:, j], Hinv1[j, j]
                q = quantize_codes(w, scale, zero, spec.maxq)
                codes[:, i1 + j] = q
                Q[:, i1 + j] = dequantize(q, scale, zero)
                err = (w - Q[:, i1 + j]) / d
                losses += (w - Q[:, i1 + j]) ** 2 / d ** 2 / 2
                W1[:, j:] -= err[:, None] * Hinv1[j, j:][None, :]
                Err1[:, j] = err
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

        if perm is not None:
            inv = torch.argsort(perm)
            Q, codes = Q[:, inv], codes[:, inv]
        return QuantResult(codes.to(torch.uint8), scales, zeros.to(torch.int32), make_g_idx(k, spec), Q,
                           damp_used, float(losses.sum()))

    def output_error(self, weight: torch.Tensor, dequantized: torch.Tensor) -> float:
        """Relative output error ||X(W - Q)^T|| / ||XW^T|| over the calibration tokens, computed from H."""
        W = weight.float()
        D = W - dequantized
        num = torch.einsum("nk,kl,nl->", D, self.H, D)
        den = torch.einsum("nk,kl,nl->", W, self.H, W)
        return math.sqrt(max(float(num / den), 0.0)) if den > 0 else 0.0


def _inverse_cholesky(H: torch.Tensor, damp: float, tries: int = 8) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp*mean(diag H)*I)^-1; damping grows x10 until it factorises."""
    mean_diag = float(torch.diag(H).mean())
    d = damp
    for _ in range(tries):
        Hd = H.clone()
        Hd.diagonal().add_(d * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                return U, d
        d = 0.01 if d == 0 else d * 10
    raise UserError(f"the Hessian is not positive definite even with damping {d / 10:g}; "
                    "give more or more varied calibration text")


def rtn(weight: torch.Tensor, spec: QuantSpec, mse: bool = False) -> QuantResult:
    """Round to nearest on the same grid: the baseline every GPTQ figure is compared with."""
    W = weight.detach().float()
    n_out, k = W.shape
    spec.check_k(k)
    glen = spec.group_len(k)
    scales = torch.zeros(spec.groups(k), n_out)
    zeros = torch.zeros(spec.groups(k), n_out)
    codes = torch.zeros_like(W)
    for g in range(spec.groups(k)):
        w = W[:, g * glen:(g + 1) * glen]
        s, z = find_params(w, spec, mse)
        scales[g], zeros[g] = s, z
        codes[:, g * glen:(g + 1) * glen] = quantize_codes(w, s[:, None], z[:, None], spec.maxq)
    g_idx = make_g_idx(k, spec)
    deq = dequantize(codes, scales[g_idx.long()].t(), zeros[g_idx.long()].t())
    return QuantResult(codes.to(torch.uint8), scales, zeros.to(torch.int32), g_idx, deq)
