import pytest
import torch

from minicpm_edge.errors import UserError
from minicpm_edge.quant.grid import (QuantSpec, dequantize, find_params, make_g_idx, pack_qweight, pack_qzeros,
                                     quantize_codes, unpack_qweight, unpack_qzeros)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (48, 256), generator=g)
    q = pack_qweight(codes, bits)
    assert q.dtype == torch.int32 and q.shape == (256 * bits // 32, 48)
    assert torch.equal(unpack_qweight(q, bits, 256).long(), codes)
    zeros = torch.randint(0, 2 ** bits, (8, 64), generator=g)
    qz = pack_qzeros(zeros, bits)
    assert qz.shape == (8, 64 * bits // 32)
    assert torch.equal(unpack_qzeros(qz, bits, 64).long(), zeros)


def test_nibble_order_and_v1_zero_convention():
    codes = torch.arange(1, 9).repeat(4).view(1, 32).expand(3, 32)  # along K: 1..8, 1..8, ...
    assert pack_qweight(codes, 4)[0, 0].item() & 0xFFFFFFFF == 0x87654321  # first element in the lowest bits
    sym_zeros = torch.full((2, 16), 8)
    assert (pack_qzeros(sym_zeros, 4) == 0x77777777).all()  # v1 stores zero - 1
    assert pack_qweight(torch.full((1, 8), 15), 4)[0, 0].item() == -1  # int32 two's complement


def test_symmetric_grid_is_centred_on_8():
    w = torch.tensor([[-1.0, -0.5, 0.0, 0.25, 0.7]])
    s, z = find_params(w, QuantSpec(4, 32, True))
    assert z.item() == 8 and s.item() == pytest.approx(2 / 15, rel=1e-3)
    assert s.half().float().item() == s.item()  # scales are fp16-representable
    q = quantize_codes(w, s[:, None], z[:, None], 15)
    assert q.min() >= 0 and q.max() <= 15 and q[0, 2] == 8


def test_asymmetric_grid_covers_range():
    w = torch.linspace(0.1, 3.0, 32).view(1, 32)
    s, z = find_params(w, QuantSpec(4, 32, False))
    deq = dequantize(quantize_codes(w, s[:, None], z[:, None], 15), s[:, None], z[:, None])
    assert (deq - w).abs().max() <= s.item() / 2 + 1e-6
    assert z.item() == 0  # range includes 0 from below: min clamps to 0


def test_mse_search_never_worse():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g) ** 3  # heavy tails: clipping helps
    spec = QuantSpec(3, 128, False)
    err = {}
    for mse in (False, True):
        s, z = find_params(w, spec, mse)
        err[mse] = (dequantize(quantize_codes(w, s[:, None], z[:, None], spec.maxq), s[:, None], z[:, None]) - w).pow(2).sum()
    assert err[True] < err[False]


def test_zero_rows_and_g_idx():
    s, z = find_params(torch.zeros(4, 32), QuantSpec())
    assert (s > 0).all()
    assert make_g_idx(96, QuantSpec(4, 32)).tolist() == [0] * 32 + [1] * 32 + [2] * 32
    assert make_g_idx(96, QuantSpec(4, -1)).unique().tolist() == [0]


@pytest.mark.parametrize("kw, message", [({"bits": 5}, "--bits 5"), ({"group_size": 48}, "--group-size 48")])
def test_bad_spec(kw, message):
    with pytest.raises(UserError, match=message):
        QuantSpec(**kw)


def test_group_must_divide_k():
    with pytest.raises(UserError, match="does not divide"):
        QuantSpec(4, 128).check_k(320, "down_proj")
