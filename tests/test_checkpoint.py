import struct

import psutil
import pytest
import torch

from conftest import TINY, random_state, write_checkpoint
from minicpm_edge.errors import UserError
from minicpm_edge.model import Checkpoint
from minicpm_edge.model.synthetic import write_synthetic


@pytest.mark.parametrize("fmt, shards", [("safetensors", 1), ("safetensors", 3), ("bin", 1), ("bin", 2)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_formats_and_dtypes_read_back(tmp_path, fmt, shards, dtype):
    state = {k: v.to(dtype) for k, v in random_state(TINY).items()}
    ckpt = Checkpoint(write_checkpoint(tmp_path / "m", TINY, state, fmt, shards))
    assert sorted(ckpt.names) == sorted(state)
    assert ckpt.config.tie_word_embeddings
    name = "model.layers.1.mlp.down_proj.weight"
    assert ckpt.shape(name) == tuple(state[name].shape)
    assert ckpt.dtype(name).lower().replace("bfloat16", "bf16").replace("float16", "f16").replace("float32", "f32") in (
        "bf16", "f16", "f32")
    assert torch.equal(ckpt.tensor(name, None), state[name])
    layer = ckpt.layer_state(2)
    assert set(layer) == {k[len("model.layers.2."):] for k in state if k.startswith("model.layers.2.")}


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_loaded_models_own_their_weights(tmp_path, fmt):
    """load_model / load_layer take Checkpoint.tensor's tensors without copying them: each read is the caller's own,
    so changing a loaded model's weights in place leaves the checkpoint (and the next model read from it) as it was,
    also where the files are held as one loaded dict (pytorch_model.bin) and no dtype conversion copies."""
    from minicpm_edge.model import load_layer, load_model

    state = random_state(TINY)
    ckpt = Checkpoint(write_checkpoint(tmp_path / "m", TINY, state, fmt))
    model, layer = load_model(ckpt), load_layer(ckpt, 1)
    with torch.no_grad():
        for p in [*model.parameters(), *layer.parameters()]:
            p.add_(1.0)
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(ckpt.tensor(name), state[name])
    assert torch.equal(ckpt.embedding(), state["model.embed_tokens.weight"])
    assert torch.equal(load_layer(ckpt, 1).mlp.down_proj.weight, state[name])
    assert not any(p.is_meta for p in model.parameters())


def test_untied_checkpoint_has_head(tmp_path):
    ckpt = Checkpoint(write_checkpoint(tmp_path / "m", TINY, random_state(TINY, lm_head=True)))
    assert not ckpt.config.tie_word_embeddings and ckpt.lm_head().shape == (300, 64)


def test_shape_mismatch_with_config(tmp_path):
    state = random_state(TINY)
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)  # config says 2 KV heads -> 32 rows
    with pytest.raises(UserError, match="k_proj.weight has shape"):
        Checkpoint(write_checkpoint(tmp_path / "m", TINY, state))


def test_missing_tensor(tmp_path):
    state = random_state(TINY)
    del state["model.layers.2.mlp.up_proj.weight"]
    with pytest.raises(UserError, match="lacks model.layers.2.mlp.up_proj.weight"):
        Checkpoint(write_checkpoint(tmp_path / "m", TINY, state))


def test_corrupt_safetensors_header(tmp_path):
    path = write_checkpoint(tmp_path / "m", TINY, random_state(TINY))
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 10)
    f.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupt or unreadable safetensors"):
        Checkpoint(path)


def test_nan_weights_refused(tmp_path):
    state = random_state(TINY)
    state["model.layers.0.mlp.gate_proj.weight"][3, 4] = float("nan")
    ckpt = Checkpoint(write_checkpoint(tmp_path / "m", TINY, state))
    with pytest.raises(UserError, match="NaN or Inf"):
        ckpt.layer_state(0)


def test_index_pointing_to_missing_shard(tmp_path):
    path = write_checkpoint(tmp_path / "m", TINY, random_state(TINY), shards=2)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UserError, match="shard model-00002-of-00002.safetensors is missing"):
        Checkpoint(path)


def test_one_layer_loads_without_the_whole_model(tmp_path):
    """A 1B-shaped checkpoint: reading layer 1 must not pull the embedding or other layers into memory."""
    path = write_synthetic("minicpm-1b", tmp_path / "m1b", layers=3)
    proc = psutil.Process()
    ckpt = Checkpoint(path)
    before = proc.memory_info().rss
    layer = ckpt.layer_state(1)
    grown = proc.memory_info().rss - before
    layer_bytes = sum(t.numel() * 4 for t in layer.values())
    total_fp32 = sum(torch.Size(ckpt.shape(n)).numel() * 4 for n in ckpt.names)
    assert layer_bytes < total_fp32 / 4
    assert grown < layer_bytes * 2.5, (grown, layer_bytes, total_fp32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite_finds_every_nan_and_inf(dtype):
    """The one-pass check (min and max) sees a NaN or an Inf wherever it is, in any float type, as isfinite does."""
    from minicpm_edge.model import all_finite

    assert all_finite(torch.empty(0, dtype=dtype)) and all_finite(torch.randn(37, 129).to(dtype))
    n = 37 * 129
    for bad in (float("nan"), float("inf"), -float("inf")):
        for at in (0, 1, 63, 64, n // 2, n - 2, n - 1):  # vector lanes, their tails, the last element
            x = torch.randn(n).to(dtype)
            x[at] = bad
            assert not all_finite(x.view(37, 129)), (bad, at)
            assert not all_finite(x.view(37, 129).t()), (bad, at)  # column-major (LAPACK's factors), read as such
            assert all_finite(x.view(37, 129)[:, 1:]) == (at % 129 == 0), (bad, at)  # a strided view: column 0 left out
    assert not all_finite(torch.tensor([70000.0]).to(torch.float16))  # overflows float16: Inf
