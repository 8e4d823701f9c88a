"""The compiled inner loops (quant/kernels.py) against the torch code they replace on CPU."""

import types

import pytest
import torch

from minicpm_edge.quant import QuantSpec, gptq, kernels, kquant
from test_gptq import correlated, solver, weight

TORCH = types.SimpleNamespace(usable=lambda *tensors: False)  # a kernels module that sends everything to torch


@pytest.fixture(scope="module")
def hessian():
    return solver(correlated(k=256))


def quantize(monkeypatch, module, g, w, **kw):
    """g.quantize with the solver's column runs compiled (module: kernels) or in torch (TORCH); the grid search in
    torch either way, so that both solve on the same grid."""
    monkeypatch.setattr(gptq, "kernels", module)
    monkeypatch.setattr(kquant, "kernels", TORCH)
    try:
        return g.quantize(w, **kw)
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("case", [
    dict(block="Q4_K"), dict(block="Q5_1"), dict(block="Q6_K"), dict(block="Q8_0"),
    dict(spec=QuantSpec(4, 32, True), act_order=True, static_groups=True),
    dict(spec=QuantSpec(4, 32, False)),  # groups found on the updated columns, natural order
    dict(spec=QuantSpec(3, 128, True), group_aware=True),
    dict(spec=QuantSpec(4, -1, False), act_order=True)])
def test_compiled_solver_matches_torch(monkeypatch, hessian, case):
    """Same codes and loss from the compiled column runs as from torch's, but for rounding ties (the two round a
    product of the same floats in another order). Where groups are found on the updated columns, a tie can move a
    group's scale and the codes after it: measured 0.9987 of the codes alike, loss within 3e-4 (looser bounds)."""
    kw = dict(case)
    if "block" in kw:
        kw.update(spec=QuantSpec(), block=kquant.TYPES[kw["block"]], act_order=True)
    w = weight(96, 256)
    a = quantize(monkeypatch, TORCH, hessian, w, **kw)
    b = quantize(monkeypatch, kernels, hessian, w, **kw)
    same = float((a.codes == b.codes).float().mean())
    found = "spec" in case and not case.get("static_groups") and case["spec"].group_size != -1
    assert same > (0.99 if found else 0.9999) and b.loss == pytest.approx(a.loss, rel=2e-3 if found else 1e-5), \
        (same, a.loss, b.loss)


def test_compiled_runs_cover_every_row():
    """Rows in chunks of kernels.ROWS: a width that is not a multiple of it is solved to its last row."""
    g = torch.Generator().manual_seed(3)
    m, n = 7, kernels.ROWS * 2 + 5
    W = torch.randn(m, n, generator=g)
    U = torch.triu(torch.rand(m, m, generator=g)) + torch.eye(m)
    scale = torch.full((m, n), 0.25)
    args = (scale, torch.zeros(m, n), scale, -8, 7, False, -1 / torch.diag(U))
    out = [(W.clone(), torch.empty(m, n), torch.empty(m, n)) for _ in range(2)]
    gptq.grid_run(out[0][0], U, *args, out[0][1], out[0][2])
    kernels.grid_run(out[1][0], U, *args, out[1][1], out[1][2])
    for x, y in zip(*out):
        assert torch.allclose(x, y, atol=1e-6)
    assert torch.equal(out[0][1], out[1][1])


@pytest.mark.parametrize("name", ["Q4_K", "Q5_1", "Q3_K"])
def test_compiled_code_sums_match_torch(monkeypatch, name):
    t = kquant.TYPES[name]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 8, t.sub, generator=g)
    iw = torch.rand(300, 8, t.sub, generator=g)
    scale = torch.rand(300, 8, generator=g) * 0.5 + 0.1
    scale[0, 0] = 0  # a zero scale gives code 0 (or its clamp) everywhere
    offset = torch.rand(300, 8, generator=g) if t.has_min else torch.zeros(300, 8)
    compiled = kquant._code_sums(x, iw, iw * x, scale, offset, t)
    monkeypatch.setattr(kquant, "kernels", TORCH)
    ref = kquant._code_sums(x, iw, iw * x, scale, offset, t)
    for a, b in zip(compiled, ref):
        if b is None:
            assert a is None
        else:
            assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "Q5_0", "Q5_1"])
def test_compiled_grid_fit_is_as_good_as_torch(monkeypatch, name):
    """fit_grid through the compiled code sums: the same weighted error to within the noise of near-ties between
    candidate scales (sums in another order pick the other of two near-equal candidates now and then)."""
    t = kquant.TYPES[name]
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(2)) * 0.02
    imp = torch.rand(512, generator=torch.Generator().manual_seed(4)) + 0.1

    def err(grid):
        return float(((grid.values(grid.codes(w)) - w) ** 2 * imp).sum())

    compiled = err(kquant.fit_grid(w, t, imp))
    monkeypatch.setattr(kquant, "kernels", TORCH)
    assert compiled == pytest.approx(err(kquant.fit_grid(w, t, imp)), rel=5e-3)


def test_kernels_take_float32_cpu_tensors_only():
    assert kernels.usable(torch.zeros(2), torch.zeros(2, 2))
    assert not kernels.usable(torch.zeros(2), torch.zeros(2, dtype=torch.float64))
    assert not kernels.usable(torch.zeros(2, device="meta"))
