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


@pytest.mark.parametrize("compiled", [True, False])
def test_group_params_in_chunks_is_one_search(monkeypatch, compiled):
    """group_params on every group at once (compiled) or a few groups at a time (torch, CHUNK): the same parameters
    as find_params on the groups as rows, each with its importance (compiled: one importance row per weight row)."""
    spec = QuantSpec(4, 32, False)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(6))
    imp = torch.rand(256, generator=torch.Generator().manual_seed(7)) + 0.1
    if not compiled:
        monkeypatch.setattr(grid, "kernels", TORCH)
    monkeypatch.setattr(grid, "CHUNK", 64 * 32 * 3)  # three groups per call, the last call two
    chunked = grid.group_params(w, spec, "weighted", imp)
    rows = w.reshape(64, 8, 32).transpose(0, 1).reshape(-1, 32)
    s, z = grid.find_params(rows, spec, "weighted", imp.reshape(8, 1, 32).expand(8, 64, 32).reshape(-1, 32))
    assert torch.equal(chunked[0], s.view(8, 64)) and torch.equal(chunked[1], z.view(8, 64))


def test_compiled_search_takes_every_importance_shape(monkeypatch):
    """find_params' importance as None, one per column, one per weight or one row for all: the compiled search gives
    torch's parameters (no near-ties at these sizes); a shape it does not take goes to torch's search."""
    g = torch.Generator().manual_seed(9)
    w = torch.randn(40, 32, generator=g)
    w[20:] = 0.25 * (torch.randint(0, 16, (20, 32), generator=g) - 8)  # on a grid: exact ties among the candidates
    w[20:, 0] = -2.0  # (the max-based scale and its codes' refit are both 0.25); the earlier one must stay
    cols = torch.rand(32, generator=g) + 0.1
    for spec in (QuantSpec(4, 32, True), QuantSpec(3, 32, False)):
        for imp in (None, cols, cols.expand(40, 32), cols[None], torch.rand(40, 1, generator=g) + 0.1):
            compiled = grid.find_params(w, spec, "weighted", imp)
            with monkeypatch.context() as m:
                m.setattr(grid, "kernels", TORCH)
                ref = grid.find_params(w, spec, "weighted", imp)
            assert torch.equal(compiled[0], ref[0]) and torch.equal(compiled[1], ref[1])
            assert torch.equal(compiled[0].half().float(), compiled[0])  # fp16-representable, as stored
            assert (grid._row_importance(imp, 40, 32) is None) == (imp is not None and imp.shape == (40, 1))


def test_compiled_fp16_rounding_is_torchs():
    """The compiled search's fp16 rounding (bit operations: numba has no float16) against torch's .half(): ties to
    even, the carry into the exponent, fp16's subnormals and its largest value, both signs."""
    import numpy as np

    kernels._compiled()
    half = torch.arange(0, 0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16).float()  # every finite fp16
    mid = ((half[1:].double() + half[:-1].double()) / 2).float()  # the ties
    near = torch.cat([torch.nextafter(mid, torch.zeros(1)), torch.nextafter(mid, torch.full((1,), 1e9))])
    rand = torch.rand(20000, generator=torch.Generator().manual_seed(10)) * 2.0 ** torch.randint(-30, 16, (20000,))
    x = torch.cat([half, mid, near, rand]).clamp(max=65504)
    x = torch.cat([x, -x])
    fb = np.empty(1, np.float32)
    got = torch.tensor([kernels._fp16(np.float32(v), fb, fb.view(np.uint32)) for v in x.tolist()])
    assert torch.equal(got.view(torch.int32), x.half().float().view(torch.int32))


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
kernels.weighted_params(x, torch.ones(1, 1, 32), True, 15, torch.ones(3))
stats = {f.py_func.__name__: (sum(f.stats.cache_hits.values()), sum(f.stats.cache_misses.values()))
         for f in kernels._compiled()}
print(json.dumps(stats))
"""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    runs = [json.loads(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                      check=True).stdout.splitlines()[-1]) for _ in range(2)]
    assert all(misses for hits, misses in runs[0].values()), runs[0]  # a fresh cache: each compiled once
    assert runs[1] == {name: [1, 0] for name in runs[0]}, runs[1]  # [hits, misses]
