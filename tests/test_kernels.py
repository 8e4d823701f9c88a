"""The compiled inner loops (quant/kernels.py) against the torch code they replace on CPU."""

import types

import pytest
import torch

from minicpm_edge.quant import QuantSpec, gptq, grid, kernels, kquant
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
    out = [(W.clone(), torch.empty(m, n, dtype=dt), torch.empty(m, n)) for dt in (torch.float32, torch.int16)]
    gptq.grid_run(out[0][0], U, *args, out[0][1], out[0][2])
    kernels.grid_run(out[1][0], U, *args, out[1][1], out[1][2])  # the codes straight into their storage type
    for x, y in zip(*out):
        assert torch.allclose(x, y.float(), atol=1e-6)
    assert torch.equal(out[0][1].short(), out[1][1]) and int(out[1][1].min()) < 0  # signed codes stay signed


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


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, True), QuantSpec(4, 32, False), QuantSpec(3, 128, False),
                                  QuantSpec(8, -1, True)])
def test_compiled_weighted_search_matches_torch(monkeypatch, spec):
    """group_params' weighted search with its sums compiled: the torch search's scales and zeros but for near-ties
    between candidates (the sums run in another order; measured 0.9995-1 of the scales alike, zeros 0.99997-1; at 8
    bits the candidates' errors differ by less than the float32 sums' rounding, and 0.98 of the scales are alike;
    the bounds hold whatever the CPU's vector width)."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(200, 512, generator=g) * 0.02
    imp = torch.rand(512, generator=g) + 0.1
    s1, z1 = grid.group_params(w, spec, "weighted", imp)
    monkeypatch.setattr(grid, "kernels", TORCH)
    s0, z0 = grid.group_params(w, spec, "weighted", imp)
    assert s1.shape == s0.shape == (spec.groups(512), 200)
    alike = 0.995 if spec.bits < 8 else 0.95
    assert float((s1 == s0).float().mean()) > alike and float((z1 == z0).float().mean()) > 0.999

    def err(s, z):  # the weighted error the search minimises, over every group
        gi = torch.arange(512) // spec.group_len(512)
        q = torch.clamp(torch.round(w / s[gi].t()) + z[gi].t(), 0, spec.maxq)
        return float((((q - z[gi].t()) * s[gi].t() - w) ** 2 * imp).sum())

    # at 8 bits the near-ties decide: measured 1.9e-4 apart on an AMD EPYC (AVX512: another summation order), under
    # 1e-4 on a Xeon
    assert err(s1, z1) == pytest.approx(err(s0, z0), rel=1e-4 if spec.bits < 8 else 1e-3)


def test_group_params_in_chunks_is_one_search(monkeypatch):
    """group_params hands find_params a few groups at a time (CHUNK): the same parameters as one call on them all."""
    spec = QuantSpec(4, 32, False)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(6))
    imp = torch.rand(256, generator=torch.Generator().manual_seed(7)) + 0.1
    monkeypatch.setattr(grid, "CHUNK", 64 * 32 * 3)  # three groups per call, the last call two
    chunked = grid.group_params(w, spec, "weighted", imp)
    rows = w.reshape(64, 8, 32).transpose(0, 1).reshape(-1, 32)
    s, z = grid.find_params(rows, spec, "weighted", imp.reshape(8, 1, 32).expand(8, 64, 32).reshape(-1, 32))
    assert torch.equal(chunked[0], s.view(8, 64)) and torch.equal(chunked[1], z.view(8, 64))


def test_compiled_choice_is_torchs():
    """kernels.choose takes the candidates grid._choose takes, bit for bit (same float64 errors, same order)."""
    g = torch.Generator().manual_seed(8)
    r, c = 500, 6
    S, refit, Z = torch.rand(r, c, generator=g), torch.rand(r, c, generator=g), torch.randint(1, 15, (r, c)).float()
    A, B = torch.rand(r, c, generator=g).double(), torch.rand(r, c, generator=g).double()
    C = torch.rand(r, generator=g).double() + 1
    margin = 1e-6 * C
    refit[:, 2] = S[:, 2]  # exact ties: the earlier candidate stays
    start = torch.full((r,), float("inf"), dtype=torch.float64), torch.zeros(r), torch.zeros(r)
    best, scale, zero = kernels.choose(C, margin, S, refit, Z, A, B, *(t.clone() for t in start))
    ref = grid._choose(C, margin, S, refit, Z, A, B, *start)
    assert torch.equal(best, ref[0]) and torch.equal(scale, ref[1]) and torch.equal(zero, ref[2])
    assert len(set(scale.tolist()) & set(refit.flatten().tolist())) > 0  # both kinds of candidate win somewhere


@pytest.mark.parametrize("shape", [(1, 256), (96, 256)])
def test_solver_leaves_the_callers_weight_alone(hessian, shape):
    """The solver reads the weight without copying it (and its transpose is no copy for a single row): whatever the
    shape, the caller's tensor is unchanged, and the result is the same as from a copy of it."""
    w = weight(*shape)
    before = w.clone()
    r = hessian.quantize(w, QuantSpec(4, 32, True))
    assert torch.equal(w, before)
    assert torch.equal(r.codes, hessian.quantize(before.clone(), QuantSpec(4, 32, True)).codes)


def test_compiled_kernels_load_from_the_disk_cache_in_a_new_process(tmp_path):
    """Every kernel compiled in one process is loaded from numba's disk cache by the next (a kernel whose cache key
    changed per process, as one closing over another compiled function did, recompiled in each: 1.3-1.6 s)."""
    import json
    import os
    import subprocess
    import sys

    script = r"""
import json, torch
from minicpm_edge.quant import kernels
W, U, s, z = torch.randn(32, 64), torch.eye(32), torch.ones(32, 64), torch.zeros(32, 64)
a, e = torch.ones(32), torch.empty(32, 64)
kernels.group_run(W.clone(), U, s, z, 15, a, torch.empty(32, 64, dtype=torch.uint8), e)
kernels.grid_run(W.clone(), U, s, z, s, -8, 7, False, a, torch.empty(32, 64, dtype=torch.int16), e)
x = torch.randn(8, 32)
kernels.code_sums(x, x.abs(), x, torch.ones(8), torch.zeros(8), -8, 7, True)
kernels.centred_sums(x, x.abs(), x, torch.ones(8, 3), torch.zeros(8, 3), 15)
C, S, A = torch.ones(8).double(), torch.ones(8, 3), torch.ones(8, 3).double()
kernels.choose(C, C * 1e-6, S, S, S, A, A, torch.full((8,), 1e9).double(), torch.ones(8), torch.zeros(8))
stats = {f.py_func.__name__: (sum(f.stats.cache_hits.values()), sum(f.stats.cache_misses.values()))
         for f in kernels._compiled()}
print(json.dumps(stats))
"""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    runs = [json.loads(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                      check=True).stdout.splitlines()[-1]) for _ in range(2)]
    assert all(misses for hits, misses in runs[0].values()), runs[0]  # a fresh cache: each compiled once
    assert runs[1] == {name: [1, 0] for name in runs[0]}, runs[1]  # [hits, misses]
