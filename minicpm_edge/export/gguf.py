"""GGUF for llama.cpp (arch `minicpm`; MiniCPM3 as arch `minicpm3`), written with the `gguf` package, one tensor at a time.

GPTQ codes go into Q4_0 (symmetric) or Q4_1 (asymmetric) blocks unchanged (FORMATS.md section 2):
Q4_0 value = (q - 8) * d with d = s; Q4_1 value = d * q + m with d = s, m = -s * z. A block holds 32 weights along K;
groups of 64, 128 or one per channel repeat their d (and m) over each of their blocks of 32, exactly. A block has:
fp16 d [, fp16 m], then 16 bytes where byte j has element j in the low nibble and element j + 16 in the high nibble.
A `--format q4_k_m / q3_k_m` checkpoint stores each Linear as GGML blocks already (quant/format.py GGMLLinear):
they are copied as they are, each with its type (Q4_K, Q5_K, Q6_K, Q3_K, or the Q4_0/Q5_0/Q5_1/Q8_0 fallbacks).
q_proj / k_proj rows are permuted llama-style (llama.cpp applies rope to adjacent pairs); a row permutation moves
whole rows of codes and the matching scale columns (or whole rows of blocks), so nothing is re-quantised.
The embedding (and an untied head) is f16 by default; q8_0 and q6_k (llama.cpp's choice for a tied table) quantise
it here, by round to nearest on our grid of that type.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch

from ..errors import UserError
from ..model import Checkpoint, all_finite, rope
from ..model.hub import model_name
from ..model.tokenizer import CHAT_TEMPLATE

QT = gguf.GGMLQuantizationType
NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}
NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
# MiniCPM3 (llama.cpp arch minicpm3, as its converter names them): kv_b_proj is one tensor (attn_kv_b), not split;
# llama.cpp's minicpm3 rope is NEOX (rotate-half, HF's order), so no row is permuted. Its latent norms use
# rms_norm_eps where transformers' use 1e-6: a difference of that eps in the latents' mean square, nothing else.
MLA_NAMES = {"self_attn.q_a_proj": "attn_q_a", "self_attn.q_b_proj": "attn_q_b",
             "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa", "self_attn.kv_b_proj": "attn_kv_b",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
MLA_NORMS = {**NORMS, "self_attn.q_a_layernorm": "attn_q_a_norm", "self_attn.kv_a_layernorm": "attn_kv_a_norm"}
# llama.cpp's minicpm3 graph (src/models/minicpm3.cpp) hard-codes these instead of reading the GGUF
MINICPM3_FIXED = {"scale_emb": 12.0, "scale_depth": 1.4, "dim_model_base": 256}
FILE_TYPES = {QT.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, QT.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
              QT.F16: gguf.LlamaFileType.MOSTLY_F16, QT.F32: gguf.LlamaFileType.ALL_F32,
              QT.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
              "q3_k_m": gguf.LlamaFileType.MOSTLY_Q3_K_M}
EMBEDDINGS = {"f16": QT.F16, "f32": QT.F32, "q8_0": QT.Q8_0, "q6_k": QT.Q6_K}


def permute_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """Index of the source row for each destination row: rows (n_head, 2, d/2) -> (n_head, d/2, 2)."""
    half = n_rows // n_head // 2
    return torch.arange(n_rows).view(n_head, 2, half).transpose(1, 2).reshape(-1)


def q4_blocks(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> np.ndarray:
    """codes uint8 [N, K], scales fp16 [K/32, N], zeros (true zero points, Q4_1 only) [K/32, N] -> bytes [N, K/32*B]."""
    n, k = codes.shape
    c = codes.to(torch.uint8).view(n, k // 32, 32)
    qs = (c[..., :16] | (c[..., 16:] << 4)).numpy()
    d = scales.t().contiguous().numpy().astype(np.float16).reshape(n, k // 32, 1)
    parts = [d.view(np.uint8)]
    if zeros is not None:
        m = (-scales.float() * zeros.float()).t().contiguous().numpy().astype(np.float16).reshape(n, k // 32, 1)
        parts.append(m.view(np.uint8))
    return np.concatenate(parts + [qs], axis=-1).reshape(n, -1)


def q4_codes(blocks: np.ndarray, k: int, qtype) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Inverse of q4_blocks: (codes [N, K], d [N, K/32], m [N, K/32] or None) from raw block bytes."""
    head = 2 if qtype == QT.Q4_0 else 4
    b = np.asarray(blocks, dtype=np.uint8).reshape(-1, k // 32, head + 16)
    d = b[..., :2].copy().view(np.float16)[..., 0]
    m = b[..., 2:4].copy().view(np.float16)[..., 0] if head == 4 else None
    qs = b[..., head:]
    codes = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(b.shape[0], k)
    return codes, d, m


def tokenizer_metadata(path: Path) -> dict:
    """The llama.cpp vocabulary of a tokenizer.model or tokenizer.json: model ("llama" / "gpt2"), pre-tokenizer, tokens,
    scores, types (and merges), special ids, and whether llama.cpp reproduces its normaliser."""
    if path.suffix == ".json":
        return json_vocab(path)
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception:
        raise UserError(f"{path}: not a SentencePiece model") from None
    if proto.trainer_spec.model_type not in (pb.TrainerSpec.BPE, pb.TrainerSpec.UNIGRAM) or not proto.pieces:
        raise UserError(f"{path}: only SentencePiece BPE/unigram tokenizers can be written to GGUF")
    kinds = {pb.ModelProto.SentencePiece.NORMAL: 1, pb.ModelProto.SentencePiece.UNKNOWN: 2,
             pb.ModelProto.SentencePiece.CONTROL: 3, pb.ModelProto.SentencePiece.USER_DEFINED: 4,
             pb.ModelProto.SentencePiece.UNUSED: 5, pb.ModelProto.SentencePiece.BYTE: 6}
    ns = proto.normalizer_spec
    faithful = ns.name == "identity" and not ns.remove_extra_whitespaces and not ns.precompiled_charsmap
    t = proto.trainer_spec
    return {"model": "llama", "pre": "default", "tokens": [p.piece for p in proto.pieces],
            "scores": [p.score for p in proto.pieces], "types": [kinds[p.type] for p in proto.pieces],
            "bos": t.bos_id, "eos": t.eos_id, "unk": t.unk_id, "pad": t.pad_id, "add_bos": True,
            "chat_template": CHAT_TEMPLATE, "normalizer": ns.name, "faithful": faithful}


def json_vocab(path: Path) -> dict:
    """tokenizer_metadata of a tokenizer.json (model/tokenizer.py `json_kind`).

    SentencePiece-derived -> "llama": llama.cpp's SPM tokenizer merges the adjacent pair whose joined text is the
    token of highest score, so each token scores minus the rank of the first merge that makes it (tokens no merge
    makes score below all of those); `<0xXX>` pieces are BYTE, added special tokens CONTROL, other added tokens
    USER_DEFINED. (gguf-py's LlamaHfVocab gives every token -1000, which ties every merge.)
    Byte-level BPE -> "gpt2" with the merges and the pre-tokenizer name llama.cpp knows (`llama_cpp_pre`).
    """
    from ..model.tokenizer import Tokenizer, dummy_prefix, llama_cpp_pre

    tok = Tokenizer(path)
    data, model = tok.json, tok.json["model"]
    vocab = dict(model.get("vocab") or {})
    added = {a["id"]: a for a in data.get("added_tokens") or []}
    for i, a in added.items():
        vocab[a["content"]] = i
    n = max(vocab.values()) + 1
    tokens = [None] * n
    for t, i in vocab.items():
        tokens[i] = t
    if None in tokens:
        raise UserError(f"{path}: token ids are not contiguous (id {tokens.index(None)} has no token)")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    types = [(3 if added[i].get("special") else 4) if i in added else 1 for i in range(n)]
    norm = data.get("normalizer")
    pad = tok.hf.token_to_id(_special(tok.config.get("pad_token")) or "")
    out = {"tokens": tokens, "types": types, "bos": tok.bos_id, "eos": tok.eos_id, "unk": tok.unk_id,
           "pad": -1 if pad is None else pad, "add_bos": tok.add_bos,
           "chat_template": tok.chat_template or CHAT_TEMPLATE, "normalizer": json.dumps(norm)[:80] if norm else "none"}
    if tok.kind == "bpe":
        out.update(model="gpt2", pre=llama_cpp_pre(data, str(path)), merges=merges, faithful=norm is None)
        return out
    rank = {}
    for r, m in enumerate(merges):
        rank.setdefault(m.replace(" ", "", 1), r)
    scores = [0.0 if i in added else -float(rank.get(t, len(merges) + i)) for i, t in enumerate(tokens)]
    for i, t in enumerate(tokens):
        if i not in added and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types[i] = 6
    if 0 <= tok.unk_id < n and tok.unk_id not in added:
        types[tok.unk_id] = 2
    steps = [x.get("type") for x in (norm.get("normalizers") or [norm])] if isinstance(norm, dict) else []
    out.update(model="llama", pre="default", scores=scores, add_space_prefix=dummy_prefix(data),
               faithful=set(steps) <= {"Prepend", "Replace"})
    return out


def _special(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def add_vocab(w: gguf.GGUFWriter, tok: dict) -> None:
    """The tokenizer.ggml.* keys and the chat template of a tokenizer_metadata dict."""
    w.add_tokenizer_model(tok["model"])
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    if "scores" in tok:
        w.add_token_scores(tok["scores"])
    w.add_token_types(tok["types"])
    if "merges" in tok:
        w.add_token_merges(tok["merges"])
    if "add_space_prefix" in tok:
        w.add_add_space_prefix(tok["add_space_prefix"])
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                     ("pad", w.add_pad_token_id)):
        if tok[key] is not None and tok[key] >= 0:
            add(tok[key])
    w.add_add_bos_token(tok["add_bos"])
    w.add_add_eos_token(False)
    w.add_chat_template(tok["chat_template"])


class Plan:
    """What goes into the file: (gguf name, numpy shape, byte count, GGML type, producer) per tensor, in order."""

    def __init__(self, ckpt: Checkpoint, linear_type, embedding_type):
        self.items = []
        c = ckpt.config
        self.add("token_embd.weight", ckpt.shape("model.embed_tokens.weight"), embedding_type,
                 lambda: ckpt.embedding(None))  # original dtype: converted once, below
        norms, names = (MLA_NORMS, MLA_NAMES) if c.mla else (NORMS, NAMES)
        for i in range(c.num_hidden_layers):
            for src, dst in norms.items():
                name = f"model.layers.{i}.{src}.weight"
                self.add(f"blk.{i}.{dst}.weight", (c.norm_shapes()[src],), QT.F32, lambda name=name: ckpt.tensor(name))
            for m in names:
                prefix = f"model.layers.{i}.{m}"
                heads = {"self_attn.q_proj": c.num_attention_heads, "self_attn.k_proj": c.num_key_value_heads}.get(m)
                qtype = QT[ckpt.quant["types"][prefix]] if isinstance(linear_type, str) else linear_type
                self.add(f"blk.{i}.{names[m]}.weight", ckpt.linear_shape(prefix), qtype,
                         lambda prefix=prefix, heads=heads, qtype=qtype: linear(ckpt, prefix, heads, qtype))
        self.add("output_norm.weight", (c.hidden_size,), QT.F32, lambda: ckpt.final_norm())
        for slot, factors in rope_factors(c).items():
            self.add(f"rope_factors_{slot}.weight", (c.rope_dim // 2,), QT.F32, lambda f=factors: f)
        if not c.tie_word_embeddings:
            self.add("output.weight", ckpt.shape("lm_head.weight"), embedding_type, lambda: ckpt.lm_head(None))

    def add(self, name, shape, qtype, produce):
        rows, cols = (1, shape[0]) if len(shape) == 1 else shape
        block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        if cols % block:
            raise UserError(f"{name}: {cols} columns are not a multiple of {qtype.name}'s block of {block}")
        self.items.append((name, tuple(shape), rows * cols // block * nbytes, qtype, produce))


def linear(ckpt: Checkpoint, prefix: str, heads: int | None, qtype) -> np.ndarray | torch.Tensor:
    """One Linear as GGUF data: Q4 blocks from the GPTQ codes, the stored GGML blocks, or a float weight; rows
    permuted for q/k."""
    if ckpt.quant and ckpt.quant["kind"] == "ggml":
        blocks = ckpt.quantized(prefix).blocks
        return (blocks[permute_rows(blocks.shape[0], heads)] if heads else blocks).numpy()
    if qtype in (QT.Q4_0, QT.Q4_1):
        q = ckpt.quantized(prefix)
        codes = q.codes
        scales, zeros = q.per_block(32)  # group 64 / 128 / -1: each group's d (and m) repeated over its blocks
        if heads:
            perm = permute_rows(codes.shape[0], heads)
            codes, scales, zeros = codes[perm], scales[:, perm], zeros[:, perm]
        return q4_blocks(codes, scales, zeros if qtype == QT.Q4_1 else None)
    w = ckpt.tensor(prefix + ".weight")
    return w[permute_rows(w.shape[0], heads)] if heads else w


def embedding_blocks(table: torch.Tensor, qtype) -> np.ndarray:
    """The embedding (or head) table rounded to nearest on our Q8_0 / Q6_K grid (quant/kquant.py, every column
    weighted alike; lower error than llama.cpp's own quantiser of the type, tests/test_kquant.py), as GGML blocks."""
    from ..quant.kquant import pack, round_table

    return np.concatenate([pack(grid, codes) for grid, codes in round_table(table, qtype.name)])


def rope_factors(c) -> dict:
    """llama.cpp's per-frequency divisors, {"short": f32 [head_dim/2], "long": ...}, or {} for plain rotary.

    llama.cpp (get_rope_factors) takes the long list when its context n_ctx exceeds
    rope.scaling.original_context_length, the short one otherwise: by context size, not sequence length. For
    MiniCPMForCausalLM the list is fixed by the config up to max_position_embeddings (OpenBMB's rule, docs/ROPE.md),
    so both slots hold that list and the file is exact up to context_length at any n_ctx. For LlamaForCausalLM
    (transformers' rule: long past original) the slots hold short and long, as llama.cpp's converter writes them.
    Linear / llama3 divisors are the same in both slots. Dynamic NTK is plain rotary up to context_length: none."""
    r = c.rope_scaling
    if r is None or r.kind == "dynamic":
        return {}
    if r.kind == "longrope" and r.selection == "transformers":
        orig = r.original_max_position_embeddings
        return {"long": rope.frequency_factors(c, orig + 1), "short": rope.frequency_factors(c, orig)}
    fixed = rope.frequency_factors(c, c.max_position_embeddings)
    return {"long": fixed, "short": fixed}


def check_exportable(ckpt: Checkpoint) -> object:
    """The GGML type for the checkpoint's Linears (the mix's name, e.g. "q4_k_m", for a GGML-block checkpoint, whose
    types are per tensor), or a UserError saying why llama.cpp cannot hold them exactly."""
    c = ckpt.config
    if c.hidden_act != "silu":
        raise UserError(f"{ckpt.dir}: hidden_act {c.hidden_act!r} (MiniCPM-S) is not supported by llama.cpp's minicpm "
                        "graph, which hard-codes SiLU; export --target onnx runs this model")
    if c.mla:
        check_minicpm3_constants(ckpt)
    q = ckpt.quant
    if q is None:
        return None
    if q["kind"] == "ggml":
        return q["format"]
    spec = q["spec"]
    how = "re-quantise with `minicpm-edge quantize --bits 4 --group-size 32`"
    if spec.bits != 4:
        raise UserError(f"{ckpt.dir}: GPTQ {spec.bits}-bit has no exact GGUF form (Q4_0/Q4_1 hold 4-bit codes); {how}")
    widths = {f"{m} input": k for m, (_, k) in c.linear_shapes().items()} if c.mla else {
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size}
    for name, k in widths.items():
        if spec.group_len(k) % 32:
            raise UserError(f"{ckpt.dir}: {name} {k} with group size {spec.group_size} is no whole number of "
                            f"llama.cpp's blocks of 32 per group; {how}")
    for m in c.linear_shapes():
        if not ckpt.quantized(f"model.layers.0.{m}").contiguous:
            raise UserError(f"{ckpt.dir}: act-order groups are not contiguous along the input, which GGUF blocks "
                            f"cannot express; {how}")
    return QT.Q4_0 if spec.sym else QT.Q4_1


def check_minicpm3_constants(ckpt: Checkpoint) -> None:
    """llama.cpp's minicpm3 graph ignores the GGUF's muP keys and uses scale_emb 12, scale_depth 1.4 and
    dim_model_base 256: a checkpoint with other values would run wrongly there, so it is refused."""
    c = ckpt.config
    got = {"scale_emb": c.embedding_scale, "scale_depth": c.residual_scale * c.num_hidden_layers ** 0.5,
           "dim_model_base": c.hidden_size / c.logit_scale}
    bad = [k for k, v in MINICPM3_FIXED.items() if abs(got[k] - v) > 1e-6 * v]
    if bad:
        what = ", ".join(f"{k} {got[k]:g} (llama.cpp: {MINICPM3_FIXED[k]:g})" for k in bad)
        raise UserError(f"{ckpt.dir}: {what}; llama.cpp's minicpm3 graph hard-codes scale_emb 12, scale_depth 1.4 and "
                        "dim_model_base 256 and would run this model wrongly; export --target onnx runs it")


def write_gguf(ckpt: Checkpoint, path: Path, dtype: str = "f16", embedding: str = "f16", name: str | None = None) -> dict:
    """Write the checkpoint to `path`; returns a summary (type, tensor count, tokenizer notes)."""
    c = ckpt.config
    linear_type = check_exportable(ckpt)
    if linear_type is None:
        if dtype not in ("f16", "f32"):
            raise UserError(f"--dtype {dtype}: an unquantised checkpoint is written as f16 or f32")
        linear_type = QT.F16 if dtype == "f16" else QT.F32
    if embedding not in EMBEDDINGS:
        raise UserError(f"--embedding {embedding}: choose {', '.join(EMBEDDINGS)}")
    if ckpt.tokenizer_path is None:
        raise UserError(f"{ckpt.dir}: no tokenizer.model or tokenizer.json; GGUF files carry their tokenizer")
    tok = tokenizer_metadata(ckpt.tokenizer_path)
    if len(tok["tokens"]) != c.vocab_size:
        raise UserError(f"{ckpt.tokenizer_path}: {len(tok['tokens'])} pieces but vocab_size is {c.vocab_size}; "
                        "llama.cpp needs one token per embedding row")
    plan = Plan(ckpt, linear_type, EMBEDDINGS[embedding])

    w = gguf.GGUFWriter(path, "minicpm3" if c.mla else "minicpm")
    w.add_name(name or model_name(ckpt.dir))
    w.add_file_type(FILE_TYPES[linear_type])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(c.exact_context)  # exact up to here (dynamic NTK: plain rotary up to max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.rope_dim)
    if c.mla:  # as llama.cpp's converter writes them, and value_length too (the default hidden/heads may differ)
        w.add_q_lora_rank(c.q_lora_rank)
        w.add_kv_lora_rank(c.kv_lora_rank)
        w.add_key_length(c.head_dim)
        w.add_value_length(c.v_head_dim)
    elif c.head_dim * c.num_attention_heads != c.hidden_size:
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    if rope_factors(c):
        r = c.rope_scaling
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)  # cos/sin times attn_factor, frequencies / factors
        w.add_rope_scaling_orig_ctx_len(r.original_max_position_embeddings or c.max_position_embeddings)
        w.add_rope_scaling_attn_factors(rope.attention_factor(c))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if not c.mla:  # minicpm3 reads none of them (its graph's constants, checked above)
        # all three, always: llama.cpp's defaults for missing scales are not MiniCPM's values
        w.add_embedding_scale(c.embedding_scale)
        w.add_residual_scale(c.residual_scale)
        w.add_logit_scale(c.logit_scale)
    add_vocab(w, tok)
    for gname, shape, nbytes, qtype, _ in plan.items:
        raw_shape = (shape[0], nbytes // shape[0]) if qtype not in (QT.F16, QT.F32) and len(shape) == 2 else shape
        np_dtype = {QT.F16: np.float16, QT.F32: np.float32}.get(qtype, np.uint8)
        w.add_tensor_info(gname, raw_shape, np.dtype(np_dtype), nbytes, raw_dtype=qtype)
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for gname, shape, nbytes, qtype, produce in plan.items:
        data = produce()
        if isinstance(data, torch.Tensor) and qtype == QT.F16:  # bf16 -> f16 directly: no float32 copy of a table
            data = data.to(torch.float16)
            if not all_finite(data):
                raise UserError(f"{gname}: values beyond float16's range (65504); export with --embedding f32 or "
                                "q8_0, or --dtype f32")
            data = data.numpy()
        elif isinstance(data, torch.Tensor):
            data = embedding_blocks(data, qtype) if qtype in (QT.Q8_0, QT.Q6_K) else data.float().numpy()
        if data.nbytes != nbytes:
            raise AssertionError(f"{gname}: {data.nbytes} bytes produced, {nbytes} planned")
        w.write_tensor_data(np.ascontiguousarray(data))
    w.close()
    kind = linear_type.upper() if isinstance(linear_type, str) else linear_type.name
    return {"file": path.name, "type": kind, "embedding": EMBEDDINGS[embedding].name,
            "tensors": len(plan.items), "tokenizer": f"{tok['model']} ({tok['pre']})",
            "tokenizer_normalizer": tok["normalizer"],
            "tokenizer_faithful_in_llama_cpp": tok["faithful"], "model": c.notes()}
