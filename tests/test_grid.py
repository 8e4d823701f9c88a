import dataclasses

import pytest
import torch

from minicpm_edge.errors import UserError
from minicpm_edge.quant.grid import (QuantSpec, dequantize, find_params, group_params, make_g_idx, pack_qweight,
                                     pack_qzeros, quantize_codes, unpack_qweight, unpack_qzeros)


def u32(t: torch.Tensor) -> list[int]:
    return [v & 0xFFFFFFFF for v in t.flatten().tolist()]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (48, 256), generator=g)
    q = pack_qweight(codes, bits)
    assert q.dtype == torch.int32 and q.shape == (256 * bits // 32, 48)
    back = unpack_qweight(q, bits, 256)
    assert back.dtype == torch.uint8 and torch.equal(back.long(), codes)
    zeros = torch.randint(0, 2 ** bits, (8, 64), generator=g)  # includes 0 and 2^bits - 1 (v1 wraps them)
    qz = pack_qzeros(zeros, bits)
    assert qz.dtype == torch.int32 and qz.shape == (8, 64 * bits // 32)
    assert torch.equal(unpack_qzeros(qz, bits, 64).long(), zeros)


def test_nibble_order_and_v1_zero_convention():
    codes = torch.arange(1, 9).repeat(4).view(1, 32).expand(3, 32)  # along K: 1..8, 1..8, ...
    q = pack_qweight(codes, 4)
    assert u32(q[0]) == [0x87654321] * 3  # first element in the lowest nibble, for every output column n
    sym_zeros = torch.full((2, 16), 8)
    assert (pack_qzeros(sym_zeros, 4) == 0x77777777).all()  # v1 stores zero - 1
    assert (pack_qzeros(sym_zeros, 4) == 2004318071).all()
    assert pack_qweight(torch.full((1, 8), 15), 4)[0, 0].item() == -1  # int32 two's complement
    # qzeros are packed along N, first output column in the lowest nibble
    assert u32(pack_qzeros(torch.arange(1, 9).view(1, 8), 4)) == [0x76543210]


def test_two_and_eight_bit_order():
    assert u32(pack_qweight(torch.tensor([[1, 2, 3, 0] * 4]), 2)) == [0b00111001 * 0x01010101]
    assert u32(pack_qweight(torch.tensor([[0x11, 0x22, 0x33, 0x44]]), 8)) == [0x44332211]


def autogptq_3bit_words(v: list[int]) -> list[int]:
    """32 values -> 3 words, written out the way AutoGPTQ's 3-bit pack loop places them (independent of grid.py)."""
    w = [0, 0, 0]
    for j in range(10):
        w[0] |= v[j] << (3 * j)
    w[0] |= (v[10] << 30) & 0xFFFFFFFF  # low 2 bits of value 10 end word 0 ...
    w[1] |= (v[10] >> 2) & 1  # ... its top bit starts word 1
    for j in range(11, 21):
        w[1] |= v[j] << (3 * (j - 11) + 1)
    w[1] |= (v[21] << 31) & 0xFFFFFFFF
    w[2] |= (v[21] >> 1) & 3
    for j in range(22, 32):
        w[2] |= v[j] << (3 * (j - 22) + 2)
    return w


def test_three_bit_matches_autogptq_layout():
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 8, (2, 64), generator=g)
    q = pack_qweight(codes, 3)
    assert q.shape == (6, 2)
    for n in range(2):
        expect = autogptq_3bit_words(codes[n, :32].tolist()) + autogptq_3bit_words(codes[n, 32:].tolist())
        assert u32(q[:, n]) == expect
    zeros = torch.randint(0, 8, (4, 32), generator=g)
    qz = pack_qzeros(zeros, 3)
    for gi in range(4):
        assert u32(qz[gi]) == autogptq_3bit_words(((zeros[gi] - 1) & 7).tolist())


def test_pack_refuses_out_of_range_and_partial_words():
    with pytest.raises(ValueError, match="outside"):
        pack_qweight(torch.full((2, 32), 16), 4)
    with pytest.raises(UserError, match="whole 32-bit words"):
        pack_qweight(torch.zeros(2, 20, dtype=torch.long), 4)


def test_symmetric_grid_uses_all_levels():
    """llama.cpp's Q4_0 rule: d = (signed value of largest magnitude) / -8, so that value is code 0, the other side
    reaches code 15; d is negative when the extreme is positive."""
    w = torch.tensor([[-1.0, -0.5, 0.0, 0.25, 0.7], [1.0, -0.5, 0.0, 0.25, 0.7]])
    s, z = find_params(w, QuantSpec(4, 32, True), "max")
    assert z.tolist() == [8, 8] and s.tolist() == [0.125, -0.125]
    q = quantize_codes(w, s[:, None], z[:, None], 15)
    assert q[:, 0].tolist() == [0, 0] and (q[:, 2] == 8).all()
    assert q[0].tolist() == [0, 4, 8, 10, 14] and q[1].tolist() == [0, 12, 8, 6, 2]
    assert torch.equal(dequantize(q, s[:, None], z[:, None])[:, :3], w[:, :3])  # -8d, -4d and 0 exactly
    ramp = torch.linspace(-1, 1, 32).view(1, 32)
    s, z = find_params(ramp, QuantSpec(4, 32, True), "max")
    assert quantize_codes(ramp, s[:, None], z[:, None], 15).unique().numel() == 16  # every level in use
    assert find_params(w, QuantSpec(3, 32, True))[1].tolist() == [4, 4]
    assert find_params(w, QuantSpec(8, 32, True))[1].tolist() == [128, 128]
    assert find_params(w, QuantSpec(3, 32, True), "max")[0].tolist() == [0.25, -0.25]


def test_asymmetric_grid_covers_range():
    w = torch.tensor([[-0.3] + [0.1 * i for i in range(31)]])
    s, z = find_params(w, QuantSpec(4, 32, False), "max")
    assert s.item() == pytest.approx((3.0 + 0.3) / 15, rel=1e-3) and z.item() == round(0.3 / s.item())
    deq = dequantize(quantize_codes(w, s[:, None], z[:, None], 15), s[:, None], z[:, None])
    assert (deq - w).abs().max() <= s.item() / 2 + 1e-6
    pos = torch.linspace(0.1, 3.0, 32).view(1, 32)
    for search in ("max", "weighted", "mse"):  # never 0: see the v1 zero-point test below
        assert find_params(pos, QuantSpec(4, 32, False), search)[1].item() == 1


def test_mse_search_never_worse():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g) ** 3  # heavy tails: clipping helps
    for spec in (QuantSpec(3, 128, False), QuantSpec(4, 128, True)):
        err = {}
        for mse in (False, True):
            s, z = find_params(w, spec, "mse" if mse else "max")
            deq = dequantize(quantize_codes(w, s[:, None], z[:, None], spec.maxq), s[:, None], z[:, None])
            err[mse] = (deq - w).abs().pow(2.4).sum(1)
        assert (err[True] <= err[False]).all() and err[True].sum() < 0.95 * err[False].sum()


def weighted_error(w, spec, s, z, imp):
    deq = dequantize(quantize_codes(w, s[:, None], z[:, None], spec.maxq), s[:, None], z[:, None])
    return (imp * (deq - w) ** 2).sum(1)


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, True), QuantSpec(4, 32, False), QuantSpec(3, 128, True),
                                  QuantSpec(2, 64, False)])
def test_weighted_search(spec):
    """Never worse than the max-based grid row by row in the weighted error, clearly better in sum; the importance
    steers it (each search wins on its own objective); every scale fp16, zeros 1..maxq (asym) or the centre."""
    g = torch.Generator().manual_seed(spec.bits)
    w = torch.randn(256, spec.group_size, generator=g) ** 3
    imp = torch.rand(1, spec.group_size, generator=g) ** 4
    base = weighted_error(w, spec, *find_params(w, spec, "max"), imp)
    s, z = find_params(w, spec, "weighted", imp)
    best = weighted_error(w, spec, s, z, imp)
    assert (best <= base).all() and best.sum() < 0.9 * base.sum()
    assert torch.equal(s.half().float(), s) and (s != 0).all()
    if spec.sym:
        assert (z == 2 ** (spec.bits - 1)).all()
    else:
        assert z.min() >= 1 and z.max() <= spec.maxq
    s_u, z_u = find_params(w, spec, "weighted")  # uniform importance
    assert best.sum() < weighted_error(w, spec, s_u, z_u, imp).sum()
    ones = torch.ones_like(imp)
    assert weighted_error(w, spec, s_u, z_u, ones).sum() < weighted_error(w, spec, s, z, ones).sum()
    with pytest.raises(UserError, match="grid search"):
        find_params(w, spec, "best")


def test_group_params_is_find_params_per_group():
    g = torch.Generator().manual_seed(5)
    w, imp = torch.randn(16, 128, generator=g), torch.rand(128, generator=g)
    for spec in (QuantSpec(4, 32, True), QuantSpec(4, -1, False)):
        s, z = group_params(w, spec, "weighted", imp)
        glen = spec.group_len(128)
        for gi in range(spec.groups(128)):
            cols = slice(gi * glen, (gi + 1) * glen)
            s1, z1 = find_params(w[:, cols], spec, "weighted", imp[cols])
            assert torch.equal(s[gi], s1) and torch.equal(z[gi], z1)


def test_zero_rows_and_tiny_scales():
    for sym in (True, False):
        s, z = find_params(torch.zeros(4, 32), QuantSpec(sym=sym))
        assert (s > 0).all() and torch.isfinite(s).all()
        s, _ = find_params(torch.full((1, 32), 1e-9), QuantSpec(sym=sym))
        assert s.abs().item() > 0  # fp16 underflow guarded, sign kept (negative for a positive extreme, sym)
        assert (dequantize(quantize_codes(torch.zeros(4, 32), s[:, None], z[:, None], 15), s[:, None], z[:, None]) == 0).all()
    s, _ = find_params(torch.full((1, 32), 1e-9), QuantSpec(sym=False))
    assert s.item() > 0  # fp16 underflow guarded


def test_g_idx():
    assert make_g_idx(96, QuantSpec(4, 32)).tolist() == [0] * 32 + [1] * 32 + [2] * 32
    assert make_g_idx(96, 32).tolist() == make_g_idx(96, QuantSpec(4, 32)).tolist()
    assert make_g_idx(96, -1).unique().tolist() == [0] and make_g_idx(96, QuantSpec(4, -1)).dtype == torch.int32
    assert make_g_idx(256, 128).tolist() == [0] * 128 + [1] * 128


def test_spec():
    spec = QuantSpec()
    assert (spec.bits, spec.group_size, spec.sym, spec.maxq) == (4, 32, True, 15)
    assert QuantSpec(2).maxq == 3 and QuantSpec(3).maxq == 7 and QuantSpec(8).maxq == 255
    assert QuantSpec(4, 64).groups(256) == 4 and QuantSpec(4, -1).groups(256) == 1 and QuantSpec(4, -1).group_len(256) == 256
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.bits = 8


@pytest.mark.parametrize("kw, message", [({"bits": 5}, "--bits 5"), ({"bits": 16}, "--bits 16"),
                                         ({"group_size": 48}, "--group-size 48"), ({"group_size": 0}, "--group-size 0")])
def test_bad_spec(kw, message):
    with pytest.raises(UserError, match=message) as e:
        QuantSpec(**kw)
    assert "\n" not in str(e.value)


def test_group_must_divide_k():
    with pytest.raises(UserError, match="does not divide"):
        QuantSpec(4, 128).check_k(320, "down_proj")
    with pytest.raises(UserError, match="32-bit words"):
        QuantSpec(3, -1).check_k(40)


def test_asymmetric_zero_never_zero_for_v1_readers():
    """AutoGPTQ-style v1 readers add 1 to the stored zero without wrapping: a zero of 0 would read as 16."""
    w = torch.rand(16, 32) + 0.01  # all positive: the natural zero point would be 0
    spec = QuantSpec(4, 32, False)
    assert (find_params(w, spec)[1] >= 1).all() and (find_params(w, spec, "mse")[1] >= 1).all()
    s, z = find_params(w, spec, "max")
    assert (z >= 1).all()
    deq = dequantize(quantize_codes(w, s[:, None], z[:, None], 15), s[:, None], z[:, None])
    assert (deq - w).abs().max() <= s.max() / 2 + 1e-6  # the maximum is still on the grid
    packed = pack_qzeros(z.view(1, -1).long(), 4)
    naive = [((int(word) >> (4 * j)) & 15) + 1 for word in packed[0].tolist() for j in range(8)]
    assert naive == z.long().tolist()
