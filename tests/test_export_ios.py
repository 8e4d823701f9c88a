"""iOS target: GGUF with the GPTQ codes in Q4_0/Q4_1 blocks, read back by gguf-py and run by llama.cpp."""

import json
import shutil

import gguf
import numpy as np
import pytest
import torch

from conftest import quantized, small_variant
from minicpm_edge.errors import UserError
from minicpm_edge.export import gguf as G
from minicpm_edge.export.ios import export_ios
from minicpm_edge.model import Checkpoint, Tokenizer
from minicpm_edge.model.checkpoint import LINEARS
from minicpm_edge.runtimes import open_runner

TEXT = ("The committee met on Tuesday to review the budget for the new library.\n\n"
        "会议于周二召开，审议新图书馆的预算。大家一致同意增加儿童阅览区的经费。\n"
        "def area(r):\n    return 3.14159 * r * r\n")
PROBES = ["Hello, world! 你好，世界！", "    indented  code\n\tx = [1, 2, 3]  # list", "emoji 🚀🎉 and ümlauts",
          "数学：12 + 35 = 47。", "  leading spaces and trailing  "]


@pytest.fixture(scope="module")
def ios(bundled_gptq, tmp_path_factory):
    return export_ios(bundled_gptq, tmp_path_factory.mktemp("ios") / "ios")


def gguf_file(folder):
    (f,) = folder.glob("*.gguf")
    return f


def field(reader, key):
    f = reader.fields[key]
    return f.contents()


def test_folder_has_gguf_template_and_guide(ios, bundled_gptq):
    names = {p.name for p in ios.iterdir()}
    assert names == {"gptq-Q4_0.gguf", "MiniCPM.json", "README.md", "export.json", "manifest.json"}
    t = json.loads((ios / "MiniCPM.json").read_text())
    assert t["prompt_format"] == "<用户>{{prompt}}<AI>" and t["model_inference"] == "llama"
    assert "</s>" in t["reverse_prompt"].split(",") and t["add_bos_token"] is True and t["add_eos_token"] is False
    for key, kind in (("context", int), ("n_batch", int), ("temp", float), ("top_k", int), ("top_p", float),
                      ("repeat_last_n", int), ("repeat_penalty", float), ("use_metal", bool), ("mmap", bool),
                      ("parse_special_tokens", bool)):
        assert isinstance(t[key], kind), key
    assert "LLMFarm" in (ios / "README.md").read_text()


def test_metadata_keys(ios, bundled_gptq):
    c = Checkpoint(bundled_gptq).config
    r = gguf.GGUFReader(gguf_file(ios))
    assert field(r, "general.architecture") == "minicpm"
    assert field(r, "general.file_type") == 2 and field(r, "general.quantization_version") == 2
    expect = {"minicpm.block_count": c.num_hidden_layers, "minicpm.context_length": c.max_position_embeddings,
              "minicpm.embedding_length": c.hidden_size, "minicpm.feed_forward_length": c.intermediate_size,
              "minicpm.attention.head_count": c.num_attention_heads,
              "minicpm.attention.head_count_kv": c.num_key_value_heads}
    for k, v in expect.items():
        assert field(r, k) == v, k
    assert field(r, "minicpm.embedding_scale") == pytest.approx(12)
    assert field(r, "minicpm.residual_scale") == pytest.approx(1.4 / 2, rel=1e-6)
    assert field(r, "minicpm.logit_scale") == pytest.approx(c.hidden_size / 64)
    assert field(r, "tokenizer.ggml.model") == "llama" and field(r, "tokenizer.ggml.add_bos_token") is True
    assert field(r, "tokenizer.ggml.bos_token_id") == 1 and field(r, "tokenizer.ggml.eos_token_id") == 2
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == c.vocab_size and tokens[3] == "<用户>" and types[3] == 4 and types[1] == 3
    assert "<用户>" in field(r, "tokenizer.chat_template")
    kinds = {t.name: t.tensor_type for t in r.tensors}
    assert "output.weight" not in kinds  # tied
    assert kinds["token_embd.weight"] == G.QT.F16 and kinds["output_norm.weight"] == G.QT.F32
    assert kinds["blk.0.attn_norm.weight"] == G.QT.F32 and kinds["blk.3.ffn_down.weight"] == G.QT.Q4_0
    assert len(kinds) == 2 + c.num_hidden_layers * 9


def test_codes_and_scales_are_the_gptq_ones(ios, bundled_gptq):
    ckpt = Checkpoint(bundled_gptq)
    c = ckpt.config
    tensors = {t.name: t for t in gguf.GGUFReader(gguf_file(ios)).tensors}
    for i in range(c.num_hidden_layers):
        for m in LINEARS:
            q = ckpt.quantized(f"model.layers.{i}.{m}")
            t = tensors[f"blk.{i}.{G.NAMES[m]}.weight"]
            assert tuple(int(x) for x in t.shape) == (q.shape[1], q.shape[0])  # innermost first
            codes, d, mm = G.q4_codes(t.data, q.shape[1], G.QT.Q4_0)
            heads = {"self_attn.q_proj": c.num_attention_heads, "self_attn.k_proj": c.num_key_value_heads}.get(m)
            perm = G.permute_rows(q.shape[0], heads) if heads else torch.arange(q.shape[0])
            assert mm is None
            assert np.array_equal(codes, q.codes[perm].numpy())
            assert np.array_equal(d.view(np.uint16), q.scales[:, perm].t().contiguous().numpy().view(np.uint16))


def test_permutation_matches_llama_pairing():
    # head of 8 rows: rotate-half pairs (0,4),(1,5).. become adjacent pairs (0,1),(2,3)..
    assert G.permute_rows(8, 1).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert G.permute_rows(16, 2).tolist()[8:] == [8, 12, 9, 13, 10, 14, 11, 15]


@pytest.fixture(scope="module")
def runners(ios, bundled_gptq):
    return open_runner(bundled_gptq), open_runner(ios)


def test_llama_cpp_logits_and_greedy_match_torch(runners, bundled_gptq):
    torch_run, cpp = runners
    assert cpp.name == "llama.cpp"
    ids = Tokenizer(bundled_gptq / "tokenizer.model").encode(TEXT)
    a, b = torch_run.logits(ids), cpp.logits(ids)
    # llama.cpp multiplies Q4_0 weights with Q8_0-rounded activations and keeps the embedding in F16
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.95
    # greedy decoding with llama.cpp's KV cache: every token it picks is torch's choice, or a near-tie in torch's logits
    gen = cpp.generate(ids, 32)
    full = torch_run.logits(ids + gen)
    margins = [full[len(ids) + k - 1].max() - full[len(ids) + k - 1][t] for k, t in enumerate(gen)]
    assert max(margins) < 0.25 and sum(m == 0 for m in margins) >= 28, margins


def test_llama_cpp_tokenises_like_sentencepiece(runners, bundled_gptq):
    tok = Tokenizer(bundled_gptq / "tokenizer.model")
    _, cpp = runners
    for text in PROBES + [TEXT]:
        assert cpp.tokenize(text) == tok.encode(text), text


def test_llama_cpp_space_prefix_after_special_tokens(runners, bundled_gptq):
    """Pins a known difference: llama.cpp starts every text fragment after a user-defined token (<用户>, <AI>) with
    a dummy-prefix space, which SentencePiece does not. The special tokens themselves are found alike."""
    tok = Tokenizer(bundled_gptq / "tokenizer.model")
    _, cpp = runners
    text = "<用户>写一首诗<AI>好的"
    a, b = cpp.tokenize(text), tok.encode(text)
    assert [i for i in a if i in (3, 4)] == [i for i in b if i in (3, 4)] == [3, 4]
    space = tok.sp.PieceToId("▁")
    assert a != b and [i for i in a if i != space] == [i for i in b if i != space]


def test_missing_logit_scale_breaks_llama_cpp(bundled_gptq, tmp_path, runners, monkeypatch):
    """Pins FORMATS.md: llama.cpp needs all three scale keys; without logit_scale its output is wrong."""
    monkeypatch.setattr(gguf.GGUFWriter, "add_logit_scale", lambda self, v: None)
    path = tmp_path / "no-logit-scale.gguf"
    G.write_gguf(Checkpoint(bundled_gptq), path)
    assert "minicpm.logit_scale" not in gguf.GGUFReader(path).fields
    ids = Tokenizer(bundled_gptq / "tokenizer.model").encode(TEXT)
    good, bad = runners[0].logits(ids), open_runner(path).logits(ids)
    assert np.abs(good - bad).max() > 0.5 * np.abs(good).max()


def test_asymmetric_goes_to_q4_1_exactly(tmp_path):
    src = small_variant(tmp_path / "mha")
    q = quantized(src, tmp_path / "asym", method="rtn", sym=False)
    out = export_ios(q, tmp_path / "ios")
    f = gguf_file(out)
    assert f.name == "asym-Q4_1.gguf"
    r = gguf.GGUFReader(f)
    assert field(r, "general.file_type") == 3
    t = {x.name: x for x in r.tensors}["blk.1.ffn_up.weight"]
    ql = Checkpoint(q).quantized("model.layers.1.mlp.up_proj")
    codes, d, m = G.q4_codes(t.data, ql.shape[1], G.QT.Q4_1)
    assert np.array_equal(codes, ql.codes.numpy())
    assert np.array_equal(d, ql.scales.t().numpy())
    assert np.array_equal(m, (-ql.scales.float() * ql.zeros.float()).t().numpy().astype(np.float16))
    ids = Tokenizer(q / "tokenizer.model").encode(TEXT)
    a, b = open_runner(q).logits(ids), open_runner(out).logits(ids)
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()


def test_f16_export_of_unquantised_checkpoint_with_untied_head(tmp_path):
    src = small_variant(tmp_path / "untied", tie_word_embeddings=False)
    out = export_ios(src, tmp_path / "f16", embedding="f32")
    f = gguf_file(out)
    assert f.name == "untied-F16.gguf"
    r = gguf.GGUFReader(f)
    kinds = {t.name: t.tensor_type for t in r.tensors}
    assert kinds["output.weight"] == G.QT.F32 and kinds["blk.0.attn_q.weight"] == G.QT.F16
    assert field(r, "general.file_type") == 1
    ids = Tokenizer(src / "tokenizer.model").encode(TEXT)
    a, b = open_runner(src).logits(ids), open_runner(out).logits(ids)
    assert np.abs(a - b).max() < 0.02 * np.abs(a).max()



def test_f16_embedding_is_converted_from_the_stored_dtype(bundled_gptq, tmp_path):
    """The bf16 table goes to f16 directly (no float32 copy of it): equal to the float32 route, and a value beyond
    f16's range is refused with what to do instead, not written as inf."""
    from safetensors.torch import load_file, save_file

    out = export_ios(bundled_gptq, tmp_path / "ios")
    r = gguf.GGUFReader(gguf_file(out))
    emb = next(t for t in r.tensors if t.name == "token_embd.weight")
    want = Checkpoint(bundled_gptq).embedding().numpy().astype(np.float16)
    assert np.array_equal(np.asarray(emb.data).reshape(want.shape), want)
    big = shutil.copytree(bundled_gptq, tmp_path / "big")
    state = load_file(str(big / "model.safetensors"))
    state["model.embed_tokens.weight"][5, 3] = 1e5  # fine in bf16, beyond f16
    save_file(state, str(big / "model.safetensors"), metadata={"format": "pt"})
    (big / "manifest.json").unlink(missing_ok=True)
    with pytest.raises(UserError, match="token_embd.weight: values beyond float16's range"):
        export_ios(big, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    assert export_ios(big, tmp_path / "f32", embedding="f32").exists()

def test_q8_0_embedding(bundled_gptq, tmp_path):
    out = export_ios(bundled_gptq, tmp_path / "q8", embedding="q8_0")
    kinds = {t.name: t.tensor_type for t in gguf.GGUFReader(gguf_file(out)).tensors}
    assert kinds["token_embd.weight"] == G.QT.Q8_0
    ids = Tokenizer(bundled_gptq / "tokenizer.model").encode(TEXT)
    a, b = open_runner(bundled_gptq).logits(ids), open_runner(out).logits(ids)
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.9


@pytest.mark.parametrize("case, message", [
    ("fatrelu", "hard-codes SiLU"),
    ("bits3", "GPTQ 3-bit has no exact GGUF form"),
])
def test_refusals_leave_nothing(tmp_path, case, message):
    if case == "fatrelu":
        q = quantized(small_variant(tmp_path / "s", hidden_act="fatrelu", hidden_act_param=0.03), tmp_path / "q",
                      method="rtn")
    else:
        q = quantized(small_variant(tmp_path / "m"), tmp_path / "q", method="rtn", bits=3, group_size=32)
    with pytest.raises(UserError, match=message):
        export_ios(q, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["q", "s" if case == "fatrelu" else "m"])


@pytest.mark.parametrize("group, sym", [(64, True), (128, True), (-1, True), (128, False), (-1, False)])
def test_larger_groups_repeat_their_scale_over_blocks(tmp_path, group, sym):
    """Group 64 / 128 / per channel: every block of 32 carries its group's d (and m = -d * z), codes unchanged."""
    q_dir = quantized(small_variant(tmp_path / "m", intermediate_size=384), tmp_path / "q", group_size=group, sym=sym,
                      nsamples=4, seqlen=64)
    out = export_ios(q_dir, tmp_path / "ios")
    ckpt = Checkpoint(q_dir)
    qtype = G.QT.Q4_0 if sym else G.QT.Q4_1
    tensors = {t.name: t for t in gguf.GGUFReader(gguf_file(out)).tensors}
    for m in LINEARS:
        q = ckpt.quantized(f"model.layers.1.{m}")
        t = tensors[f"blk.1.{G.NAMES[m]}.weight"]
        assert t.tensor_type == qtype
        n, k = q.shape
        codes, d, mm = G.q4_codes(t.data, k, qtype)
        heads = {"self_attn.q_proj": 4, "self_attn.k_proj": 4}.get(m)
        perm = G.permute_rows(n, heads) if heads else torch.arange(n)
        glen = k if group == -1 else group
        scales = q.scales[:, perm].t().repeat_interleave(glen // 32, 1)  # [N, K/32]
        assert np.array_equal(codes, q.codes[perm].numpy())
        assert np.array_equal(d.view(np.uint16), scales.contiguous().numpy().view(np.uint16))
        if not sym:
            zeros = q.zeros[:, perm].t().repeat_interleave(glen // 32, 1).float()
            assert np.array_equal(mm, (-scales.float() * zeros).numpy().astype(np.float16))
        # gguf-py's own dequantiser gives our dequantised weights (up to fp16 rounding of m for Q4_1)
        ours = q.dequantize()[perm].numpy()
        theirs = gguf.quants.dequantize(t.data, qtype).reshape(n, k)
        assert np.abs(theirs - ours).max() <= (0 if sym else 1e-3 * np.abs(ours).max())


def test_llama_cpp_runs_group_128(bundled, tmp_path):
    q_dir = quantized(bundled, tmp_path / "g128", group_size=128, nsamples=16, seqlen=128)
    out = export_ios(q_dir, tmp_path / "ios")
    ids = Tokenizer(q_dir / "tokenizer.model").encode(TEXT)
    a, b = open_runner(q_dir).logits(ids), open_runner(out).logits(ids)
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.95


def act_order_checkpoint(src_q, out):
    """A copy of a GPTQ checkpoint whose layer-0 q_proj has AutoGPTQ-style act-order g_idx (groups not contiguous)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src_q, out)
    t = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.g_idx"
    k = t[name].numel()
    t[name] = (torch.randperm(k, generator=torch.Generator().manual_seed(0)) // 32).to(torch.int32)
    save_file(t, str(out / "model.safetensors"))
    return out


def test_act_order_refused(bundled_gptq, tmp_path):
    q = act_order_checkpoint(bundled_gptq, tmp_path / "actorder")
    with pytest.raises(UserError, match="act-order groups are not contiguous"):
        export_ios(q, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_existing_output_needs_force(ios, bundled_gptq):
    before = (ios / "manifest.json").read_text()
    with pytest.raises(UserError, match="exists; add --force"):
        export_ios(bundled_gptq, ios)
    assert (ios / "manifest.json").read_text() == before


# -- rotary scalings and MiniCPM4 keys in llama.cpp (docs/ROPE.md) ----------------------------------------------------
def longrope(original):
    return {"rope_type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(16)],
            "long_factor": [1.0 + 1.5 * i for i in range(16)], "original_max_position_embeddings": original}


LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": False}
ROPE_CASES = {  # the bundled model's shape: max_position_embeddings 1024, head_dim 32; llama.cpp runs with n_ctx 2048
    "longrope-short": {"rope_scaling": longrope(1024)},  # max_pos == original: short list, attention factor 1
    "longrope-long": {"rope_scaling": longrope(64)},  # OpenBMB: long list at every length, attention factor 1.29
    "longrope-llama": {**LLAMA, "rope_scaling": longrope(64)},  # llama.cpp's long slot (n_ctx > 64), sequence > 64
    "dynamic": {"rope_theta": 1e6, "rope_scaling": {"type": "dynamic", "factor": 4.0}},
    "llama3": {**LLAMA, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    "minicpm4-keys": {"kv_channels": 64, "use_mup": False, "tie_word_embeddings": False,
                      "sparse_config": {"dense_len": 8192}},
    "head-dim-llama": {**LLAMA, "head_dim": 64},
}


def rope_gguf(tmp_path, name):
    src = small_variant(tmp_path / name, **ROPE_CASES[name])
    return src, export_ios(src, tmp_path / f"{name}-ios", dtype="f32", embedding="f32")


@pytest.mark.parametrize("name", ROPE_CASES)
def test_rope_scaling_and_head_size_run_in_llama_cpp(tmp_path, name):
    src, out = rope_gguf(tmp_path, name)
    r = gguf.GGUFReader(gguf_file(out))
    kinds = {t.name: t.tensor_type for t in r.tensors}
    c = Checkpoint(src).config
    assert field(r, "minicpm.context_length") == c.exact_context
    if name.startswith("longrope") or name == "llama3":
        assert kinds["rope_factors_long.weight"] == kinds["rope_factors_short.weight"] == G.QT.F32
        assert field(r, "minicpm.rope.scaling.type") == "longrope"
        factors = {t.name: np.asarray(t.data) for t in r.tensors if t.name.startswith("rope_factors")}
        same = name != "longrope-llama"  # OpenBMB's fixed list in both slots; the llama-format file switches lists
        assert np.array_equal(factors["rope_factors_long.weight"], factors["rope_factors_short.weight"]) == same
    else:
        assert not any(n.startswith("rope_factors") for n in kinds)
    if name.startswith("longrope"):
        assert field(r, "minicpm.rope.scaling.original_context_length") == (1024 if "short" in name else 64)
        assert abs(field(r, "minicpm.rope.scaling.attn_factor") - G.rope.attention_factor(c)) < 1e-6
    if c.head_dim * c.num_attention_heads != c.hidden_size:
        assert field(r, "minicpm.attention.key_length") == field(r, "minicpm.attention.value_length") == 64
    assert ("output.weight" in kinds) == (not c.tie_word_embeddings)
    assert json.loads((out / "export.json").read_text())["model"]["exact_context"] == c.exact_context
    ids = Tokenizer(src / "tokenizer.model").encode(TEXT * 2)
    assert len(ids) > 64  # past original (64): the long regime of longrope-llama
    a, b = open_runner(src).logits(ids), open_runner(out).logits(ids)
    assert np.abs(a - b).max() < 5e-3 * np.abs(a).max()


def test_llama_cpp_applies_the_attention_factor(tmp_path, monkeypatch):
    """Written without rope.scaling.attn_factor's value (1 instead of 1.29), llama.cpp's output is visibly off."""
    src = small_variant(tmp_path / "m", rope_scaling=longrope(64))
    ids = Tokenizer(src / "tokenizer.model").encode(TEXT)
    a = open_runner(src).logits(ids)
    monkeypatch.setattr(G.rope, "attention_factor", lambda c: 1.0)
    out = export_ios(src, tmp_path / "ios", dtype="f32", embedding="f32")
    assert np.abs(a - open_runner(out).logits(ids)).max() > 5e-2 * np.abs(a).max()
