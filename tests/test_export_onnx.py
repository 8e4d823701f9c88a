"""ONNX export (MatMulNBits) and its onnxruntime runner against our torch forward on the same GPTQ checkpoints.

Tolerances: with accuracy_level 0 MatMulNBits computes in float32, so onnxruntime and torch differ only by float
summation order: max |logit diff| <= 1e-4 (measured ~2e-5 with logits up to ~9). accuracy_level 4 quantises
activations to int8 per block: max |logit diff| <= 5% of max |logit| (measured 2%: 0.26 of 13.1) and top-1 agreement
>= 90% (measured 98%) on the bundled model.
"""

import json
import shutil

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import quantized, small_variant
from safetensors.torch import load_file, save_file

from minicpm_edge.artifact import verify
from minicpm_edge.errors import UserError
from minicpm_edge.export.onnx import FUSED, export_onnx
from minicpm_edge.model import Checkpoint, Tokenizer
from minicpm_edge.model.checkpoint import LINEARS
from minicpm_edge.runtimes import detect, open_runner
from minicpm_edge.runtimes.onnxrt import OnnxRunner
from minicpm_edge.runtimes.torch import TorchRunner

TOL = 1e-4
IDS = [1, 1716, 317, 324, 662, 263, 678, 45, 300, 800, 1200, 17, 99, 3000, 5, 6, 7, 2048, 12, 4000]
LONGROPE = {"rope_type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(16)],
            "long_factor": [1.0 + 1.5 * i for i in range(16)], "original_max_position_embeddings": 64}
# small_variant(config overrides), quantized(options): every branch of the exporter
VARIANTS = {
    "mha": ({}, {}),
    "fatrelu": ({"hidden_act": "fatrelu", "hidden_act_param": 0.03}, {}),
    "asym-relu-gqa": ({"hidden_act": "relu", "num_key_value_heads": 2}, {"sym": False, "group_size": 64}),
    "untied": ({"tie_word_embeddings": False}, {}),
    "llama-format": ({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": False}, {}),
    "8bit-per-channel": ({}, {"bits": 8, "group_size": -1, "method": "rtn"}),
    "2bit-asym": ({}, {"bits": 2, "sym": False, "method": "rtn"}),
    # rotary scalings and MiniCPM4 keys (docs/ROPE.md): OpenBMB's long list + attention factor 1.29, transformers'
    # short list for a llama-format checkpoint, dynamic NTK (plain within max_position_embeddings), head size != hidden/heads
    "longrope": ({"rope_scaling": LONGROPE}, {}),
    "longrope-llama": ({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": False,
                        "rope_scaling": LONGROPE}, {}),
    "dynamic": ({"rope_theta": 1e6, "rope_scaling": {"type": "dynamic", "factor": 4.0}}, {}),
    "minicpm4-keys": ({"kv_channels": 64, "use_mup": False, "tie_word_embeddings": False,
                       "sparse_config": {"dense_len": 8192}}, {}),
    "head-dim-llama": ({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": False,
                        "head_dim": 64}, {}),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one torch thread avoids spin-waiting (~30x faster here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def gptq(tmp_path_factory, bundled_gptq):
    """name -> GPTQ checkpoint, quantised on first use ("gqa" is the bundled model)."""
    made = {"gqa": bundled_gptq}
    root = tmp_path_factory.mktemp("onnx_variants")

    def get(name):
        if name not in made:
            overrides, opts = VARIANTS[name]
            src = small_variant(root / f"{name}-src", **overrides)
            made[name] = quantized(src, root / name, nsamples=8, seqlen=64, **opts)
        return made[name]
    return get


@pytest.fixture(scope="module")
def exported(tmp_path_factory, gptq):
    """(name, accuracy_level) -> ONNX folder, exported on first use."""
    made, root = {}, tmp_path_factory.mktemp("onnx_exports")

    def get(name, level=0):
        if (name, level) not in made:
            made[name, level] = export_onnx(gptq(name), root / f"{name}-acc{level}", accuracy_level=level)
        return made[name, level]
    return get


def unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Packed uint8 [R, ...] -> the first n codes of each row, low bits first (independent of the exporter)."""
    per = 8 // bits
    shifts = np.arange(per, dtype=np.uint8) * bits
    return ((packed.reshape(len(packed), -1)[..., None] >> shifts) & (2 ** bits - 1)).reshape(len(packed), -1)[:, :n]


def test_files_checker_and_genai_config(exported, gptq):
    out = exported("gqa", 4)
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    assert verify(out)["unlisted"] == [] and detect(out) == "onnxruntime"
    for name in ("model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.model", "tokenizer_config.json",
                 "tokenizer.json", "export.json"):
        assert (out / name).is_file(), name
    assert (out / "model.onnx").stat().st_size < 200_000 < (out / "model.onnx.data").stat().st_size  # weights outside
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    ins, outs = [i.name for i in model.graph.input], [o.name for o in model.graph.output]
    cfg = json.loads((out / "genai_config.json").read_text())["model"]
    dec = cfg["decoder"]
    assert (cfg["type"], dec["num_hidden_layers"], dec["num_attention_heads"], dec["num_key_value_heads"],
            dec["head_size"], cfg["vocab_size"]) == ("llama", 4, 8, 2, 32, 4096)
    assert ins[:2] == [dec["inputs"][k] for k in ("input_ids", "attention_mask")] and "position_ids" not in ins
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    fused = [("com.microsoft", "GroupQueryAttention"), ("com.microsoft", "SkipSimplifiedLayerNormalization"),
             ("com.microsoft", "MatMulNBits")]
    assert [ops.count(op) for op in fused] == [4, 8, 16]  # per layer: attention, 2 norms, qkv / o / gate-up / down
    for i in range(4):
        assert dec["inputs"]["past_key_names"] % i in ins and dec["inputs"]["past_value_names"] % i in ins
        assert dec["outputs"]["present_key_names"] % i in outs and dec["outputs"]["present_value_names"] % i in outs
    past = next(i for i in model.graph.input if i.name == "past_key_values.0.key").type.tensor_type.shape.dim
    assert [d.dim_value or d.dim_param for d in past] == ["batch_size", 2, "past_sequence_length", 32]
    # tied head: the embedding is stored once, in float16 as the checkpoint holds it (bf16), read by the Gather and,
    # cast to float32 (folded by onnxruntime at load), by the head's Gemm
    embeds = [t for t in model.graph.initializer if t.name == "model.embed_tokens.weight"]
    cast = next(n for n in model.graph.node if n.op_type == "Cast" and n.input == ["model.embed_tokens.weight"])
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    gather = next(n for n in model.graph.node if n.op_type == "Gather")
    assert len(embeds) == 1 and embeds[0].data_type == onnx.TensorProto.FLOAT16
    assert gather.input[0] == "model.embed_tokens.weight" and gemm.input[1] == cast.output[0]
    with Checkpoint(gptq("gqa")) as ckpt:
        table = ckpt.embedding()
        stored_as = ckpt.dtype("model.embed_tokens.weight")
    onnx.external_data_helper.load_external_data_for_tensor(embeds[0], str(out))
    stored = onnx.numpy_helper.to_array(embeds[0]).astype(np.float32)
    # bf16 -> fp16 is exact in fp16's normal range; below 2^-14 fp16's subnormals round by at most half of 2^-24
    normal = np.abs(table.numpy()) >= 2.0 ** -14
    assert stored_as == "BF16" and np.array_equal(stored[normal], table.numpy()[normal])
    assert np.abs(stored - table.numpy()).max() <= 2.0 ** -25
    info = json.loads((out / "export.json").read_text())
    assert info["quantization"] == {"bits": 4, "group_size": 32, "sym": True, "block_size": 32, "zero_points": False,
                                    "accuracy_level": 4}


def test_scale_emb_is_folded_into_the_residual_units(exported, gptq):
    """No Mul on the embedding rows each token: the graph carries the residual stream / scale_emb, the branch scales
    are divided by it (test_matmulnbits_initializers_are_the_gptq_codes) and every RMSNorm's epsilon by its square
    (RMSNorm_eps(s*x) = RMSNorm_{eps/s^2}(x)); the logits tests check the function."""
    model = onnx.load(str(exported("gqa") / "model.onnx"), load_external_data=False)
    cfg = Checkpoint(gptq("gqa")).config
    assert cfg.embedding_scale == 12
    eps = np.float32(cfg.rms_norm_eps / cfg.embedding_scale ** 2)
    nodes = model.graph.node
    gather = next(n for n in nodes if n.op_type == "Gather" and n.input[0] == "model.embed_tokens.weight")
    cast = next(n for n in nodes if n.input == [gather.output[0]])
    rows = sorted(n.op_type for n in nodes if cast.output[0] in n.input)
    assert cast.op_type == "Cast" and rows == ["Div", "Pow", "SkipSimplifiedLayerNormalization"]  # norm + residual
    skips = [n for n in nodes if n.op_type == "SkipSimplifiedLayerNormalization"]
    assert len(skips) == 8 and all(np.float32(a.f) == eps for n in skips for a in n.attribute if a.name == "epsilon")
    after = lambda node: next(n for n in nodes if node.output[0] in n.input)  # noqa: E731
    add = after(after(next(n for n in nodes if n.op_type == "Pow" and n.input[0] == cast.output[0])))  # mean, + eps
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name.startswith("const_")}
    assert add.op_type == "Add" and consts[add.input[1]] == eps


def test_head_in_float32_slices_matches_one_gemm(exported, gptq, tmp_path, monkeypatch):
    """A float16 table over onnxruntime's 1 GiB folding limit in float32 (MiniCPM-2B's) is cast by vocabulary slices:
    forced here on the small model, the logits equal those of the single Gemm and the slices are folded at load."""
    import minicpm_edge.export.onnx as exporter

    monkeypatch.setattr(exporter, "FOLD_BYTES", 4 * 256 * 1000)  # hidden 256: 5 slices of vocab 4096
    out = export_onnx(gptq("gqa"), tmp_path / "sliced", accuracy_level=0)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert sum(n.op_type == "Gemm" for n in model.graph.node) == 5
    assert [t.data_type for t in model.graph.initializer if t.name == "model.embed_tokens.weight"] == [
        onnx.TensorProto.FLOAT16]
    opts = onnxruntime.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    onnxruntime.InferenceSession(str(out / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    folded = {t.name for t in optimized.graph.initializer}
    assert all(n.input[1] in folded for n in optimized.graph.node if n.op_type == "Gemm")
    sliced = OnnxRunner(out, threads=1).logits(IDS)
    assert np.abs(sliced - OnnxRunner(exported("gqa"), threads=1).logits(IDS)).max() <= 1e-5


@pytest.mark.parametrize("name", ["gqa", "asym-relu-gqa", "8bit-per-channel", "2bit-asym", "llama-format"])
def test_matmulnbits_initializers_are_the_gptq_codes(exported, gptq, name):
    model = onnx.load(str(exported(name) / "model.onnx"))  # with the external data
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    ckpt = Checkpoint(gptq(name))
    # q|k|v and gate|up are one MatMulNBits each, rows stacked in that order
    parts = {n.name: [n.name.rsplit(".", 2)[0] + "." + m for m in FUSED.get(n.name.split(".", 3)[3], [])]
             or [n.name] for n in nodes}
    assert sorted(m for ms in parts.values() for m in ms) == sorted(
        f"model.layers.{i}.{m}" for i in range(ckpt.config.num_hidden_layers) for m in LINEARS)
    assert len(nodes) == 4 * ckpt.config.num_hidden_layers
    for node in nodes:
        attrs = {a.name: a.i for a in node.attribute}
        B, scales = weights[node.input[1]], weights[node.input[2]]
        zeros = weights[node.input[3]] if len(node.input) > 3 else None
        assert node.domain == "com.microsoft" and attrs["accuracy_level"] == 0
        assert attrs["N"] == sum(ckpt.quantized(m).shape[0] for m in parts[node.name]) == len(B) == len(scales)
        row = 0
        for module in parts[node.name]:
            q = ckpt.quantized(module)
            n, k = q.shape
            bs = attrs["block_size"]
            assert (attrs["K"], attrs["bits"]) == (k, q.bits)
            assert bs == (q.group_size if q.group_size != -1 else 128)
            kb = -(-k // bs)
            rows = slice(row, row + n)
            row += n
            assert B.dtype == np.uint8 and B.shape[1:] == (kb, bs * q.bits // 8)
            assert scales.dtype == np.float32 and scales.shape[1] == kb
            assert np.array_equal(unpack(B[rows], q.bits, k), q.codes.numpy())
            block = np.arange(k) // bs
            g = q.g_idx.long()
            want = q.scales.float()[g].t().numpy()
            if node.name.endswith(("o_proj", "down_proj")):  # muP's residual multiplier folded into the scales,
                c = ckpt.config  # in the units of the residual stream / scale_emb
                want = (want.astype(np.float64) * c.residual_scale / c.embedding_scale).astype(np.float32)
            assert np.array_equal(scales[rows][:, block], want)
            if zeros is not None:
                assert np.array_equal(unpack(zeros[rows], q.bits, kb)[:, block], q.zeros[g].t().numpy())
            else:  # absent zero points mean 2^(bits-1), the symmetric GPTQ zero
                assert (q.zeros == 2 ** (q.bits - 1)).all()
    assert any(len(n.input) > 3 for n in nodes) == (not ckpt.quant["spec"].sym)


@pytest.mark.parametrize("name", list(VARIANTS) + ["gqa"])
def test_logits_match_torch_int4_forward(exported, gptq, name):
    torch_logits = TorchRunner(gptq(name), threads=1).logits(IDS)
    ort_logits = OnnxRunner(exported(name), threads=1).logits(IDS)
    assert ort_logits.shape == torch_logits.shape and ort_logits.dtype == np.float32
    assert np.abs(ort_logits - torch_logits).max() <= TOL


def test_fatrelu_threshold_matters(exported, gptq):
    """The FATReLU comparison can fail: plain ReLU moves the logits far beyond the tolerance."""
    runner = TorchRunner(gptq("fatrelu"), threads=1)
    fatrelu = runner.logits(IDS)
    for layer in runner.model.layers:
        layer.mlp.threshold = 0.0
    assert np.abs(runner.logits(IDS) - fatrelu).max() > 20 * TOL
    assert np.abs(OnnxRunner(exported("fatrelu"), threads=1).logits(IDS) - fatrelu).max() <= TOL


def test_int8_activations_stay_close(exported, gptq):
    text = IDS * 3
    ref = TorchRunner(gptq("gqa"), threads=1).logits(text)
    got = OnnxRunner(exported("gqa", 4), threads=1).logits(text)
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("name", ["gqa", "mha"])
def test_kv_cache_decoding_equals_full_recompute(exported, name):
    runner = OnnxRunner(exported(name), threads=1)
    full = runner.logits(IDS)
    steps, past = [], None
    for t in IDS:
        logits, past = runner._run([t], past)
        steps.append(logits)
    assert np.abs(np.concatenate(steps) - full).max() <= TOL
    chunks, past = [], None  # several tokens at a time on a cache: the causal mask is offset by the past length
    for a, b in ((0, 7), (7, 10), (10, 20)):
        logits, past = runner._run(IDS[a:b], past)
        chunks.append(logits)
    assert np.abs(np.concatenate(chunks) - full).max() <= TOL
    assert past.length == len(IDS) and past.view(0).shape == (1, runner.kv_shapes[0][1], len(IDS),
                                                              runner.kv_shapes[0][3])
    # the buffers are shared with the graph (io-binding): the attention wrote the keys in place, past its capacity too
    long, past = IDS * 20, None  # 400 tokens: the 256-position buffers double once
    for a in range(0, len(long), 50):
        logits, past = runner._run(long[a:a + 50], past)
    assert past.arrays[0].shape[2] == 512 and np.abs(logits - runner.logits(long)[-50:]).max() <= TOL
    assert np.abs(past.view(0)).sum() > 0 and not np.abs(past.arrays[0][:, :, len(long):]).any()
    with pytest.raises(UserError, match="onnxruntime: "):  # 1200 positions: past the rotary tables (1024)
        runner._run(long * 2, past)


def test_right_padded_batch(exported):
    """A batch of prompts of different lengths, right-padded (GroupQueryAttention's convention: each row's length is
    its attention_mask sum): every row's real tokens get the logits they get alone."""
    runner = OnnxRunner(exported("gqa"), threads=1)
    short, pad = IDS[:12], 8
    ids = np.array([short + [0] * pad, IDS], np.int64)
    mask = np.array([[1] * 12 + [0] * pad, [1] * 20], np.int64)
    empty = np.zeros((2, *runner.kv_shapes[0][1:]), np.float32)
    logits = runner.session.run(["logits"], {"input_ids": ids, "attention_mask": mask,
                                             **{p: empty for p in runner.past}})[0]
    assert np.abs(logits[0, :12] - runner.logits(short)).max() <= TOL
    assert np.abs(logits[1] - runner.logits(IDS)).max() <= TOL


def test_generate_equals_torch(exported, gptq):
    ids = IDS[:7]
    want = TorchRunner(gptq("gqa"), threads=1).generate(ids, 24)
    runner = open_runner(exported("gqa"), threads=1)
    assert runner.name == "onnxruntime" and runner.vocab_size == 4096 and runner.threads == 1
    assert runner.generate(ids, 24) == want


PROBES = ["Hello, world! 你好，世界！", "    indented  code\n\tx = [1, 2, 3]  # list", "emoji 🚀🎉 and ümlauts",
          "数学：12 + 35 = 47。", "  leading spaces and trailing  "]


def test_tokenizer_json_encodes_like_sentencepiece(bundled):
    from minicpm_edge import calib
    from minicpm_edge.model.tokenizer import hf_tokenizer

    sp, hf = Tokenizer(bundled / "tokenizer.model"), hf_tokenizer(bundled / "tokenizer.model")
    texts = PROBES + calib.heldout_documents()
    assert [hf.encode(t).ids for t in texts] == [sp.encode(t) for t in texts]
    assert hf.decode(sp.encode(PROBES[0]), skip_special_tokens=True) == PROBES[0]
    assert hf.encode("<用户>你好<AI>").ids[:2] == [1, 3] and 4 in hf.encode("<用户>你好<AI>").ids


def genai_greedy(model, ids: list[int], n: int) -> list[int]:
    """onnxruntime-genai's greedy tokens after `ids`, `n` of them."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array(ids, dtype=np.int32))
    got = []
    while not gen.is_done():
        gen.generate_next_token()
        got.append(int(gen.get_next_tokens()[0]))
    return got


def test_onnxruntime_genai_drives_the_export(exported, gptq):
    """onnxruntime-genai (the runtime of its Android/iOS bindings) loads the folder as it is written."""
    import onnxruntime_genai as og
    out = exported("gqa")
    model = og.Model(str(out))
    assert genai_greedy(model, IDS[:7], 16) == TorchRunner(gptq("gqa"), threads=1).generate(IDS[:7], 16)
    tok, ref = og.Tokenizer(model), Tokenizer(Checkpoint(gptq("gqa")).tokenizer_path)
    for text in PROBES:  # genai's tokenizer leaves BOS to the chat template ({{ bos_token }} first)
        assert [int(i) for i in tok.encode(text)] == ref.encode(text, bos=False), text
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["chat_template"].startswith("{{ bos_token }}") and "<用户>" in cfg["chat_template"]


def test_onnxruntime_genai_drives_the_quantised_table(gptq, tmp_path):
    """--embedding q8_0 (GatherBlockQuantized lookup, MatMulNBits head on one table) in onnxruntime-genai: the greedy
    tokens of our torch forward on a checkpoint holding the Q8_0 values."""
    import onnxruntime_genai as og

    out = export_onnx(gptq("gqa"), tmp_path / "q8", accuracy_level=0, embedding="q8_0")
    ref = on_grid(gptq("gqa"), tmp_path / "q8-table")
    assert genai_greedy(og.Model(str(out)), IDS[:7], 16) == TorchRunner(ref, threads=1).generate(IDS[:7], 16)


def _nothing_left(parent, name):
    return not (parent / name).exists() and not [p for p in parent.iterdir() if p.name.startswith(f".{name}")]


def test_act_order_groups_are_refused_and_leave_nothing(gptq, tmp_path):
    ckpt = shutil.copytree(gptq("mha"), tmp_path / "act-order")
    state = load_file(ckpt / "model.safetensors")
    k = state["model.layers.1.mlp.down_proj.g_idx"].numel()
    state["model.layers.1.mlp.down_proj.g_idx"] = (torch.arange(k) % (k // 32)).to(torch.int32)  # act-order layout
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(UserError, match="act-order.*static groups"):
        export_onnx(ckpt, tmp_path / "out")  # fails at the last layer, after most weights were written
    assert _nothing_left(tmp_path, "out")


def test_refusals(gptq, tmp_path):
    src = small_variant(tmp_path / "plain")
    with pytest.raises(UserError, match="not a GPTQ checkpoint"):
        export_onnx(src, tmp_path / "a")
    three = quantized(src, tmp_path / "w3", method="rtn", bits=3, nsamples=2, seqlen=16)
    with pytest.raises(UserError, match="3-bit"):
        export_onnx(three, tmp_path / "b")
    with pytest.raises(UserError, match="accuracy"):
        export_onnx(gptq("mha"), tmp_path / "c", accuracy_level=7)
    assert all(_nothing_left(tmp_path, n) for n in "abc")

    out = tmp_path / "d"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(UserError, match="exists.*--force"):
        export_onnx(gptq("mha"), out)
    assert [p.name for p in out.iterdir()] == ["keep"] and _nothing_left(tmp_path, "d.")
    export_onnx(gptq("mha"), out, force=True)
    assert not (out / "keep").exists() and (out / "model.onnx").is_file() and verify(out)["unlisted"] == []


def test_runner_refuses_bad_folders(tmp_path):
    with pytest.raises(UserError, match="no model.onnx"):
        OnnxRunner(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(UserError, match="onnxruntime cannot load"):
        OnnxRunner(tmp_path)
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8),
              str(tmp_path / "model.onnx"))
    with pytest.raises(UserError, match="not a decoder"):
        OnnxRunner(tmp_path)
    T = onnx.TensorProto  # a decoder whose cache is not [batch, heads, sequence, head size]
    ins = [onnx.helper.make_tensor_value_info(n, T.INT64, ["b", "s"]) for n in ("input_ids", "attention_mask")]
    ins.append(onnx.helper.make_tensor_value_info("past_key_values.0.key", T.FLOAT, ["b", "s", 8]))
    outs = [onnx.helper.make_tensor_value_info("logits", T.FLOAT, ["b", "s"]),
            onnx.helper.make_tensor_value_info("present.0.key", T.FLOAT, ["b", "s", 8])]
    nodes = [onnx.helper.make_node("Cast", ["input_ids"], ["logits"], to=T.FLOAT),
             onnx.helper.make_node("Identity", ["past_key_values.0.key"], ["present.0.key"])]
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph(nodes, "g", ins, outs), ir_version=8,
                                     opset_imports=[onnx.helper.make_opsetid("", 17)]), str(tmp_path / "model.onnx"))
    with pytest.raises(UserError, match="past_key_values.0.key has 3 dimensions"):
        OnnxRunner(tmp_path)


def test_runner_reads_a_symbolic_cache_width_from_genai_config(exported, tmp_path):
    """onnxruntime-genai's builder leaves the cache's head size symbolic (`kv_cache_dim`): the runner takes it, as
    genai does, from genai_config.json, and refuses the folder in one line when nothing gives it."""
    out = tmp_path / "symbolic"
    shutil.copytree(exported("gqa"), out)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    for v in [*model.graph.input, *model.graph.output]:
        if v.name.startswith(("past_key_values.", "present.")):
            v.type.tensor_type.shape.dim[3].dim_param = "kv_cache_dim"
    onnx.save(model, str(out / "model.onnx"))  # the weights stay in model.onnx.data
    runner = OnnxRunner(out, threads=1)
    assert runner.kv_shapes[0] == [0, 2, 0, 32]
    assert np.array_equal(runner.logits(IDS), OnnxRunner(exported("gqa"), threads=1).logits(IDS))
    (out / "genai_config.json").unlink()
    with pytest.raises(UserError, match="past_key_values.0.key leaves its head count or size symbolic"):
        OnnxRunner(out)


def test_rope_scaling_is_recorded_and_changes_the_graph(exported, gptq):
    info = json.loads((exported("longrope") / "export.json").read_text())["model"]
    assert info["rope_scaling"]["list_used"] == "long" and info["exact_context"] == 1024
    assert abs(info["rope_scaling"]["attention_factor"] - (1 + 4 / 6) ** 0.5) < 1e-9  # s = 1024 / 64 = 2^4, 64 = 2^6
    genai = json.loads((exported("longrope-llama") / "genai_config.json").read_text())
    assert genai["model"]["context_length"] == 64  # transformers switches lists past original: exact up to it
    assert "dense_len = 8192" in json.loads((exported("minicpm4-keys") / "export.json").read_text())["model"][
        "sparse_attention"]
    plain = TorchRunner(gptq("mha"), threads=1).logits(IDS)
    assert np.abs(OnnxRunner(exported("longrope"), threads=1).logits(IDS) - plain).max() > 100 * TOL


def with_tensors(ckpt, out, tensors: dict):
    """A copy of checkpoint `ckpt` at `out` with the tensors named in `tensors` replaced."""
    out = shutil.copytree(ckpt, out)
    state = load_file(out / "model.safetensors")
    state.update(tensors)
    save_file(state, str(out / "model.safetensors"))
    return out


def on_grid(ckpt, out, kind: str = "Q8_0"):
    """with_tensors: the embedding (and an untied lm_head) rounded to nearest on our `kind` grid (rtn), float32."""
    from minicpm_edge.quant import QuantSpec, rtn
    from minicpm_edge.quant.kquant import TYPES

    with Checkpoint(ckpt) as c:
        tables = {n: rtn(c.tensor(n, torch.float32), QuantSpec(), block=TYPES[kind]).dequantized
                  for n in ("model.embed_tokens.weight", "lm_head.weight") if n in c.names}
    return with_tensors(ckpt, out, tables)


def test_q8_0_table_is_the_gguf_q8_0_table_for_lookup_and_head(exported, gptq, tmp_path):
    """--embedding q8_0: the table is stored once, as the values that the ios export with --embedding q8_0 stores
    (read back by gguf-py); the head is an 8-bit MatMulNBits of it and the lookup a GatherBlockQuantized of the same
    initialisers, and the logits are our torch forward's on a checkpoint whose table is those values."""
    import gguf

    from test_export_ios import gguf_file

    from minicpm_edge.export.ios import export_ios

    out = export_onnx(gptq("gqa"), tmp_path / "q8", accuracy_level=0, embedding="q8_0")
    model = onnx.load(str(out / "model.onnx"))
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    head = next(n for n in model.graph.node if n.name == "lm_head")
    attrs = {a.name: a.i for a in head.attribute}
    assert (head.op_type, attrs["bits"], attrs["block_size"], len(head.input)) == ("MatMulNBits", 8, 32, 3)
    assert "model.embed_tokens.weight" not in weights and not any(n.op_type in ("Gemm", "Gather", "Cast") and
                                                                  n.input[0] in weights for n in model.graph.node)
    lookup = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    scales = next(n for n in model.graph.node if n.output[0] == lookup.input[2])  # [V, blocks] -> [V, blocks, 1]
    assert lookup.input[:2] == [head.input[1], "input_ids"] and (scales.op_type, scales.input[0]) == ("Reshape",
                                                                                                     head.input[2])
    assert {a.name: a.i for a in lookup.attribute} == {"bits": 8, "block_size": 32, "gather_axis": 0,
                                                       "quantize_axis": 2}
    codes = unpack(weights[head.input[1]], 8, 256).astype(np.float32) - 128  # absent zero points: 128
    values = codes * np.repeat(weights[head.input[2]], 32, 1)
    t = next(t for t in gguf.GGUFReader(gguf_file(export_ios(gptq("gqa"), tmp_path / "ios", embedding="q8_0"))).tensors
             if t.name == "token_embd.weight")
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert np.array_equal(values, gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(values.shape))
    ref = with_tensors(gptq("gqa"), tmp_path / "q8-table",  # float32: q * d is exact in it
                       {"model.embed_tokens.weight": torch.from_numpy(values)})
    want, got = TorchRunner(ref, threads=1).logits(IDS), OnnxRunner(out, threads=1).logits(IDS)
    assert np.abs(got - want).max() <= TOL
    assert np.abs(got - OnnxRunner(exported("gqa"), threads=1).logits(IDS)).max() > 10 * TOL  # the rounding shows
    info = json.loads((out / "export.json").read_text())
    assert info["head"].startswith("8-bit MatMulNBits") and info["requires"].startswith("onnxruntime >= 1.23")
    with pytest.raises(UserError, match="--embedding q6_k"):
        export_onnx(gptq("gqa"), tmp_path / "bad", embedding="q6_k")


def test_untied_quantised_table_and_head(gptq, tmp_path):
    """Untied: the lookup reads its own table on the grid (one row a token in the roofline's bytes), the head
    lm_head's; both agree with the torch forward on a checkpoint holding those values."""
    from minicpm_edge.bench import roofline

    out = export_onnx(gptq("untied"), tmp_path / "q8", accuracy_level=0, embedding="q8_0")
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    lookup = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in model.graph.node if n.name == "lm_head")
    scales = next(n for n in model.graph.node if n.output[0] == lookup.input[2])
    assert (lookup.input[0], scales.input[0]) == ("model.embed_tokens.qweight", "model.embed_tokens.scales")
    assert head.input[1:] == ["lm_head.qweight", "lm_head.scales"]
    ref = on_grid(gptq("untied"), tmp_path / "q8-tables")  # both tables
    assert np.abs(OnnxRunner(out, threads=1).logits(IDS) - TorchRunner(ref, threads=1).logits(IDS)).max() <= TOL
    per = roofline.bytes_per_token(out)
    size = {t.name: int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            for t in model.graph.initializer}
    v = next(t.dims[0] for t in model.graph.initializer if t.name == "model.embed_tokens.qweight")
    table = size["model.embed_tokens.qweight"] + size["model.embed_tokens.scales"]
    rope = size["rotary.cos_cache"] + size["rotary.sin_cache"]  # read at the token's position too
    assert not per["tied"]
    assert per["weight_bytes"] - table - rope <= per["bytes_per_token"] <= per["weight_bytes"] - table + table // v


def test_q4_0_head(exported, gptq, tmp_path):
    """--embedding q4_0: a 4-bit table whose values are the embedding on our Q4_0 grid, for the head and the lookup;
    the logits move more than with q8_0 (the quality it costs: 15% of the largest logit here) and the per-token bytes
    fall to about an eighth of the float32 head's."""
    from minicpm_edge.bench import roofline
    from minicpm_edge.quant import QuantSpec, rtn
    from minicpm_edge.quant.kquant import TYPES

    out = export_onnx(gptq("gqa"), tmp_path / "q4", accuracy_level=0, embedding="q4_0")
    model = onnx.load(str(out / "model.onnx"))
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    head = next(n for n in model.graph.node if n.name == "lm_head")
    assert {a.name: a.i for a in head.attribute}["bits"] == 4
    values = (unpack(weights[head.input[1]], 4, 256).astype(np.float32) - 8) * np.repeat(weights[head.input[2]], 32, 1)
    table = Checkpoint(gptq("gqa")).embedding().float()
    assert np.array_equal(values, rtn(table, QuantSpec(), block=TYPES["Q4_0"]).dequantized.numpy())
    ckpt = with_tensors(gptq("gqa"), tmp_path / "q4-table", {"model.embed_tokens.weight": torch.from_numpy(values)})
    got = OnnxRunner(out, threads=1).logits(IDS)
    assert np.abs(got - TorchRunner(ckpt, threads=1).logits(IDS)).max() <= TOL  # lookup and head: those values
    ref = OnnxRunner(exported("gqa"), threads=1).logits(IDS)
    q8 = OnnxRunner(export_onnx(gptq("gqa"), tmp_path / "q8", accuracy_level=0, embedding="q8_0"), threads=1)
    assert np.abs(q8.logits(IDS) - ref).max() < np.abs(got - ref).max() <= 0.2 * np.abs(ref).max()
    per = {name: roofline.bytes_per_token(folder)["bytes_per_token"] for name, folder in
           (("f16", exported("gqa")), ("q4_0", out))}
    head_f32, head_q4 = 4096 * 256 * 4, 4096 * 256 // 2 + 4096 * 8 * 4  # + the lookup's row and shape constants
    assert abs(per["f16"] - per["q4_0"] - (head_f32 - head_q4)) < 1024


def test_stack_writes_the_symmetric_zero_for_a_part_without_zero_points():
    """q|k|v where only one Linear needed zero points: the stacked MatMulNBits carries zero 2^(bits-1) (what an
    absent input means) for the others' rows, and the same row order for codes, scales and zeros."""
    from minicpm_edge.export.onnx import _pack, stack

    rng = np.random.default_rng(0)
    codes = [rng.integers(0, 16, (n, 2, 32), dtype=np.uint8) for n in (4, 2)]
    parts = [{"B": _pack(c, 4), "scales": rng.random((len(c), 2), np.float32), "K": 64, "N": len(c), "bits": 4,
              "block_size": 32} for c in codes]
    zeros = rng.integers(0, 16, (2, 2), dtype=np.uint8)
    parts[1]["zero_points"] = _pack(zeros, 4)
    t = stack(parts)
    assert t["N"] == 6 and np.array_equal(unpack(t["B"], 4, 64), np.concatenate(codes).reshape(6, 64))
    assert np.array_equal(t["scales"], np.concatenate([p["scales"] for p in parts]))
    z = unpack(t["zero_points"], 4, 2)
    assert (z[:4] == 8).all() and np.array_equal(z[4:], zeros)
    with pytest.raises(UserError, match="cannot share"):
        stack([parts[0], {**parts[1], "bits": 8}])
