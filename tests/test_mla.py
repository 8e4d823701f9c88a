"""MiniCPM3 (multi-head latent attention): config, forward against transformers' MiniCPM3ForCausalLM, KV cache."""

import re

import pytest
import torch

from conftest import random_state, stepwise_logits, write_checkpoint
from minicpm_edge.errors import UserError
from minicpm_edge.model import Checkpoint, load_model, parse_config

# a tiny MiniCPM3: LongRoPE with different short and long lists and max_position_embeddings > original, so both
# regimes and the attention factor are exercised
MLA = {"architectures": ["MiniCPM3ForCausalLM"], "model_type": "minicpm3", "vocab_size": 300, "hidden_size": 64,
       "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
       "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
       "scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
       "max_position_embeddings": 128, "torch_dtype": "float32",
       "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.3, 2.0, 4.0], "long_factor": [1.0, 2.5, 6.0, 16.0],
                        "original_max_position_embeddings": 32}}


def reference(cfg: dict, state: dict):
    """transformers' MiniCPM3ForCausalLM with the same weights."""
    from transformers import MiniCPM3Config, MiniCPM3ForCausalLM

    r = cfg["rope_scaling"]
    rope = {"rope_type": "longrope", "rope_theta": cfg["rope_theta"], **{k: v for k, v in r.items() if k != "type"}}
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "scale_emb",
            "scale_depth", "dim_model_base", "rms_norm_eps", "max_position_embeddings")
    model = MiniCPM3ForCausalLM(MiniCPM3Config(**{k: cfg[k] for k in keys}, rope_parameters=rope,
                                               tie_word_embeddings=True)).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model


@pytest.fixture(scope="module")
def mla(tmp_path_factory):
    state = random_state(MLA, seed=1)
    return write_checkpoint(tmp_path_factory.mktemp("mla") / "m", MLA, state), state


@pytest.mark.parametrize("T", [20, 50], ids=["short-rope", "long-rope"])
def test_matches_transformers(mla, T):
    path, state = mla
    ours = load_model(Checkpoint(path))
    ref = reference(MLA, state)
    ids = torch.randint(0, MLA["vocab_size"], (2, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ours(ids)[0]
        b = ref(ids).logits
    assert a.abs().max() > 0.5
    assert (a - b).abs().max().item() <= 1e-4
    # the comparison can fail: the other LongRoPE list is visible
    other = {**MLA, "rope_scaling": {**MLA["rope_scaling"], "short_factor": MLA["rope_scaling"]["long_factor"],
                                     "long_factor": MLA["rope_scaling"]["short_factor"]}}
    with torch.no_grad():
        c = reference(other, state)(ids).logits
    assert (a - c).abs().max().item() > 1e-2


def test_latent_cache_matches_full_recompute(mla):
    model = load_model(Checkpoint(mla[0]))
    ids = torch.randint(0, 300, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, _ = model(ids)
    stepped, past = stepwise_logits(model, ids, 10)
    assert past[0][0].shape == (1, 30, MLA["kv_lora_rank"]) and past[0][1].shape == (1, 1, 30, 8)
    assert (stepped - full).abs().max().item() <= 1e-4


def test_config():
    c = parse_config(MLA)
    assert c.mla and c.variant.startswith("minicpm3 MLA") and c.head_dim == 24 and c.rope_dim == 8
    assert c.v_head_dim == 16 and c.embedding_scale == 12 and c.logit_scale == 4
    assert c.linear_shapes()["self_attn.kv_b_proj"] == (4 * (16 + 16), 32)
    assert c.norm_shapes()["self_attn.kv_a_layernorm"] == 32


@pytest.mark.parametrize("change, message", [
    ({"q_lora_rank": None}, "q_lora_rank null"),
    ({"kv_lora_rank": None}, "needs kv_lora_rank"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim 7 must be even"),
    ({"num_key_value_heads": 2}, "differs from num_attention_heads"),
    ({"rope_scaling": {**MLA["rope_scaling"], "short_factor": [1.0] * 8}}, "= 4 numbers, got 8"),
    ({"architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm"}, "belong to MiniCPM3ForCausalLM"),
])
def test_config_refusals(change, message):
    cfg = {k: v for k, v in {**MLA, **change}.items() if v is not None or k == "q_lora_rank"}
    with pytest.raises(UserError, match=re.escape(message)):
        parse_config(cfg)


# -- the pipeline on a small trained MLA model: the bundled model converted to MiniCPM3 and fine-tuned briefly ------
from minicpm_edge import evaluation as ev  # noqa: E402
from minicpm_edge.quant import QuantSpec  # noqa: E402
from minicpm_edge.quant.driver import MLA_GROUPS, QuantOptions, quantize_checkpoint  # noqa: E402

MAX_DRIFT = 0.01
TEXT = ("The committee met on Tuesday to review the budget for the new library.\n\n"
        "会议于周二召开，审议新图书馆的预算。大家一致同意增加儿童阅览区的经费。\n"
        "def area(r):\n    return 3.14159 * r * r\n")


def test_conversion_keeps_the_function(bundled):
    """to_mla holds the bundled GQA model exactly (up to the latent norms' eps): the MLA forward is not a guess."""
    from minicpm_edge import reference
    from minicpm_edge.model.forward import LatentAttention

    ckpt = Checkpoint(bundled)
    base = load_model(ckpt)
    model = reference.to_mla(base, ckpt.config.raw)
    assert isinstance(model.layers[0].self_attn, LatentAttention) and model.cfg.logit_scale == 1
    ids = torch.randint(0, 4096, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = base(ids)[0], model(ids)[0]
    assert (a - b).abs().max().item() < 1e-3 * a.abs().max().item()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from minicpm_edge import reference

    out = tmp_path_factory.mktemp("mla_trained") / "minicpm3-tiny"
    summary = reference.make_mla_model(out)
    assert summary["ppl_finetuned"] < 1.1 * summary["ppl_converted"]  # the fine-tune did no harm
    return out


@pytest.fixture(scope="module")
def quants(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("mla_quant")
    return {m: quantize_checkpoint(trained, root / m, QuantOptions(spec=QuantSpec(4, 32), method=m, nsamples=32,
                                                                   seqlen=128)) for m in ("gptq", "rtn")}


def module_errors(path) -> dict:
    """Summed relative output error per module type over the layers (quant_report.json)."""
    import json

    out = {}
    for layer in json.loads((path / "quant_report.json").read_text())["layers"]:
        for name, m in layer["modules"].items():
            out[name] = out.get(name, 0.0) + m["rel_error"]
    return out


def test_gptq_quantises_every_mla_linear_in_data_flow_order(quants):
    g, r = module_errors(quants["gptq"]), module_errors(quants["rtn"])
    order = [name for group in MLA_GROUPS for name in group]
    assert list(g) == order and set(r) == set(order)
    print("per-module error GPTQ / RTN (w4 g32, summed over 4 layers):",
          ", ".join(f"{k.split('.')[-1]} {g[k]:.4f}/{r[k]:.4f}" for k in order))
    assert sum(g.values()) < 0.8 * sum(r.values())
    ckpt = Checkpoint(quants["gptq"])
    assert ckpt.config.mla and ckpt.quant["spec"].bits == 4
    for i in range(ckpt.config.num_hidden_layers):  # GPTQ v1 layout, one record per Linear; the latent norms as they were
        for m in order:
            assert all(ckpt.has(f"model.layers.{i}.{m}.{s}") for s in ("qweight", "qzeros", "scales", "g_idx"))
        assert ckpt.dtype(f"model.layers.{i}.self_attn.kv_a_layernorm.weight") == "BF16"


def test_drift_gate_on_the_trained_mla_model(trained, quants):
    report = ev.evaluate(trained, quants["gptq"], ctx=256, max_chunks=20)
    rtn = ev.evaluate(trained, quants["rtn"], ctx=256, max_chunks=20)
    print(f"MLA drift GPTQ {report['drift']:+.4%} KL {report['kl_mean']:.5f}; RTN {rtn['drift']:+.4%} "
          f"KL {rtn['kl_mean']:.5f}")
    assert ev.gate(report, MAX_DRIFT) is None, report["drift"]
    assert report["kl_mean"] < rtn["kl_mean"]


def test_resume_is_bit_identical(trained, quants, tmp_path):
    from safetensors.torch import load_file

    opts = QuantOptions(spec=QuantSpec(4, 32), method="gptq", nsamples=32, seqlen=128)
    work = quantize_checkpoint(trained, tmp_path / "r", opts, stop_after=2)
    assert work.name == ".r.work" and not (tmp_path / "r").exists()
    quantize_checkpoint(trained, tmp_path / "r", opts, resume=True)
    a, b = (load_file(str(p / "model.safetensors")) for p in (quants["gptq"], tmp_path / "r"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def gguf_dir(quants, tmp_path_factory):
    from minicpm_edge.export.ios import export_ios

    return export_ios(quants["gptq"], tmp_path_factory.mktemp("mla_ios") / "ios")


def test_gguf_names_metadata_and_exact_codes(gguf_dir, quants):
    import gguf
    import numpy as np

    from minicpm_edge.export import gguf as G

    ckpt = Checkpoint(quants["gptq"])
    c = ckpt.config
    (path,) = gguf_dir.glob("*.gguf")
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    assert meta["general.architecture"] == "minicpm3"
    assert (meta["minicpm3.attention.q_lora_rank"], meta["minicpm3.attention.kv_lora_rank"]) == (256, 256)
    assert (meta["minicpm3.attention.key_length"], meta["minicpm3.attention.value_length"]) == (96, 32)
    assert meta["minicpm3.rope.dimension_count"] == 64 and "minicpm3.embedding_scale" not in meta
    tensors = {t.name: t for t in reader.tensors}
    expected = {f"blk.{i}.{n}.weight" for i in range(c.num_hidden_layers) for n in
                list(G.MLA_NAMES.values()) + list(G.MLA_NORMS.values())}
    expected |= {"token_embd.weight", "output_norm.weight", "rope_factors_long.weight", "rope_factors_short.weight"}
    assert set(tensors) == expected
    for i in range(c.num_hidden_layers):
        for m, name in G.MLA_NAMES.items():
            q = ckpt.quantized(f"model.layers.{i}.{m}")
            codes, d, _ = G.q4_codes(tensors[f"blk.{i}.{name}.weight"].data, q.shape[1], G.QT.Q4_0)
            assert np.array_equal(codes, q.codes.numpy())
            assert np.array_equal(d.view(np.uint16), q.scales.t().contiguous().numpy().view(np.uint16))


def test_llama_cpp_runs_the_gguf_like_our_forward(gguf_dir, quants, trained):
    import numpy as np

    from minicpm_edge.model import Tokenizer
    from minicpm_edge.runtimes import open_runner

    torch_run, cpp = open_runner(quants["gptq"]), open_runner(gguf_dir)
    assert cpp.name == "llama.cpp"
    ids = Tokenizer(quants["gptq"] / "tokenizer.model").encode(TEXT)
    a, b = torch_run.logits(ids), cpp.logits(ids)
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.95
    art = ev.evaluate(trained, gguf_dir, ctx=256, max_chunks=12)
    ref = ev.evaluate(trained, quants["gptq"], ctx=256, max_chunks=12)
    print(f"MLA drift through llama.cpp {art['drift']:+.4%} (torch {ref['drift']:+.4%}), KL {art['kl_mean']:.5f} "
          f"(torch {ref['kl_mean']:.5f}), top-1 {art['top1']:.4f}")
    assert art["quant"]["runtime"] == "llama.cpp"
    assert art["quant"]["ppl"] == pytest.approx(ref["quant"]["ppl"], rel=1e-2)


def test_onnx_runs_the_mla_graph_like_our_forward(quants, trained, tmp_path):
    import numpy as np

    from minicpm_edge.export.onnx import export_onnx
    from minicpm_edge.model import Tokenizer
    from minicpm_edge.runtimes import open_runner

    out = export_onnx(quants["gptq"], tmp_path / "onnx", accuracy_level=0)
    assert not (out / "genai_config.json").exists()
    torch_run, ort = open_runner(quants["gptq"]), open_runner(out)
    assert ort.name == "onnxruntime"
    ids = Tokenizer(quants["gptq"] / "tokenizer.model").encode(TEXT)
    a, b = torch_run.logits(ids), ort.logits(ids)
    assert np.abs(a - b).max() < 1e-3 * np.abs(a).max()
    assert ort.generate(ids, 12) == torch_run.generate(ids, 12)  # onnxruntime's latent cache, token by token
    # --embedding q8_0: the GatherBlockQuantized lookup and the 8-bit head feed the plain-op latent graph too
    from test_export_onnx import on_grid

    q8 = export_onnx(quants["gptq"], tmp_path / "onnx-q8", accuracy_level=0, embedding="q8_0")
    table = on_grid(quants["gptq"], tmp_path / "q8-table")
    want, got = open_runner(table).logits(ids), open_runner(q8).logits(ids)
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max() < np.abs(got - b).max()  # the rounding shows
    art = ev.evaluate(trained, out, ctx=256, max_chunks=12)
    ref = ev.evaluate(trained, quants["gptq"], ctx=256, max_chunks=12)
    print(f"MLA drift through onnxruntime {art['drift']:+.4%} (torch {ref['drift']:+.4%}), KL {art['kl_mean']:.5f}")
    assert art["quant"]["ppl"] == pytest.approx(ref["quant"]["ppl"], rel=1e-3)


def test_mlc_refuses_mla(quants, tmp_path):
    from minicpm_edge.export.mlc import export_mlc

    with pytest.raises(UserError, match="mlc-llm has no MiniCPM3 model"):
        export_mlc(quants["gptq"], tmp_path / "android")
    assert not (tmp_path / "android").exists()


def test_gguf_refuses_mup_constants_llama_cpp_ignores(tmp_path):
    from conftest import small_variant
    from minicpm_edge.export.ios import export_ios

    keys = {k: MLA[k] for k in ("architectures", "model_type", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                                "qk_rope_head_dim")}
    for change, message in (({"scale_emb": 10}, "scale_emb 10 (llama.cpp: 12)"),
                            ({"dim_model_base": 64}, "dim_model_base 64 (llama.cpp: 256)"),
                            ({"scale_depth": 1.0}, "scale_depth 1 (llama.cpp: 1.4)")):
        src = small_variant(tmp_path / str(change), **{**keys, "dim_model_base": 256, "rope_scaling": None, **change})
        with pytest.raises(UserError, match=re.escape(message)):
            export_ios(src, tmp_path / "ios", dtype="f32")
        assert not (tmp_path / "ios").exists()


def test_synthetic_minicpm3_4b_has_the_published_shapes(tmp_path):
    from minicpm_edge.inspect import summarize
    from minicpm_edge.model.synthetic import write_synthetic

    s = summarize(write_synthetic("minicpm3-4b", tmp_path / "m3", layers=1, vocab=4096))
    t = {k.removeprefix("model.layers.*."): v["shape"] for k, v in s["tensors"].items()}
    assert t["self_attn.q_a_proj.weight"] == [768, 2560] and t["self_attn.q_b_proj.weight"] == [40 * 96, 768]
    assert t["self_attn.kv_a_proj_with_mqa.weight"] == [256 + 32, 2560]
    assert t["self_attn.kv_b_proj.weight"] == [40 * (64 + 64), 256] and t["self_attn.o_proj.weight"] == [2560, 2560]
    assert t["self_attn.q_a_layernorm.weight"] == [768] and t["mlp.down_proj.weight"] == [2560, 6400]
    assert s["tied"] and s["muP"] == {"embedding_scale": 12, "residual_scale": 1.4, "logit_scale": 10.0}
    assert s["notes"]["rope_scaling"]["attention_factor"] == 1.0 and s["variant"] == "minicpm3 MLA silu"
