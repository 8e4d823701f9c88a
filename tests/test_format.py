"""GPTQ checkpoints written by other tools (AutoGPTQ / GPTQModel layouts) load into the same records."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import TINY, random_state
from minicpm_edge.errors import UserError
from minicpm_edge.model import Checkpoint, load_model

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def autogptq_pack(codes: np.ndarray, zeros: np.ndarray, bits: int, v2: bool):
    """Packing written out the way AutoGPTQ's pack() loop does it, independent of our grid module."""
    n, k = codes.shape
    per = 32 // bits
    qweight = np.zeros((k // per, n), dtype=np.uint32)
    for row in range(k // per):
        for j in range(per):
            qweight[row] |= codes[:, row * per + j].astype(np.uint32) << (bits * j)
    stored = zeros if v2 else (zeros - 1) & (2 ** bits - 1)
    qzeros = np.zeros((zeros.shape[0], n // per), dtype=np.uint32)
    for col in range(n // per):
        for j in range(per):
            qzeros[:, col] |= stored[:, col * per + j].astype(np.uint32) << (bits * j)
    return torch.from_numpy(qweight.view(np.int32)), torch.from_numpy(qzeros.view(np.int32))


def foreign_checkpoint(path, sym=False, v2=False, act_order=False, group=32, where="config"):
    """A tiny MiniCPM in the layout of the published MiniCPM-2B-sft-int4 (g32, asym, desc_act off)."""
    rng = np.random.default_rng(0)
    state = random_state(TINY)
    tensors, expect = {}, {}
    for name, t in state.items():
        prefix = name[:-len(".weight")]
        if not any(prefix.endswith(l) for l in LINEARS):
            tensors[name] = t.half()
            continue
        n, k = t.shape
        groups = k // group
        codes = rng.integers(0, 16, (n, k))
        zeros = np.full((groups, n), 8) if sym else rng.integers(0, 16, (groups, n))
        scales = torch.from_numpy(rng.uniform(0.001, 0.02, (groups, n))).half()
        g_idx = np.arange(k) // group
        if act_order:
            g_idx = rng.permutation(g_idx)
        qweight, qzeros = autogptq_pack(codes, zeros, 4, v2)
        tensors.update({prefix + ".qweight": qweight, prefix + ".qzeros": qzeros, prefix + ".scales": scales,
                        prefix + ".g_idx": torch.from_numpy(g_idx.astype(np.int32))})
        s = scales.float().numpy()[g_idx].T
        expect[prefix] = torch.from_numpy(s * (codes - zeros[g_idx].T)).float()
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    q = {"bits": 4, "group_size": group, "desc_act": act_order, "sym": sym, "damp_percent": 0.01,
         "true_sequential": True, "static_groups": False, "quant_method": "gptq",
         "checkpoint_format": "gptq_v2" if v2 else "gptq"}
    cfg = dict(TINY)
    if where == "config":
        cfg["quantization_config"] = q
    else:
        (path / "quantize_config.json").write_text(json.dumps(q))
    (path / "config.json").write_text(json.dumps(cfg))
    return path, expect


@pytest.mark.parametrize("sym, v2, where", [(False, False, "config"), (True, False, "quantize_config"),
                                            (False, True, "config")])
def test_foreign_checkpoint_dequantises_exactly(tmp_path, sym, v2, where):
    path, expect = foreign_checkpoint(tmp_path / "m", sym=sym, v2=v2, where=where)
    ck = Checkpoint(path)
    assert ck.quant["spec"].sym == sym and ck.quant["v2"] == v2
    for prefix, w in expect.items():
        rec = ck.quantized(prefix)
        assert rec.contiguous
        assert torch.equal(rec.dequantize(), w), prefix
    load_model(ck)  # the torch forward runs on the dequantised weights


def test_act_order_g_idx_is_loaded_and_flagged(tmp_path):
    path, expect = foreign_checkpoint(tmp_path / "m", act_order=True)
    ck = Checkpoint(path)
    rec = ck.quantized("model.layers.0.mlp.up_proj")
    assert not rec.contiguous
    assert torch.equal(rec.dequantize(), expect["model.layers.0.mlp.up_proj"])


def test_unsupported_quant_method(tmp_path):
    path, _ = foreign_checkpoint(tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "awq"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="quant_method 'awq'"):
        Checkpoint(path)


def test_inconsistent_shapes(tmp_path):
    path, _ = foreign_checkpoint(tmp_path / "m")
    from safetensors.torch import load_file
    t = load_file(str(path / "model.safetensors"))
    t["model.layers.0.mlp.up_proj.scales"] = t["model.layers.0.mlp.up_proj.scales"][:1]
    save_file(t, str(path / "model.safetensors"))
    with pytest.raises(UserError, match="inconsistent GPTQ tensor shapes"):
        Checkpoint(path).quantized("model.layers.0.mlp.up_proj")
