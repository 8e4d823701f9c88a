import pytest
import torch

from minicpm_edge.errors import UserError
from minicpm_edge.quant import GPTQ, QuantResult, QuantSpec, rtn
from minicpm_edge.quant.gptq import _inverse_cholesky, _triangular_inverse, _upper_times, group_aware_order
from minicpm_edge.quant.grid import (dequantize, find_params, group_params, pack_qweight, pack_qzeros, quantize_codes,
                                     unpack_qweight, unpack_qzeros)


def correlated(n=2048, k=256, seed=0):
    """x = z @ A with a random mixing matrix A: strongly correlated input features, like a real Linear's inputs."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5
    return torch.randn(n, k, generator=g) @ mix + 0.05 * torch.randn(n, k, generator=g)


def weight(n=128, k=256, seed=1):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k ** 0.5


def solver(x):
    g = GPTQ(x.shape[-1])
    for chunk in x.split(512):
        g.add_batch(chunk)
    return g


def out_err(x, w, deq) -> float:
    return float((x @ (w - deq).t()).pow(2).sum())


def check(r: QuantResult, spec: QuantSpec) -> None:
    """The invariants every result keeps: exact dequantisation from its own tensors, lossless GPTQ v1 packing."""
    n, k = r.codes.shape
    assert r.codes.dtype == torch.uint8 and r.zeros.dtype == torch.int32 and r.g_idx.dtype == torch.int32
    assert r.scales.shape == r.zeros.shape == (spec.groups(k), n) and r.g_idx.shape == (k,)
    assert int(r.codes.max()) <= spec.maxq and int(r.zeros.min()) >= 0 and int(r.zeros.max()) <= spec.maxq
    assert torch.equal(r.scales.half().float(), r.scales)  # what the checkpoint stores (fp16) loses nothing
    gi = r.g_idx.long()
    assert torch.equal(dequantize(r.codes.float(), r.scales[gi].t(), r.zeros[gi].t().float()), r.dequantized)
    assert torch.equal(unpack_qweight(pack_qweight(r.codes, spec.bits), spec.bits, k), r.codes)
    assert torch.equal(unpack_qzeros(pack_qzeros(r.zeros, spec.bits), spec.bits, n), r.zeros)
    assert torch.isfinite(r.dequantized).all()


@pytest.fixture(scope="module")
def calib():
    x = correlated()
    return x, weight(), solver(x)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
def test_gptq_beats_rtn(calib, sym, group):
    x, w, g = calib
    spec = QuantSpec(4, group, sym)
    r, b = g.quantize(w, spec), rtn(w, spec)
    check(r, spec)
    check(b, spec)
    assert r.perm is None and r.damp_used == 0.01 and r.loss > 0
    eg, er = out_err(x, w, r.dequantized), out_err(x, w, b.dequantized)
    assert eg < 0.6 * er, (eg, er)  # measured 0.48-0.51 for every grid here
    # the error computed from H equals the error measured on the activations
    want = (eg / float((x @ w.t()).pow(2).sum())) ** 0.5
    assert g.output_error(w, r.dequantized) == pytest.approx(want, rel=1e-3)
    # the denominator's products in bfloat16 (the layer's compute type on bf16 CPUs): the same figure within 1e-3
    assert g.output_error(w, r.dequantized, r, torch.bfloat16) == pytest.approx(want, rel=1e-3)


def test_rtn_is_plain_rounding():
    w = weight()
    spec = QuantSpec(4, 64, False)
    r = rtn(w, spec)
    gi = r.g_idx.long()
    s, z = r.scales[gi].t(), r.zeros[gi].t().float()
    assert torch.equal(r.codes.float(), torch.clamp(torch.round(w / s) + z, 0, 15))
    assert r.damp_used == 0 and r.perm is None


def test_hessian_is_two_over_n_sum_xxt():
    x = correlated(n=300, k=32)
    g = GPTQ(32)
    g.add_batch(x[:100])
    g.add_batch(x[100:].view(2, 100, 32))  # any leading shape
    assert g.n == 300 and torch.allclose(g.H, 2 / 300 * x.t() @ x, atol=1e-5)
    masked = GPTQ(32)
    mask = torch.zeros(300, dtype=torch.bool)
    mask[:120] = True
    masked.add_batch(x, mask)  # padding is left out and not counted
    masked.add_batch(x, torch.zeros(300, dtype=torch.bool))  # an all-padding batch changes nothing
    assert masked.n == 120 and torch.allclose(masked.H, 2 / 120 * x[:120].t() @ x[:120], atol=1e-5)


@pytest.mark.parametrize("n", [64, 1024])
def test_bf16_inputs_give_the_float32_hessian(n):
    """bfloat16 inputs (the layer's compute type on bf16 CPUs and GPUs), with what real activations have: a common
    offset, a massive-activation channel, a first token per 64 (an attention sink) 60x the others' squared norm.
    H is the float32 product of the bf16 values; a bf16 product (the earlier code) was off by 2.6e-3 of H here
    and needed 10% damping at both sizes."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, 256, generator=gen) + 3 * torch.randn(256, generator=gen)
    x[:, 7] += 100
    x[::64] *= 60 ** 0.5
    x = x.bfloat16()
    g, want = GPTQ(256), GPTQ(256)
    for part in x.split(500):
        g.add_batch(part)
        want.add_batch(part.float())
    assert g.n == n and torch.equal(g.H, want.H)
    w = weight(64, 256)
    assert g.quantize(w, QuantSpec(4, 32, True)).damp_used == 0.01


@pytest.mark.parametrize("act_order", [False, True])
def test_dead_columns(act_order):
    x = correlated(n=1024, k=128)
    x[:, 5] = 0
    x[:, 70] = 0
    w = weight(k=128)
    spec = QuantSpec(4, 32, False)
    r = solver(x).quantize(w, spec, act_order=act_order, static_groups=act_order)
    check(r, spec)
    assert (r.dequantized[:, [5, 70]] == 0).all()


def test_damping_grows_when_cholesky_fails():
    x = correlated(n=16, k=128)  # rank 16 < 128: singular H
    g = solver(x)
    spec = QuantSpec()
    r = g.quantize(weight(k=128), spec, damp=0.0)
    check(r, spec)
    assert r.damp_used > 0


def test_damping_gives_up_with_user_error():
    g = GPTQ(32)
    g.add_batch(torch.randn(64, 32))
    g.H = -g.H  # negative definite: no damping of the form d*mean(diag H) helps
    with pytest.raises(UserError, match="not positive definite"):
        g.quantize(weight(k=32), QuantSpec())


def test_act_order_with_static_groups(calib):
    x, w, g = calib
    spec = QuantSpec(4, 32, False)
    plain = g.quantize(w, spec)
    static = g.quantize(w, spec, static_groups=True)
    r = g.quantize(w, spec, act_order=True, static_groups=True)
    check(r, spec)
    check(static, spec)
    assert r.g_idx.tolist() == [i // 32 for i in range(256)]  # groups contiguous, original column order
    assert sorted(r.perm.tolist()) == list(range(256)) and r.perm.tolist() != list(range(256))
    assert torch.equal(r.scales, static.scales) and torch.equal(r.zeros, static.zeros)  # up-front parameters
    e_act, e_plain = out_err(x, w, r.dequantized), out_err(x, w, plain.dequantized)
    assert e_act < 1.15 * e_plain, (e_act, e_plain)
    assert e_act < 0.6 * out_err(x, w, rtn(w, spec).dequantized)


def test_act_order_needs_static_groups(calib):
    x, w, g = calib
    with pytest.raises(UserError, match="static groups"):
        g.quantize(w, QuantSpec(), act_order=True)
    spec = QuantSpec(4, -1)  # per channel: one group, trivially contiguous
    r = g.quantize(w, spec, act_order=True)
    check(r, spec)
    assert r.perm is not None



def test_group_aware_order():
    diag = torch.tensor([1., 5, 2, 0, 9, 3, 3, 4, 0, 0, 7, 1])
    perm = group_aware_order(diag, 4).tolist()
    # groups by their largest entry (9 > 7 > 5), columns by decreasing diagonal inside each, ties in index order
    assert perm == [4, 7, 5, 6, 10, 11, 8, 9, 1, 2, 0, 3]


def unequal_features(seed=0):
    """Correlated inputs whose features differ in scale by orders of magnitude, as real LLM activations do."""
    return correlated(seed=seed) * torch.exp(torch.randn(256, generator=torch.Generator().manual_seed(seed + 7)))


@pytest.mark.parametrize("sym", [True, False])
def test_column_orders_on_unequal_features(sym):
    """GAR and act-order (static groups) keep contiguous groups and beat natural order where feature scales differ."""
    x, w = unequal_features(), weight()
    g, spec = solver(x), QuantSpec(4, 32, sym)
    natural = g.quantize(w, spec)
    gar = g.quantize(w, spec, group_aware=True)
    act = g.quantize(w, spec, act_order=True, static_groups=True)
    for r in (gar, act):
        check(r, spec)
        assert r.g_idx.tolist() == [i // 32 for i in range(256)]
    assert gar.perm.tolist() == group_aware_order(torch.diag(g.H), 32).tolist()
    e = {name: out_err(x, w, r.dequantized) for name, r in (("natural", natural), ("gar", gar), ("act", act))}
    # measured (Zen 5): gar 0.92-0.93x natural, act 0.698x symmetric, 0.7001x asymmetric (a 0.7 bound failed there)
    assert e["gar"] < 0.97 * e["natural"] and e["act"] < 0.75 * e["natural"], e
    # GAR's parameters are found per group from its updated columns: not the up-front ones static groups use
    static = g.quantize(w, spec, static_groups=True)
    assert not torch.equal(gar.scales, static.scales)
    assert torch.equal(g.quantize(w, spec, group_aware=True).codes, gar.codes)  # deterministic

def test_bad_calibration():
    g = GPTQ(16)
    with pytest.raises(UserError, match="no calibration tokens"):
        g.quantize(weight(k=16, n=8), QuantSpec(4, -1))
    g.add_batch(torch.randn(10, 16), torch.zeros(10, dtype=torch.bool))
    with pytest.raises(UserError, match="no calibration tokens"):
        g.quantize(weight(k=16, n=8), QuantSpec(4, -1))
    x = torch.randn(10, 16)
    x[3, 3] = float("nan")
    with pytest.raises(UserError, match="NaN or Inf"):
        g.add_batch(x)
    with pytest.raises(UserError, match="features"):
        g.add_batch(torch.randn(10, 8))
    H = g.H.clone()
    for big in (1e19, 2e19):  # finite, but sums of their squares overflow float32 (10 x 1e38 > 3.4e38): refused
        with pytest.raises(UserError, match="overflow float32"):
            g.add_batch(torch.full((10, 16), big))
    assert torch.equal(g.H, H)  # refused before H changed
    for big in (1e18, 5e18):  # 1e37 per entry: within the quick bound; 2.5e38: the bound fails, the sums do not
        ok = GPTQ(16)
        ok.add_batch(torch.full((10, 16), big))
        assert ok.n == 10 and torch.isfinite(ok.H).all()
    g.add_batch(torch.randn(10, 16))
    with pytest.raises(UserError, match="input features"):
        g.quantize(weight(k=32, n=8), QuantSpec(4, -1))


def test_low_bits_damage_ordering(calib):
    x, w, g = calib
    errs = [g.output_error(w, g.quantize(w, QuantSpec(b, 32)).dequantized) for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 0.01


def test_mse_and_three_bit(calib):
    x, w, g = calib
    spec = QuantSpec(3, 128, False)
    r = g.quantize(w, spec, search="mse")
    check(r, spec)
    assert out_err(x, w, r.dequantized) < 0.6 * out_err(x, w, rtn(w, spec, "mse").dequantized)


def reference_gptq(H, w, spec, damp=0.01, act_order=False):
    """Textbook GPTQ (one column at a time over all later columns: no lazy block updates, no shared factorisation,
    H^-1 through cholesky_inverse): what the optimised solver must reproduce."""
    W, H, k = w.clone(), H.clone(), w.shape[1]
    glen = spec.group_len(k)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    static = group_params(W, spec, "weighted", torch.diag(H)) if act_order else None
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k)
    W, H = W[:, perm], H[perm][:, perm]
    diag = torch.diag(H).clone()
    H.diagonal().add_(damp * diag.mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for j in range(k):
        g = int(perm[j]) // glen
        if static is not None:
            s, z = static[0][g], static[1][g]
        elif j % glen == 0:
            s, z = find_params(W[:, j:j + glen], spec, "weighted", diag[j:j + glen])
        Q[:, j] = dequantize(quantize_codes(W[:, j], s, z, spec.maxq), s, z)
        err = (W[:, j] - Q[:, j]) / U[j, j]
        W[:, j:] -= err[:, None] * U[j, j:][None, :]
    return Q[:, torch.argsort(perm)]


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("spec", [QuantSpec(4, 32, True), QuantSpec(4, 128, False), QuantSpec(3, -1, True)])
def test_optimised_solver_matches_textbook_gptq(calib, act_order, spec):
    """Lazy block updates, the reversed-Cholesky inverse, the transposed in-place loop: same codes (up to float
    rounding ties), same output error as the textbook loop."""
    x, w, g = calib
    r = g.quantize(w, spec, act_order=act_order, static_groups=act_order)
    ref = reference_gptq(g.H, w, spec, act_order=act_order)
    check(r, spec)
    same = float((r.dequantized == ref).float().mean())
    e, e_ref = g.output_error(w, r.dequantized), g.output_error(w, ref)
    assert same > 0.99 and e == pytest.approx(e_ref, rel=2e-3), (same, e, e_ref)  # measured >= 0.9965, 1e-5


def test_factorisation_is_shared_until_h_changes(calib):
    x, w, g = calib
    spec = QuantSpec(4, 32, True)
    a = g.quantize(w, spec, act_order=True, static_groups=True)
    first = g._factored[2][3]
    b = g.quantize(w * 0.5, spec, act_order=True, static_groups=True)  # another Linear on the same inputs
    assert g._factored[2][3] is first and a.perm.tolist() == b.perm.tolist()
    h = GPTQ(256)
    h.add_batch(x)
    h.quantize(w, spec)
    before = h._factored[2][3]
    h.add_batch(x[:100] * 3)  # more tokens: a new factorisation
    h.quantize(w, spec)
    assert h._factored[2][3] is not before and not torch.equal(h._factored[2][3], before)


def test_inverse_cholesky_is_the_upper_factor_of_the_damped_inverse(calib):
    _, _, g = calib
    U, d = _inverse_cholesky(g.H, 0.01)
    Hd = g.H + 0.01 * torch.diag(g.H).mean() * torch.eye(256)
    assert d == 0.01 and torch.equal(U, U.triu()) and (torch.diag(U) > 0).all()
    assert torch.allclose(U.t() @ U @ Hd, torch.eye(256), atol=1e-3)
    big = torch.randn(1500, 1100)  # above the recursion's base: the blockwise triangular inverse
    U2, _ = _inverse_cholesky(big.t() @ big / 1500, 0.01)
    ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(
        big.t() @ big / 1500 + 0.01 * torch.diag(big.t() @ big / 1500).mean() * torch.eye(1100))), upper=True)
    assert torch.allclose(U2, ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()))


def test_triangular_products_skip_only_zeros():
    """The triangular inverse's products by halves (odd sizes, a small base so that they recurse four levels deep)
    equal the full products with the triangle; the inverse inverts."""
    torch.manual_seed(0)
    T = torch.randn(301, 301, dtype=torch.float64).triu() + 20 * torch.eye(301, dtype=torch.float64)
    B, Bt = torch.randn(301, 77, dtype=torch.float64), torch.randn(55, 301, dtype=torch.float64)
    assert torch.allclose(_upper_times(T, B, base=16), T @ B)
    assert torch.allclose(_upper_times(T, Bt, base=16, right=True), Bt @ T)
    inv = _triangular_inverse(T, base=16)
    assert torch.equal(inv, inv.triu()) and torch.allclose(inv @ T, torch.eye(301, dtype=torch.float64))


@pytest.mark.parametrize("case", ["sym-g32", "asym-g64", "act-order", "per-channel", "q4_k-block", "q6_k-block"])
def test_output_error_from_the_solver_loss(case):
    """The report's numerator from the solver's loss (2 loss - damping terms) equals the quadratic form it replaces,
    with dead inputs (always-zero features), act-order and GGML block grids (where a dead weight's code need not be
    0)."""
    from minicpm_edge.quant.kquant import TYPES

    x = correlated(k=512)
    x[:, [3, 100, 101]] = 0  # dead inputs
    w = weight(k=512)
    g = solver(x)
    kw = {"sym-g32": dict(spec=QuantSpec(4, 32, True)), "asym-g64": dict(spec=QuantSpec(4, 64, False)),
          "act-order": dict(spec=QuantSpec(4, 32, True), act_order=True, static_groups=True),
          "per-channel": dict(spec=QuantSpec(3, -1, False)),
          "q4_k-block": dict(spec=QuantSpec(), block=TYPES["Q4_K"]),
          "q6_k-block": dict(spec=QuantSpec(), block=TYPES["Q6_K"])}[case]
    r = g.quantize(w, kw.pop("spec"), **kw)
    assert r.loss > 0
    fast, exact = g.output_error(w, r.dequantized, r), g.output_error(w, r.dequantized)
    assert fast == pytest.approx(exact, rel=1e-4)
    assert exact == pytest.approx((out_err(x, w, r.dequantized) / float((x @ w.t()).pow(2).sum())) ** 0.5, rel=1e-3)


def test_gptaq_target_is_the_exact_asymmetric_objective(calib):
    """GPTQ.target: for any Q, ||Q X - W Xn||^2 - ||(Q - W*) X||^2 is one constant (W* = the exact least-squares
    target, damping ~0), so GPTQ on W* minimises the unquantised-output objective; native inputs equal to the
    quantised ones give W itself; half the correction is half of it."""
    x, w, _ = calib
    xn = x + 0.1 * correlated(seed=5)  # the unquantised model's inputs: the quantised ones plus upstream error
    g = GPTQ(x.shape[1])
    for a, b in zip(x.split(512), xn.split(512)):
        g.add_batch(a, native=b)
    t = g.target(w, alpha=1.0, damp=1e-9).double()
    X, Xn, W = x.double(), xn.double(), w.double()
    consts = []
    for seed in range(3):
        Q = W + 0.05 * torch.randn(W.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        consts.append(float((X @ Q.t() - Xn @ W.t()).square().sum() - (X @ (Q - t).t()).square().sum()))
    scale = float((Xn @ W.t()).square().sum())
    assert max(consts) - min(consts) < 1e-4 * scale, consts
    half = g.target(w, alpha=0.5, damp=1e-9)
    assert torch.allclose(half, (w + t.float()) / 2, atol=1e-5)
    same = GPTQ(x.shape[1])
    same.add_batch(x, native=x)
    assert torch.equal(same.target(w), w) and torch.equal(solver(x).target(w), w)  # no native inputs: W


@pytest.mark.parametrize("order", [{}, dict(act_order=True, static_groups=True)])
def test_gptaq_target_of_stacked_rows_is_each_rows_target(calib, order):
    """A matrix with more rows than inputs (q, k, v or gate, up stacked) takes the correction through the K x K
    product first: the same target, row for row, as its parts' (fewer rows than inputs, through W dXX^T first)."""
    x, _, _ = calib
    g = GPTQ(x.shape[1])
    g.add_batch(x, native=x + 0.1 * correlated(seed=5))
    tall = weight(3 * x.shape[1], x.shape[1], seed=9)
    spec = QuantSpec(4, 32, True)
    whole = g.target(tall, 0.5, 0.01, spec, **order)
    parts = torch.cat([g.target(w, 0.5, 0.01, spec, **order) for w in tall.split(x.shape[1] // 2)])
    assert (whole - parts).norm() < 1e-4 * (whole - tall).norm() and not torch.equal(whole, tall)


def test_gptaq_beats_gptq_on_its_objective(calib):
    """Quantising W* rather than W lowers the error against the unquantised outputs, ||Q X - W Xn||."""
    x, w, _ = calib
    drift = torch.randn(x.shape[1], x.shape[1], generator=torch.Generator().manual_seed(7)) / x.shape[1] ** 0.5
    xn = x + 0.1 * x @ drift  # upstream error that the quantised inputs still carry the trace of
    g = GPTQ(x.shape[1])
    g.add_batch(x, native=xn)
    spec = QuantSpec(4, 32, True)
    plain = g.quantize(w, spec, act_order=True, static_groups=True).dequantized
    aq = g.quantize(g.target(w), spec, act_order=True, static_groups=True).dequantized
    err = [float((x @ q.t() - xn @ w.t()).square().sum()) for q in (plain, aq)]
    assert err[1] < 0.7 * err[0], err


def test_gptaq_batches_must_agree(calib):
    x, _, _ = calib
    g = GPTQ(x.shape[1])
    g.add_batch(x[:64], native=x[:64])
    with pytest.raises(UserError, match="every calibration batch or with none"):
        g.add_batch(x[64:128])
    with pytest.raises(UserError, match="do not match"):
        g.add_batch(x[64:128], native=x[:32])
    masked = GPTQ(x.shape[1])
    mask = torch.arange(128) % 3 != 0
    masked.add_batch(x[:128], mask, native=x[:128] * 1.1)
    ref = GPTQ(x.shape[1])
    ref.add_batch(x[:128][mask], native=x[:128][mask] * 1.1)
    assert torch.allclose(masked.dXXt, ref.dXXt) and masked.n == ref.n


def test_gptaq_target_damps_more_when_the_hessian_is_singular():
    """A rank-deficient Hessian (fewer tokens than features) with no damping: the target grows the damping as the
    solver does instead of failing, and stays finite."""
    g = GPTQ(64)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    g.add_batch(x, native=x * 1.05)
    t = g.target(torch.randn(8, 64), alpha=1.0, damp=0.0)
    assert torch.isfinite(t).all()


def test_gptaq_target_factorises_once_per_hessian(calib, monkeypatch):
    """q, k, v (and gate, up) read one Hessian: target and quantize (with the same options) share one factorisation,
    made again only after H changes; in act order the target is the same weight (the order is only the factor's)."""
    x, w, _ = calib
    g = GPTQ(x.shape[1])
    g.add_batch(x[:512], native=x[:512] * 1.02)
    calls = []
    real = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda *a, **k: calls.append(1) or real(*a, **k))
    spec, order = QuantSpec(4, 32, True), dict(act_order=True, static_groups=True)
    first = g.target(w, 1.0, 0.01, spec, **order)
    assert torch.equal(g.target(w, 1.0, 0.01, spec, **order), first) and len(calls) == 1
    g.quantize(first, spec, 0.01, **order)
    assert len(calls) == 1
    natural = g.target(w, 1.0, 0.01, spec)
    assert len(calls) == 2 and (natural - first).norm() < 1e-4 * (natural - w).norm()
    g.add_batch(x[512:1024], native=x[512:1024] * 1.02)
    g.target(w)
    assert len(calls) == 3


@pytest.mark.parametrize("grid", ["v1", "Q4_K", "Q5_0"])
def test_stacked_solve_is_the_separate_solves(grid):
    """The driver solves the Linears that share an input and a grid type (q, k, v; gate, up) as one matrix of stacked
    rows: split, it is bit for bit the separate solves, with each part's own loss and output error."""
    from minicpm_edge.quant.kquant import TYPES

    x = correlated(k=512)
    g = solver(x)
    ws = [weight(96, 512, seed=3), weight(32, 512, seed=4), weight(64, 512, seed=5)]
    kw = dict(act_order=True, static_groups=True, block=None if grid == "v1" else TYPES[grid])
    spec = QuantSpec(4, 32, True)
    parts = g.quantize(torch.cat(ws), spec, **kw).split([w.shape[0] for w in ws])
    for w, part in zip(ws, parts):
        alone = g.quantize(w, spec, **kw)
        assert torch.equal(part.codes, alone.codes) and torch.equal(part.dequantized, alone.dequantized)
        assert part.loss == pytest.approx(alone.loss, rel=1e-5)
        want = g.output_error(w, alone.dequantized)
        assert g.output_error(w, part.dequantized, part) == pytest.approx(want, rel=1e-3)
        if grid == "v1":
            check(part, spec)
            assert torch.equal(part.scales, alone.scales) and torch.equal(part.zeros, alone.zeros)
        else:
            assert torch.equal(part.grid.scale, alone.grid.scale) and torch.equal(part.grid.offset, alone.grid.offset)
        first = parts[0].codes.untyped_storage().data_ptr()
        assert part is parts[0] or part.codes.untyped_storage().data_ptr() != first  # no storage shared between parts
    with pytest.raises(ValueError, match="add up"):
        parts[0].split([10])


def test_flush_denormals_is_scoped():
    """Inside, a float32 denormal computes as 0; outside, the mode the caller had (off, or on) is back."""
    from minicpm_edge.quant.grid import flush_denormals

    tiny = torch.tensor([1e-39])
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals")
    with flush_denormals():
        assert (tiny * 1.0).item() == 0
    assert (tiny * 1.0).item() != 0
    torch.set_flush_denormal(True)
    try:
        with flush_denormals():
            pass
        assert (tiny * 1.0).item() == 0
    finally:
        torch.set_flush_denormal(False)
