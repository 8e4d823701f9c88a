"""MLC-LLM export (android / harmony): read back with tvm's own loader, checked against mlc-llm's minicpm model.

Upstream facts pinned here (mlc-ai/mlc-llm, python/mlc_llm/...):
- model/minicpm/minicpm_model.py: parameters embed_tokens, layers.i.self_attn.{wqkv_pack,o_proj},
  layers.i.mlp.{gate_up_proj,down_proj}, layers.i.{input,post_attention}_layernorm, norm, lm_head when untied;
  qkv split as (h_q, h_kv, h_kv) heads; gate_up split in halves, silu(gate) * up; residual * scale_depth / sqrt(L);
  embed * scale_emb; final hidden / (hidden_size // dim_model_base) (integer division); tied head = embedding.
- model/minicpm/minicpm_loader.py: wqkv_pack = concat(q, k, v) rows, gate_up_proj = concat(gate, up) rows.
- quantization/group_quantization.py + quantization.py: q4f16_0 KN ([K/8, N], [K/32, N]), q4f16_1 NK; embedding
  always [V, H/8], [V, H/32]; value = (q - 7) * scale; quantiser scale = max|w| / 7, q = clip(round(w / s + 7), 0, 14).
- quantization/utils.py: element r of a uint32 at bits 4r.
- tvm python/tvm/contrib/tvmjs.py: shard rules, record schema, `tensor-cache.json` is the name load_tensor_cache reads.
- cpp/json_ffi/conv_template.cc: the Conversation keys the runtime requires; prompt = prefix ids + rendered text.
"""

import hashlib
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from conftest import quantized, small_variant
from safetensors.torch import load_file, save_file
from tvm.contrib import tvmjs

from minicpm_edge.artifact import verify
from minicpm_edge.errors import UserError
from minicpm_edge.export import mlc
from minicpm_edge.export.mlc import export_mlc
from minicpm_edge.model import Checkpoint, Tokenizer, load_model

ROOT = Path(__file__).resolve().parents[1]
CAP = 96 << 10  # small shard cap so the bundled model exercises every sharding rule
LAYOUTS = ("q4f16_0", "q4f16_1")
# MiniCPMConfig's fields (minicpm_model.py); those without a default must be in model_config
MLC_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "hidden_act", "rms_norm_eps", "intermediate_size", "scale_emb", "scale_depth", "dim_model_base",
              "use_cache", "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_theta", "context_window_size",
              "prefill_chunk_size", "tensor_parallel_shards", "head_dim", "max_batch_size")
CONV_REQUIRED = ("system_template", "system_message", "add_role_after_system_message", "roles", "messages", "seps",
                 "role_content_sep", "role_empty_sep", "stop_str", "stop_token_ids")


@pytest.fixture(scope="module")
def exports(bundled_gptq, tmp_path_factory):
    root = tmp_path_factory.mktemp("mlc")
    mha = quantized(small_variant(root / "mha-src"), root / "mha", nsamples=16, seqlen=128)
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mlc, "SHARD_CAP", CAP)
        for name, src in (("gqa", bundled_gptq), ("mha", mha)):
            for layout in LAYOUTS:
                out[name, layout] = (src, export_mlc(src, root / f"{name}-{layout}", layout=layout))
    return out


def model_dir(out: Path) -> Path:
    return out / json.loads((out / "export.json").read_text())["model_id"]


# -- an independent reader of the MLC files ------------------------------------------------------------------------
def load(folder: Path) -> dict[str, np.ndarray]:
    params, _ = tvmjs.load_tensor_cache(str(folder), tvm.cpu())  # reads folder/tensor-cache.json
    return {k: v.numpy() for k, v in params.items()}


def unpack(words: np.ndarray) -> np.ndarray:
    shifts = np.arange(8, dtype=np.uint32) * 4
    return ((words[..., None] >> shifts) & 15).reshape(words.shape[0], -1)


def dequant(q_weight: np.ndarray, q_scale: np.ndarray, kn: bool) -> np.ndarray:
    """(q - 7) * scale as float32 [N, K]; KN tensors are stored transposed."""
    if kn:
        q_weight, q_scale = q_weight.T, q_scale.T
    codes = unpack(np.ascontiguousarray(q_weight)).astype(np.float32)
    return (codes - 7) * np.repeat(q_scale.astype(np.float32), 32, 1)


def expected_params(c, kn: bool) -> list[tuple[str, list[int], str]]:
    """mlc's MiniCPMForCausalLM parameters after group quantisation, in module order."""
    h, v, inter, d = c.hidden_size, c.vocab_size, c.intermediate_size, c.hidden_size // c.num_attention_heads

    def linear(name, n, k):
        shapes = ([k // 8, n], [k // 32, n]) if kn else ([n, k // 8], [n, k // 32])
        return [(f"{name}.q_weight", shapes[0], "uint32"), (f"{name}.q_scale", shapes[1], "float16")]

    out = [("model.embed_tokens.q_weight", [v, h // 8], "uint32"),
           ("model.embed_tokens.q_scale", [v, h // 32], "float16")]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        out += linear(p + "self_attn.wqkv_pack", (c.num_attention_heads + 2 * c.num_key_value_heads) * d, h)
        out += linear(p + "self_attn.o_proj", h, c.num_attention_heads * d)
        out += linear(p + "mlp.gate_up_proj", 2 * inter, h) + linear(p + "mlp.down_proj", h, inter)
        out += [(p + "input_layernorm.weight", [h], "float16"), (p + "post_attention_layernorm.weight", [h], "float16")]
    out.append(("model.norm.weight", [h], "float16"))
    if not c.tie_word_embeddings:
        out += linear("lm_head", v, h)
    return out


def mlc_forward(folder: Path, ids: list[int]) -> np.ndarray:
    """The minicpm graph of mlc-llm in float64 numpy, from the exported files alone."""
    cfg = json.loads((folder / "mlc-chat-config.json").read_text())
    mc, kn = cfg["model_config"], cfg["quantization"] == "q4f16_0"
    p = load(folder)

    def w(name):
        return dequant(p[name + ".q_weight"], p[name + ".q_scale"], kn).astype(np.float64)

    def norm(x, name):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + mc["rms_norm_eps"]) * p[name].astype(np.float64)

    H, L, hq, hkv = mc["hidden_size"], mc["num_hidden_layers"], mc["num_attention_heads"], mc["num_key_value_heads"]
    d, T = H // hq, len(ids)
    emb = dequant(p["model.embed_tokens.q_weight"], p["model.embed_tokens.q_scale"], False).astype(np.float64)
    angle = np.arange(T)[:, None] / mc["rope_theta"] ** (np.arange(0, d, 2) / d)[None]
    cos, sin = np.cos(np.concatenate([angle, angle], -1))[:, None], np.sin(np.concatenate([angle, angle], -1))[:, None]

    def rope(t):
        return t * cos + np.concatenate([-t[..., d // 2:], t[..., :d // 2]], -1) * sin

    mask = np.triu(np.full((T, T), -np.inf), 1)
    residual = mc["scale_depth"] / math.sqrt(L)
    x = emb[ids] * mc["scale_emb"]
    for i in range(L):
        pre = f"model.layers.{i}."
        qkv = (norm(x, pre + "input_layernorm.weight") @ w(pre + "self_attn.wqkv_pack").T).reshape(T, hq + 2 * hkv, d)
        q, k, v = rope(qkv[:, :hq]), rope(qkv[:, hq:hq + hkv]), qkv[:, hq + hkv:]
        k, v = np.repeat(k, hq // hkv, axis=1), np.repeat(v, hq // hkv, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / math.sqrt(d) + mask
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", a, v).reshape(T, hq * d)
        x = x + o @ w(pre + "self_attn.o_proj").T * residual
        gate, up = np.split(norm(x, pre + "post_attention_layernorm.weight") @ w(pre + "mlp.gate_up_proj").T, 2, -1)
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w(pre + "mlp.down_proj").T * residual
    x = norm(x, "model.norm.weight") / (H // mc["dim_model_base"])
    return x @ (emb if mc["tie_word_embeddings"] else w("lm_head")).T


def torch_logits(ckpt: Checkpoint, ids: list[int], folder: Path | None = None) -> np.ndarray:
    """Our forward on the GPTQ checkpoint; with `folder`, using the export's q4f16 embedding/head and fp16 norms."""
    model = load_model(ckpt)
    if folder is not None:
        p = load(folder)
        kn = json.loads((folder / "mlc-chat-config.json").read_text())["quantization"] == "q4f16_0"
        with torch.no_grad():
            model.embed_tokens.weight.copy_(torch.from_numpy(
                dequant(p["model.embed_tokens.q_weight"], p["model.embed_tokens.q_scale"], False)))
            if model.lm_head is not None:
                model.lm_head.weight.copy_(torch.from_numpy(dequant(p["lm_head.q_weight"], p["lm_head.q_scale"], kn)))
            for name, prm in model.named_parameters():
                if name.endswith("norm.weight"):
                    prm.copy_(prm.half().float())
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0].double().numpy()


def prompt_ids(tok_dir: Path, n: int = 48) -> list[int]:
    tok = Tokenizer(tok_dir / "tokenizer.model")
    ids = tok.chat_prompt("北京是中国的首都。Tell me a story about a cat.") + tok.encode("Once upon a time", False)
    return ids[:n]


# -- tests ---------------------------------------------------------------------------------------------------------
def test_tvm_reads_every_record_back_byte_for_byte(exports):
    for src, out in exports.values():
        folder = model_dir(out)
        text = (folder / "tensor-cache.json").read_bytes()
        assert (folder / "ndarray-cache.json").read_bytes() == text
        cache = json.loads(text)
        params = load(folder)
        names = []
        for shard in cache["records"]:
            data = (folder / shard["dataPath"]).read_bytes()
            assert shard["format"] == "raw-shard" and shard["nbytes"] == len(data)
            assert shard["md5sum"] == hashlib.md5(data).hexdigest()
            for rec in shard["records"]:
                a = params[rec["name"]]
                assert rec["format"] == "f32-to-bf16" and rec["dtype"] == str(a.dtype) and rec["shape"] == list(a.shape)
                assert a.tobytes() == data[rec["byteOffset"]:rec["byteOffset"] + rec["nbytes"]]
                names.append(rec["name"])
        assert sorted(names) == sorted(params)
        shards = sorted(p.name for p in folder.glob("params_shard_*.bin"))
        assert shards == sorted(s["dataPath"] for s in cache["records"])
        meta = cache["metadata"]
        assert meta["ParamSize"] == len(names) and meta["ParamBytes"] == sum(a.nbytes for a in params.values())


@pytest.mark.parametrize("model", ["mha", "gqa"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_names_shapes_dtypes_are_mlcs(exports, model, layout):
    src, out = exports[model, layout]
    cfg = Checkpoint(src).config
    assert (cfg.num_key_value_heads < cfg.num_attention_heads) == (model == "gqa")
    got = [(n, list(a.shape), str(a.dtype)) for n, a in load(model_dir(out)).items()]
    assert sorted(got) == sorted(expected_params(cfg, layout == "q4f16_0"))


def test_shards_are_what_tvmjs_writes(exports, tmp_path):
    """tvm's own dump_tensor_cache, fed the same tensors in mlc's parameter order, writes the same shards."""
    src, out = exports["gqa", "q4f16_0"]
    folder = model_dir(out)
    params = load(folder)
    order = [n for n, _, _ in expected_params(Checkpoint(src).config, True)]
    tvmjs.dump_tensor_cache(((n, params[n]) for n in order), str(tmp_path), encode_format="f32-to-bf16",
                            shard_cap_mb=CAP / 2**20, show_progress=False)
    theirs = json.loads((tmp_path / "tensor-cache.json").read_text())["records"]
    ours = json.loads((folder / "tensor-cache.json").read_text())["records"]
    assert ours == theirs
    for shard in ours:
        assert (folder / shard["dataPath"]).read_bytes() == (tmp_path / shard["dataPath"]).read_bytes()
    # the cap was exercised: tensors of >= CAP/2 alone (one exactly CAP/2), others packed below the cap
    alone = [s for s in ours if len(s["records"]) == 1 and 2 * s["nbytes"] >= CAP]
    packed = [s for s in ours if len(s["records"]) > 1]
    assert alone and packed and any(2 * s["nbytes"] == CAP for s in alone)
    assert all(s["nbytes"] < CAP for s in packed)


def test_default_cap_and_metadata(bundled_gptq, tmp_path):
    out = export_mlc(bundled_gptq, tmp_path / "one", model_id="tiny")
    cache = json.loads((out / "tiny" / "tensor-cache.json").read_text())
    assert mlc.SHARD_CAP == 32 << 20 and len(cache["records"]) == 1  # 2 MB model: one shard
    c = Checkpoint(bundled_gptq).config
    h, q, kv = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    layer = h * q + 2 * h * kv + q * h + 3 * h * c.intermediate_size + 2 * h
    n = c.vocab_size * h + c.num_hidden_layers * layer + h  # unquantised weights, as mlc's loader counts them
    assert cache["metadata"]["BitsPerParam"] == pytest.approx(cache["metadata"]["ParamBytes"] * 8 / n)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_linears_dequantise_to_the_gptq_weights_exactly(exports, layout):
    for model in ("mha", "gqa"):
        src, out = exports[model, layout]
        ckpt, p = Checkpoint(src), load(model_dir(out))
        fused = {"self_attn.wqkv_pack": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 "self_attn.o_proj": ("self_attn.o_proj",), "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
                 "mlp.down_proj": ("mlp.down_proj",)}
        for i in range(ckpt.config.num_hidden_layers):
            for dst, srcs in fused.items():
                name = f"model.layers.{i}.{dst}"
                ref = torch.cat([ckpt.quantized(f"model.layers.{i}.{s}").dequantize() for s in srcs]).numpy()
                got = dequant(p[name + ".q_weight"], p[name + ".q_scale"], layout == "q4f16_0")
                assert np.array_equal(got, ref), name
                assert unpack(p[name + ".q_weight"]).max() <= 15
            for norm in ("input_layernorm", "post_attention_layernorm"):
                name = f"model.layers.{i}.{norm}.weight"
                assert np.array_equal(p[name], ckpt.tensor(name).half().numpy())
        assert np.array_equal(p["model.norm.weight"], ckpt.final_norm().half().numpy())


def test_embedding_follows_mlcs_q4f16_rule(exports):
    src, out = exports["gqa", "q4f16_1"]
    p = load(model_dir(out))
    w = Checkpoint(src).embedding().numpy().astype(np.float16)
    g = w.reshape(w.shape[0], -1, 32)
    scale = np.abs(g).max(-1) / np.float16(7)  # float16 arithmetic throughout, as mlc's quantiser (model dtype)
    codes = np.clip(np.rint(g / scale[..., None] + np.float16(7)), 0, 14)
    assert scale.dtype == np.float16 and np.array_equal(p["model.embed_tokens.q_scale"], scale)
    assert np.array_equal(unpack(p["model.embed_tokens.q_weight"]), codes.reshape(w.shape).astype(np.uint32))
    deq = dequant(p["model.embed_tokens.q_weight"], p["model.embed_tokens.q_scale"], False)
    err = np.abs(deq - w.astype(np.float32))
    # round to nearest, after two float16 roundings (w / s: half-ulp 2^-9 below 8; + 7: half-ulp 2^-8 below 16)
    assert (err <= np.repeat(scale.astype(np.float32), 32, 1) * (0.5 + 3 / 512) * (1 + 1e-6)).all()


@pytest.mark.parametrize("model,layout", [("gqa", "q4f16_0"), ("mha", "q4f16_1")])
def test_forward_from_mlc_files_reproduces_int4_logits(exports, model, layout):
    """Against our forward with the export's q4f16 embedding and fp16 norms put in: only float32 (torch) vs float64
    (numpy) rounding remains, so the tolerance is 1e-4 of the largest logit (measured: under 1e-6 of it)."""
    src, out = exports[model, layout]
    folder = model_dir(out)
    ids = prompt_ids(src)
    ours, same = mlc_forward(folder, ids), torch_logits(Checkpoint(src), ids, folder)
    print(f"\n{model} {layout}: max |logit diff| {np.abs(ours - same).max():.2e}, max |logit| {np.abs(same).max():.2f}")
    assert np.abs(ours - same).max() <= 1e-4 * np.abs(same).max()


@pytest.mark.parametrize("group, layout", [(64, "q4f16_1"), (128, "q4f16_0"), (-1, "q4f16_1")])
def test_larger_groups_repeat_their_scale(tmp_path, group, layout):
    """Group 64 / 128 / per channel: tvm reads records whose every group of 32 carries its GPTQ group's scale, so
    they dequantise to the checkpoint's weights exactly, and mlc's graph on them gives our int4 logits."""
    src = quantized(small_variant(tmp_path / "m", intermediate_size=384), tmp_path / "q", group_size=group,
                    nsamples=4, seqlen=64)
    folder = model_dir(export_mlc(src, tmp_path / "out", layout=layout))
    ckpt, p = Checkpoint(src), load(folder)
    for dst, srcs in mlc.FUSED.items():
        name = f"model.layers.1.{dst}"
        ref = torch.cat([ckpt.quantized(f"model.layers.1.{s}").dequantize() for s in srcs]).numpy()
        assert np.array_equal(dequant(p[name + ".q_weight"], p[name + ".q_scale"], layout == "q4f16_0"), ref), name
    ids = prompt_ids(src)
    ours, same = mlc_forward(folder, ids), torch_logits(ckpt, ids, folder)
    assert np.abs(ours - same).max() <= 1e-4 * np.abs(same).max()


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_mlc_logits_stay_close_to_the_gptq_checkpoint(exports):
    """Against the GPTQ checkpoint as it is, on 256 held-out tokens. The int4 Linears are identical; what differs is
    the embedding, which mlc stores in q4f16 too (and, tied, it is the LM head), plus fp16 norms. On the bundled 3.7M
    model (H = 256) that measured: KL 0.011 nats, top-1 agreement 0.90, PPL +1.1%, max |log-prob diff| 1.7.
    The bounds sit a few times above those figures."""
    src, out = exports["gqa", "q4f16_0"]
    tok = Tokenizer(src / "tokenizer.model")
    ids = tok.encode((ROOT / "calib_data" / "heldout" / "heldout_en.txt").read_text()[:4000])[:256]
    ours, gptq = log_softmax(mlc_forward(model_dir(out), ids)), log_softmax(torch_logits(Checkpoint(src), ids))
    kl = (np.exp(gptq) * (gptq - ours)).sum(-1).mean()
    top1 = (ours.argmax(-1) == gptq.argmax(-1)).mean()
    nll = [-lp[np.arange(len(ids) - 1), ids[1:]].mean() for lp in (gptq, ours)]
    diff = np.abs(ours - gptq).max()
    print(f"\nMLC files vs GPTQ forward, {len(ids)} tokens: KL {kl:.4f}, top-1 {top1:.3f}, "
          f"PPL {math.exp(nll[0]):.2f} -> {math.exp(nll[1]):.2f}, max |log-prob diff| {diff:.3f}")
    assert 0 < kl < 0.05 and top1 >= 0.8 and abs(nll[1] - nll[0]) < 0.05


def test_llama_format_untied_model(tmp_path):
    """LlamaForCausalLM MiniCPM: muP folded into the weights -> neutral factors; the float lm_head in q4f16 as mlc."""
    src = small_variant(tmp_path / "src", architectures=["LlamaForCausalLM"], model_type="llama",
                        tie_word_embeddings=False, num_attention_heads=4, num_key_value_heads=2)
    gptq = quantized(src, tmp_path / "gptq", method="rtn")
    out = export_mlc(gptq, tmp_path / "out", layout="q4f16_0")
    folder = model_dir(out)
    cfg = json.loads((folder / "mlc-chat-config.json").read_text())["model_config"]
    assert cfg["tie_word_embeddings"] is False and cfg["scale_emb"] == 1 and cfg["dim_model_base"] == cfg["hidden_size"]
    assert cfg["scale_depth"] / math.sqrt(cfg["num_hidden_layers"]) == 1.0
    ckpt = Checkpoint(gptq)
    got = [(n, list(a.shape), str(a.dtype)) for n, a in load(folder).items()]
    assert sorted(got) == sorted(expected_params(ckpt.config, True))
    ids = prompt_ids(gptq)
    ours, same = mlc_forward(folder, ids), torch_logits(ckpt, ids, folder)
    assert np.abs(ours - same).max() <= 1e-4 * np.abs(same).max()


def test_dynamic_ntk_and_use_mup_false(tmp_path):
    """MiniCPM-2B-128k's dynamic NTK is plain rotary within max_position_embeddings, which bounds the context window;
    use_mup false gets mlc's neutral factors. mlc's own graph (as mlc_forward reads the files) equals our forward."""
    src = small_variant(tmp_path / "src", rope_theta=1e6, rope_scaling={"type": "dynamic", "factor": 4.0},
                        use_mup=False)
    gptq = quantized(src, tmp_path / "gptq", method="rtn")
    out = export_mlc(gptq, tmp_path / "out", layout="q4f16_0")
    folder = model_dir(out)
    cfg = json.loads((folder / "mlc-chat-config.json").read_text())["model_config"]
    assert cfg["scale_emb"] == 1 and cfg["dim_model_base"] == cfg["hidden_size"] and cfg["rope_theta"] == 1e6
    info = json.loads((out / "export.json").read_text())
    assert info["model"]["exact_context"] == 1024 and info["context_window_size"] <= 1024
    ids = prompt_ids(gptq)
    ours, same = mlc_forward(folder, ids), torch_logits(Checkpoint(gptq), ids, folder)
    assert np.abs(ours - same).max() <= 1e-4 * np.abs(same).max()
    _refused(gptq, tmp_path / "o", "max_position_embeddings 1024 \\(the context within which", context_window=2048)


@pytest.mark.parametrize("overrides, match", [
    ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 16, "long_factor": [1.0] * 16,
                       "original_max_position_embeddings": 1024}}, "rope_scaling longrope is ignored by mlc-llm"),
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": False,
      "rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling linear is ignored"),
    ({"kv_channels": 64}, "head_dim 64 x 4 heads differs from hidden_size 128"),
])
def test_rope_scaling_and_head_size_refused(tmp_path, overrides, match):
    _refused(small_variant(tmp_path / "src", **overrides), tmp_path / "out", match)


def test_chat_config(exports):
    src, out = exports["gqa", "q4f16_0"]
    folder, ckpt = model_dir(out), Checkpoint(src)
    c = ckpt.config
    cfg = json.loads((folder / "mlc-chat-config.json").read_text())
    assert cfg["version"] == "0.1.0" and cfg["model_type"] == "minicpm" and cfg["quantization"] == "q4f16_0"
    mc = cfg["model_config"]
    assert set(MLC_FIELDS) <= set(mc) and mc["tie_word_embeddings"] is True and mc["hidden_act"] == "silu"
    assert (mc["num_attention_heads"], mc["num_key_value_heads"], mc["head_dim"]) == (8, 2, 32)
    assert (mc["scale_emb"], mc["scale_depth"], mc["dim_model_base"]) == (12, 1.4, 64)
    assert mc["hidden_size"] // mc["dim_model_base"] == c.logit_scale
    for key in ("vocab_size", "context_window_size", "prefill_chunk_size", "tensor_parallel_shards"):
        assert cfg[key] == mc[key]  # mlc_llm compile lets the top level override model_config
    assert cfg["context_window_size"] == min(2048, c.max_position_embeddings) and cfg["prefill_chunk_size"] == 128
    assert cfg["sliding_window_size"] == -1 and cfg["attention_sink_size"] == -1
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 0)
    assert (cfg["temperature"], cfg["top_p"], cfg["repetition_penalty"]) == (0.5, 0.8, 1.02)
    assert cfg["tokenizer_files"] == ["tokenizer.model", "tokenizer_config.json"]
    assert all((folder / f).read_bytes() == (src / f).read_bytes() for f in cfg["tokenizer_files"])
    assert cfg["tokenizer_info"] == {"token_postproc_method": "byte_fallback", "prepend_space_in_encode": False,
                                     "strip_space_in_decode": False}
    conv = cfg["conv_template"]
    assert set(CONV_REQUIRED) <= set(conv) and conv["stop_token_ids"] == [2] and "<用户>" in conv["stop_str"]
    # render the way mlc's Conversation does: prefix ids, then system, then role + sep + content + sep per message,
    # then the assistant role with role_empty_sep; the runtime tokenises the text in one piece
    tok = Tokenizer(folder / "tokenizer.model")
    for prompt in ("你好", "Write a haiku about rain."):
        seps = conv["seps"] * (2 // len(conv["seps"]))
        text = conv["system_template"].replace("{system_message}", conv["system_message"])
        text += conv["roles"]["user"] + conv["role_content_sep"]
        text += conv["role_templates"]["user"].replace("{user_message}", prompt) + seps[0]
        text += conv["roles"]["assistant"] + conv["role_empty_sep"]
        assert conv["system_prefix_token_ids"] + tok.encode(text, bos=False) == tok.chat_prompt(prompt)


def test_package_config_and_readme(exports):
    _, out = exports["gqa", "q4f16_0"]
    pkg = json.loads((out / "mlc-package-config.json").read_text())
    assert pkg["device"] == "android" and len(pkg["model_list"]) == 1
    entry = pkg["model_list"][0]
    assert (out / entry["model"] / "mlc-chat-config.json").is_file() and entry["model_id"] == entry["model"]
    assert entry["bundle_weight"] is True and entry["estimated_vram_bytes"] > 0
    assert entry["model_lib"] in pkg["model_lib_path_for_prepare_libs"]
    assert entry["model_lib"].isidentifier()  # mlc_llm compile's --system-lib-prefix rule: [A-Za-z_][A-Za-z0-9_]*
    assert "HarmonyOS" in (out / "README.md").read_text()
    assert verify(out)["unlisted"] == []


def test_harmony_writes_the_same_weights(exports, tmp_path):
    src, android = exports["gqa", "q4f16_0"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mlc, "SHARD_CAP", CAP)
        out = export_mlc(src, tmp_path / "h", target="harmony", layout="q4f16_0")
    assert json.loads((out / "export.json").read_text())["target"] == "harmony"
    assert (out / "README.md").read_text().startswith("> Exported for HarmonyOS")
    a, h = model_dir(android), model_dir(out)
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in h.iterdir())
    for p in a.iterdir():
        assert p.read_bytes() == (h / p.name).read_bytes(), p.name


def _refused(src, out, match, **kw):
    with pytest.raises(UserError, match=match) as e:
        export_mlc(src, out, **kw)
    assert "\n" not in str(e.value)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


def test_refusals_leave_nothing(bundled, tmp_path):
    plain = small_variant(tmp_path / "plain")
    _refused(plain, tmp_path / "o1", "not a GPTQ checkpoint")
    _refused(small_variant(tmp_path / "fat", hidden_act="fatrelu", hidden_act_param=0.03), tmp_path / "o2", "SiLU")
    _refused(quantized(plain, tmp_path / "asym", method="rtn", sym=False), tmp_path / "o3", "asymmetric")
    _refused(quantized(plain, tmp_path / "b8", method="rtn", bits=8), tmp_path / "o5", "8-bit")
    gptq = quantized(plain, tmp_path / "gptq", method="rtn")
    # act-order as other tools write it: g_idx not in runs of 32 (our quantiser only makes static groups)
    act = tmp_path / "act"
    shutil.copytree(gptq, act)
    state = load_file(act / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.g_idx"
    state[name] = (torch.arange(state[name].numel()) % (state[name].numel() // 32)).to(torch.int32)
    save_file(state, act / "model.safetensors")
    _refused(act, tmp_path / "o6", "act-order")
    _refused(gptq, tmp_path / "o7", "layout", layout="q8f16_1")
    _refused(gptq, tmp_path / "o8", "context window", context_window=10**6)
    _refused(gptq, tmp_path / "o9", "model id", model_id="../escape")


def test_existing_out_needs_force(bundled_gptq, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="--force"):
        export_mlc(bundled_gptq, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not list(tmp_path.glob(".out.*"))
    export_mlc(bundled_gptq, out, force=True, model_id="m")
    assert (out / "m" / "tensor-cache.json").is_file() and not (out / "keep.txt").exists()


def test_scripts(exports, tmp_path):
    _, out = exports["gqa", "q4f16_0"]
    scripts = ROOT / "targets" / "android"
    for name in ("compile.sh", "push_weights.sh"):
        assert os.access(scripts / name, os.X_OK), name
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    r = subprocess.run([str(scripts / "compile.sh"), str(out)], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "mlc_llm" in r.stderr and "ANDROID_NDK" in r.stderr, r.stderr
    r = subprocess.run([str(scripts / "compile.sh"), str(tmp_path)], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "mlc-package-config.json" in r.stderr
    r = subprocess.run([str(scripts / "push_weights.sh"), str(out)], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "adb" in r.stderr, r.stderr
