"""ONNX export for onnxruntime and onnxruntime-genai: the GPTQ Linears as `com.microsoft.MatMulNBits` nodes.

MatMulNBits (FORMATS.md section 4): B uint8 [N, k_blocks, block_size*bits/8] packed along K (first code in the low
bits), scales float [N, k_blocks], zero_points packed like B [N, ceil(k_blocks*bits/8)] and absent when every zero is
2^(bits-1), the symmetric GPTQ zero. Contiguous GPTQ groups map onto blocks with the codes unchanged; a per-channel
grid (group -1) becomes 128-wide blocks that repeat the row's scale and zero. The CPU kernel takes 2, 4 and 8 bits.

The graph is model/forward.py in ONNX ops (opset 17, float32 activations) with onnxruntime's fused decode ops, as
onnxruntime-genai's model builder makes them: Gather, then per layer q|k|v as one MatMulNBits (the three
Linears' rows stacked, codes unchanged), com.microsoft.GroupQueryAttention (causal GQA, rotate-half rotary from cos/sin
tables of the checkpoint's fixed frequencies times LongRoPE's attention factor, BNSH key/value caches that it appends
to or, in genai with past_present_share_buffer, fills in place; positions come from attention_mask, so no
position_ids and batches are right-padded), o_proj, gate|up as one MatMulNBits, SiLU/ReLU/FATReLU, down_proj, and
each residual add fused with the next RMSNorm (com.microsoft.SkipSimplifiedLayerNormalization). muP's residual
multiplier is folded into the float32 scales of o_proj and down_proj, 1/logit_scale into the final norm's weight, and
scale_emb into the units of the residual stream (branch scales / scale_emb, norm epsilons / scale_emb^2).
MiniCPM3 (latent attention) keeps plain ops: its cache is the normed latent and the rotated shared key, which
GroupQueryAttention cannot hold (no genai_config.json then). The head is a Gemm(transB) on the embedding (stored once)
or lm_head; both tables are stored float16 when the checkpoint holds them in 16 bits and cast to float32 in the graph
(for the head in slices that onnxruntime folds at session load: the MiniCPM-2B export is 1.97 GiB instead of 2.50),
or, with --embedding q8_0 / q4_0, stored once on our Q8_0 / Q4_0 grid (the values the GGUF's token_embd holds): the
head an 8- / 4-bit MatMulNBits, the lookup a com.microsoft.GatherBlockQuantized of the same initialisers (onnxruntime
>= 1.23), as onnxruntime-genai's builder shares a tied table.
Inputs and outputs carry onnxruntime-genai's decoder names. Weights are streamed into model.onnx.data as they are
read, one tensor at a time, so memory stays at one decoder layer plus the embedding.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper, save_model

from ..artifact import staging
from ..errors import UserError
from ..model import Checkpoint
from ..model import rope as rotary
from ..model.config import ModelConfig
from ..model.forward import LatentAttention
from ..model.tokenizer import CHAT_TEMPLATE, Tokenizer, hf_tokenizer
from ..quant.driver import TOKENIZER_FILES
from ..quant.format import QuantizedLinear, require_gptq

OPSET = 17
NBITS = (2, 4, 8)  # what onnxruntime's MatMulNBits CPU kernel runs (4 everywhere; 2 and 8 in recent releases)
PER_CHANNEL_BLOCK = 128
DATA = "model.onnx.data"
NEG = float(np.finfo(np.float32).min)
FOLD_BYTES = 1 << 29  # float32 head slices of at most 512 MiB: onnxruntime constant-folds outputs up to 1 GiB


def export_onnx(checkpoint: Path, out: Path, *, force: bool = False, accuracy_level: int = 4,
                embedding: str = "f16") -> Path:
    """Write `out/`: model.onnx (+ model.onnx.data), genai_config.json, tokenizer files, export.json. Returns `out`.

    accuracy_level is MatMulNBits' attribute: 0 computes in float32, 4 lets the kernel quantise activations to int8
    per block (faster on phones, about 1e-2 relative error on a matmul). embedding: "f16" keeps the table as the
    checkpoint has it and computes the head from it in float32; "q8_0" stores the embedding (and an untied lm_head)
    rounded to our Q8_0 grid (the values `--target ios --embedding q8_0` stores) and computes the head as an 8-bit
    MatMulNBits of it, a quarter of the bytes per token, the lookup reading the same codes; "q4_0" does the same on
    our Q4_0 grid (an eighth: what onnxruntime-genai's builder does to every table, at a cost in quality).
    """
    if accuracy_level not in range(5):
        raise UserError(f"--accuracy-level {accuracy_level}: choose 0 (fp32), 1 (fp32), 2 (fp16), 3 (bf16) or 4 (int8)")
    if embedding not in HEADS:
        raise UserError(f"--embedding {embedding}: the onnx target takes {' or '.join(HEADS)}")
    with Checkpoint(checkpoint) as ckpt:
        cfg, quant = ckpt.config, ckpt.quant
        if quant is None:
            raise UserError(f"{checkpoint}: not a GPTQ checkpoint; quantise it first (minicpm-edge quantize --out DIR)")
        require_gptq(quant, checkpoint, "ONNX MatMulNBits (one scale and zero point per block)")
        spec = quant["spec"]
        if spec.bits not in NBITS:
            raise UserError(f"{checkpoint}: {spec.bits}-bit weights have no MatMulNBits kernel; quantise with "
                            f"--bits 4 (ONNX takes {', '.join(map(str, NBITS))})")
        if ckpt.tokenizer_path is None:
            raise UserError(f"{checkpoint}: no tokenizer.model or tokenizer.json; copy the model's tokenizer files "
                            "into the checkpoint")
        with staging(Path(out), force, "onnx") as tmp:
            with open(tmp / DATA, "wb") as data:
                g = _Graph(data)
                zero_points = _build(g, ckpt, cfg, accuracy_level, embedding)
            model = helper.make_model(g.graph(cfg), producer_name="minicpm-edge", opset_imports=[
                helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)])
            model.ir_version = 8  # readable by onnxruntime >= 1.11
            save_model(model, str(tmp / "model.onnx"))
            for name in TOKENIZER_FILES:
                if (ckpt.dir / name).is_file():
                    shutil.copy(ckpt.dir / name, tmp / name)
            _genai_tokenizer(tmp, ckpt.tokenizer_path)
            if not cfg.mla:  # genai's decoder has one head_size and kv-head count for keys and values: no MLA cache
                (tmp / "genai_config.json").write_text(json.dumps(genai_config(cfg), indent=1) + "\n")
            info = {"format": "onnx", "source": str(Path(checkpoint).resolve()), "variant": cfg.variant,
                    "quantization": {"bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym,
                                     "block_size": spec.group_size if spec.group_size != -1 else PER_CHANNEL_BLOCK,
                                     "zero_points": zero_points, "accuracy_level": accuracy_level},
                    "head": HEADS[embedding],
                    **({"requires": "onnxruntime >= 1.23 (GatherBlockQuantized of uint8 codes)"}
                       if embedding != "f16" else {}),
                    "opset": OPSET, "activations": "float32", "weights": DATA, "model": cfg.notes()}
            if cfg.mla:
                info["cache"] = ("MLA: past_key_values.N.key = normed latent [B, 1, S, kv_lora_rank], .value = rotated "
                                 "k_rope [B, 1, S, qk_rope_head_dim]; onnxruntime-genai (one head_size for keys and "
                                 "values) cannot drive it, onnxruntime can")
            (tmp / "export.json").write_text(json.dumps(info, indent=1) + "\n")
    return Path(out)


def matmulnbits(q: QuantizedLinear, name: str = "linear") -> dict:
    """The MatMulNBits tensors and attributes of a QuantizedLinear (codes [N, K], scales/zeros [groups, N])."""
    if not q.contiguous:
        raise UserError(f"{name}: act-order groups are not contiguous along K and MatMulNBits cannot permute inputs; "
                        "re-quantise with `minicpm-edge quantize` (its act-order keeps groups contiguous) or with "
                        "static groups")
    n, k = q.shape
    block = q.group_size if q.group_size != -1 else PER_CHANNEL_BLOCK
    if block < 16 or block & (block - 1):
        raise UserError(f"{name}: group size {block} is not a power of two >= 16, which MatMulNBits needs")
    kb = -(-k // block)
    scales, zeros = q.scales.float().numpy().T, q.zeros.numpy().T  # [N, groups]
    if q.group_size == -1:
        scales, zeros = np.repeat(scales, kb, 1), np.repeat(zeros, kb, 1)
    codes = np.zeros((n, kb * block), np.uint8)
    codes[:, :k] = q.codes.numpy()
    t = {"B": _pack(codes.reshape(n, kb, block), q.bits), "scales": np.ascontiguousarray(scales, np.float32),
         "K": k, "N": n, "bits": q.bits, "block_size": block}
    if (zeros != 1 << (q.bits - 1)).any():
        per = 8 // q.bits
        z = np.zeros((n, -(-kb // per) * per), np.uint8)
        z[:, :kb] = zeros
        t["zero_points"] = _pack(z, q.bits)
    return t


# Linears that read the same input are one MatMulNBits in the graph, their rows stacked in this order (the GPTQ
# codes, scales and zero points of each unchanged): fewer, larger matmuls per token, as onnxruntime-genai's builder does
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def fused_name(first: str) -> str:
    """model.layers.3.self_attn.q_proj -> model.layers.3.self_attn.qkv_proj (the first Linear of a FUSED group)."""
    return next(first[:-len(parts[0])] + name for name, parts in FUSED.items() if first.endswith("." + parts[0]))


def stack(parts: list[dict]) -> dict:
    """matmulnbits() tensors of Linears with the same K, bits and block size as one, rows in order. A part without
    zero points gets the symmetric zero 2^(bits-1) written out when another part has them."""
    first = parts[0]
    if any((t["K"], t["bits"], t["block_size"]) != (first["K"], first["bits"], first["block_size"]) for t in parts):
        raise UserError("Linears of one input quantised with different bits or group sizes cannot share a "
                        "MatMulNBits; re-quantise with one grid")
    t = {**first, "N": sum(p["N"] for p in parts), "B": np.concatenate([p["B"] for p in parts]),
         "scales": np.concatenate([p["scales"] for p in parts])}
    t.pop("zero_points", None)
    if any("zero_points" in p for p in parts):
        bits, kb = first["bits"], first["scales"].shape[1]
        per = 8 // bits
        sym = _pack(np.full((1, -(-kb // per) * per), 1 << (bits - 1), np.uint8), bits)
        t["zero_points"] = np.concatenate([p.get("zero_points", np.repeat(sym, p["N"], 0)) for p in parts])
    return t


HEADS = {"f16": "float32 Gemm on the table as stored",
         "q8_0": "8-bit MatMulNBits, Q8_0 grid (block 32); the lookup a GatherBlockQuantized of the table on that grid",
         "q4_0": "4-bit MatMulNBits, Q4_0 grid (block 32); the lookup a GatherBlockQuantized of the table on that grid"}


def quantized_head(table, kind: str = "q8_0") -> dict:
    """matmulnbits() tensors of a float table [V, hidden] rounded to nearest on our Q8_0 or Q4_0 grid (fp16 d per
    block of 32, codes -2^(b-1)..2^(b-1)-1 stored as code + 2^(b-1), MatMulNBits' default zero), 4096 rows at a time."""
    from ..quant.kquant import round_table

    v, k = table.shape
    if k % 32:
        raise UserError(f"--embedding {kind}: hidden size {k} is not a multiple of 32 (its blocks); use f16")
    bits = 8 if kind == "q8_0" else 4
    B, scales = [], []
    for grid, q in round_table(table, kind.upper()):  # the values `--target ios --embedding q8_0` stores
        codes = (q + (1 << (bits - 1))).to(torch.uint8).numpy()
        B.append(_pack(codes.reshape(len(codes), k // 32, 32), bits))
        scales.append(grid.d.numpy().astype(np.float32))
    return {"B": np.concatenate(B), "scales": np.concatenate(scales), "K": k, "N": v, "bits": bits, "block_size": 32}


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [..., L] -> [..., L*bits/8], consecutive codes from the lowest bits of each byte up."""
    per = 8 // bits
    v = values.reshape(*values.shape[:-1], -1, per)
    return np.bitwise_or.reduce(v << (np.arange(per, dtype=np.uint8) * bits), axis=-1).astype(np.uint8)


def _table(ckpt: Checkpoint, name: str) -> np.ndarray:
    """An embedding or head table as stored in the export: float16 when the checkpoint holds it in 16 bits (float16,
    or bfloat16 whose values float16 keeps exactly in its normal range), else float32 as read."""
    array = ckpt.tensor(name).numpy()
    if ckpt.dtype(name).lower() in ("f16", "bf16", "float16", "bfloat16") and np.abs(array).max(initial=0) < 65504:
        return array.astype(np.float16)
    return array


def _genai_tokenizer(folder: Path, tok_path: Path) -> None:
    """What onnxruntime-genai's tokenizer reads: tokenizer.json (the checkpoint's own, or made from the SentencePiece
    model when it has none) and a tokenizer_config.json whose chat_template is a string (genai refuses null)."""
    tok = Tokenizer(tok_path)
    if not (folder / "tokenizer.json").is_file():
        hf_tokenizer(tok_path).save(str(folder / "tokenizer.json"))
    path = folder / "tokenizer_config.json"
    try:
        config = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise UserError(f"{tok_path.parent / path.name}: not valid JSON ({e})") from None
    config.setdefault("tokenizer_class", "GPT2Tokenizer" if tok.kind == "bpe" else "LlamaTokenizer")
    config.update({k: config.get(k) or v for k, v in (("bos_token", tok.piece(tok.bos_id)),
                                                      ("eos_token", tok.piece(tok.eos_id)),
                                                      ("unk_token", tok.piece(tok.unk_id))) if v is not None})
    config.setdefault("add_bos_token", tok.add_bos)
    if not isinstance(config.get("chat_template"), str):
        config["chat_template"] = ("{{ bos_token }}" if tok.add_bos else "") + CHAT_TEMPLATE
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def genai_config(cfg: ModelConfig) -> dict:
    """onnxruntime-genai's genai_config.json for this decoder. past and present share one buffer of max_length
    that GroupQueryAttention fills in place (no copy of the cache per token), as the builder's GQA models do."""
    io = {"inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                     "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
          "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                      "present_value_names": "present.%d.value"}}
    decoder = {"session_options": {"log_id": "onnxruntime-genai", "provider_options": []}, "filename": "model.onnx",
               "head_size": cfg.head_dim, "hidden_size": cfg.hidden_size,
               "num_attention_heads": cfg.num_attention_heads, "num_hidden_layers": cfg.num_hidden_layers,
               "num_key_value_heads": cfg.num_key_value_heads, **io}
    search = {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": cfg.exact_context,
              "min_length": 0, "past_present_share_buffer": True, "repetition_penalty": 1.0, "temperature": 1.0,
              "top_k": 1, "top_p": 1.0, "length_penalty": 1.0, "early_stopping": True, "no_repeat_ngram_size": 0,
              "diversity_penalty": 0.0}
    return {"model": {"type": "llama", "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
                      "pad_token_id": cfg.eos_token_id, "context_length": cfg.exact_context,
                      "vocab_size": cfg.vocab_size, "decoder": decoder}, "search": search}


class _Graph:
    """Nodes and initialisers; weights go straight to the external data file, the graph keeps only offsets."""

    def __init__(self, data):
        self.data, self.nodes, self.inits, self.consts = data, [], [], {}

    def weight(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array, array.dtype.newbyteorder("<"))  # ONNX raw data is little-endian
        align = 65536 if array.nbytes > 1 << 20 else 64  # large tensors on mmap-friendly offsets
        offset = -(-self.data.tell() // align) * align
        self.data.write(b"\0" * (offset - self.data.tell()))
        self.data.write(memoryview(array).cast("B"))
        t = TensorProto(name=name, dims=array.shape, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                        data_location=TensorProto.EXTERNAL)
        for key, value in (("location", DATA), ("offset", offset), ("length", array.nbytes)):
            t.external_data.add(key=key, value=str(value))
        self.inits.append(t)
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A small constant held in the graph itself (shapes, axes, scalars), shared by value."""
        array = np.asarray(value, dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self.consts:
            self.consts[key] = f"const_{len(self.consts)}"
            self.inits.append(numpy_helper.from_array(array, self.consts[key]))
        return self.consts[key]

    def op(self, op_type: str, *inputs: str, outputs: int | list[str] = 1, name: str | None = None,
           domain: str | None = None, **attrs):
        name = name or f"{op_type}_{len(self.nodes)}"
        outs = outputs if isinstance(outputs, list) else [f"{name}/out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def graph(self, cfg: ModelConfig):
        kv, d, v = cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size
        # MLA (MiniCPM3) caches what its attention keeps: key = the normed latent, value = the rotated shared k_rope
        widths = {"key": cfg.kv_lora_rank, "value": cfg.qk_rope_head_dim} if cfg.mla else {"key": d, "value": d}
        kv = 1 if cfg.mla else kv
        ins = [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch_size", length]) for name, length in
               (("input_ids", "sequence_length"), ("attention_mask", "total_sequence_length"),
                *([("position_ids", "sequence_length")] if cfg.mla else []))]  # GroupQueryAttention needs none
        outs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", v])]
        for i in range(cfg.num_hidden_layers):
            for kind, w in widths.items():
                ins.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT,
                                                         ["batch_size", kv, "past_sequence_length", w]))
                outs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT,
                                                          ["batch_size", kv, "total_sequence_length", w]))
        return helper.make_graph(self.nodes, "minicpm", ins, outs, self.inits)


def _build(g: _Graph, ckpt: Checkpoint, cfg: ModelConfig, accuracy_level: int, embedding: str = "f16") -> bool:
    """Add the whole decoder to g, reading one tensor at a time. Returns whether any MatMulNBits has zero points."""
    d, heads = cfg.head_dim, cfg.num_attention_heads
    zero_points = False

    def linear(x, prefix, *more, factor=1.0):
        """One MatMulNBits; with `more` Linears of the same input, one over their rows stacked (q|k|v, gate|up).
        `factor` multiplies the output, folded into the float32 scales (the codes stay the GPTQ codes)."""
        nonlocal zero_points
        parts = [matmulnbits(ckpt.quantized(n), n) for n in (prefix, *more)]
        t = stack(parts) if more else parts[0]
        if factor != 1:
            t["scales"] = (t["scales"].astype(np.float64) * factor).astype(np.float32)
        name = fused_name(prefix) if more else prefix
        ins = [x, g.weight(name + ".qweight", t["B"]), g.weight(name + ".scales", t["scales"])]
        if "zero_points" in t:
            ins.append(g.weight(name + ".qzeros", t["zero_points"]))
            zero_points = True
        return g.op("MatMulNBits", *ins, name=name, domain="com.microsoft", K=t["K"], N=t["N"], bits=t["bits"],
                    block_size=t["block_size"], accuracy_level=accuracy_level)

    def norm(x, name, eps=cfg.rms_norm_eps):
        w = g.weight(name, ckpt.tensor(name).numpy())
        ms = g.op("ReduceMean", g.op("Pow", x, g.const(2.0, np.float32)), axes=[-1], keepdims=1)
        rms = g.op("Sqrt", g.op("Add", ms, g.const(eps, np.float32)))
        return g.op("Mul", g.op("Div", x, rms), w)  # the pattern onnxruntime fuses into SimplifiedLayerNormalization

    def scaled(x, factor, op="Mul"):
        return x if factor == 1 else g.op(op, x, g.const(factor, np.float32))

    def heads_first(x, n, size=d):  # [B, T, n*size] -> [B, n, T, size]
        return g.op("Transpose", g.op("Reshape", x, g.const([0, 0, n, size])), perm=[0, 2, 1, 3])

    def rope(x):  # HF rotate-half: x*cos + cat(-x2, x1)*sin, over the rotated part (rope_dim) of a head
        r = cfg.rope_dim
        x1, x2 = g.op("Split", x, g.const([r // 2, r // 2]), axis=-1, outputs=2)
        rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
        return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))

    # the table is stored float16 where the checkpoint has 16 bits (half the file): the Gather reads it as stored and
    # casts the rows it picked; the head casts it to float32 in slices that onnxruntime folds into float32 initialisers
    # at load (it folds no output over 1 GiB), so the tied head is the same table and as fast as one stored in float32
    # with --embedding q8_0 / q4_0 the table is stored once on that grid, as the GGUF's token_embd: the lookup is a
    # GatherBlockQuantized of MatMulNBits' codes [V, blocks, 32*bits/8] as stored (read by rows from the mapped file;
    # a Reshape of them would be a copy at load) with the scales as [V, blocks, 1] (its rank rule: a copy of the
    # scales, 35 MB on MiniCPM-2B at 4 bits) and, tied, the head a MatMulNBits of the same initialisers
    if embedding == "f16":
        embed = _table(ckpt, "model.embed_tokens.weight")
        half = embed.dtype == np.float16
        embed = g.weight("model.embed_tokens.weight", embed)
        h = g.op("Gather", embed, "input_ids", axis=0)
        h = g.op("Cast", h, to=TensorProto.FLOAT) if half else h  # the GQA decoder folds scale_emb into what follows
    else:
        table = quantized_head(ckpt.tensor("model.embed_tokens.weight"), embedding)
        table["B"] = g.weight("model.embed_tokens.qweight", table["B"])
        table["scales"] = g.weight("model.embed_tokens.scales", table["scales"])
        scales = g.op("Reshape", table["scales"], g.const([table["N"], -1, 1]))
        rows = g.op("GatherBlockQuantized", table["B"], "input_ids", scales, domain="com.microsoft",
                    bits=table["bits"], block_size=table["block_size"], gather_axis=0, quantize_axis=2)
        h = g.op("Reshape", rows, g.const([0, 0, table["K"]]))  # [B, T, blocks, 32] -> [B, T, hidden]

    def head(x, table, half):  # x [rows, hidden] @ table[V, hidden]^T; a float16 table by float32 slices <= FOLD_BYTES
        if not half:
            return g.op("Gemm", x, table, transB=1)
        step, v = max(1, FOLD_BYTES // (4 * cfg.hidden_size)), cfg.vocab_size
        parts = []
        for start in range(0, v, step):
            w = table if step >= v else g.op("Slice", table, g.const([start]), g.const([min(start + step, v)]),
                                              g.const([0]))
            parts.append(g.op("Gemm", x, g.op("Cast", w, to=TensorProto.FLOAT), transB=1))
        return parts[0] if len(parts) == 1 else g.op("Concat", *parts, axis=-1)

    def latent_attention(x, p, i):
        """MiniCPM3's MLA (forward.LatentAttention): scores = q_nope.k_nope + q_rope.k_rope, k_rope broadcast over
        the heads; the cache holds the normed latent and the rotated k_rope."""
        nope, r, vd, eps = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, LatentAttention.LATENT_EPS
        q = linear(norm(linear(x, p + "self_attn.q_a_proj"), p + "self_attn.q_a_layernorm.weight", eps),
                   p + "self_attn.q_b_proj")
        q_nope, q_rope = g.op("Split", heads_first(q, heads), g.const([nope, r]), axis=-1, outputs=2)
        latent, k_rope = g.op("Split", linear(x, p + "self_attn.kv_a_proj_with_mqa"), g.const([cfg.kv_lora_rank, r]),
                              axis=-1, outputs=2)
        latent = g.op("Unsqueeze", norm(latent, p + "self_attn.kv_a_layernorm.weight", eps), g.const([1]))
        k_rope = rope(g.op("Unsqueeze", k_rope, g.const([1])))  # [B, 1, T, r]
        latent = g.op("Concat", f"past_key_values.{i}.key", latent, axis=2, outputs=[f"present.{i}.key"])
        k_rope = g.op("Concat", f"past_key_values.{i}.value", k_rope, axis=2, outputs=[f"present.{i}.value"])
        kv = heads_first(linear(g.op("Squeeze", latent, g.const([1])), p + "self_attn.kv_b_proj"), heads, nope + vd)
        k_nope, v = g.op("Split", kv, g.const([nope, vd]), axis=-1, outputs=2)
        t = lambda y: g.op("Transpose", y, perm=[0, 1, 3, 2])  # noqa: E731
        scores = g.op("Add", g.op("MatMul", q_nope, t(k_nope)), g.op("MatMul", rope(q_rope), t(k_rope)))
        scores = g.op("Add", scaled(scores, 1 / math.sqrt(nope + r)), g.op("Squeeze", mask, g.const([1])))
        att = g.op("Transpose", g.op("MatMul", g.op("Softmax", scores, axis=-1), v), perm=[0, 2, 1, 3])
        return linear(g.op("Reshape", att, g.const([0, 0, heads * vd])), p + "self_attn.o_proj")

    def mlp_block(h, p):
        x = norm(h, p + "post_attention_layernorm.weight")
        act = _activation(g, cfg, linear(x, p + "mlp.gate_proj"))
        mlp = linear(g.op("Mul", act, linear(x, p + "mlp.up_proj")), p + "mlp.down_proj")
        return g.op("Add", h, scaled(mlp, cfg.residual_scale))

    if cfg.mla:
        # rotary angles [B, 1, T, d] from position_ids, as rope_tables computes them for the exact context (the
        # frequencies of the checkpoint's rope scaling, fixed: docs/ROPE.md); cos/sin carry LongRoPE's attention factor
        inv = rotary.inverse_frequencies(cfg, cfg.exact_context).numpy()
        freqs = g.op("Mul", g.op("Unsqueeze", g.op("Cast", "position_ids", to=TensorProto.FLOAT), g.const([2])),
                     g.const(inv.astype(np.float32), np.float32))
        angles = g.op("Unsqueeze", g.op("Concat", freqs, freqs, axis=-1), g.const([1]))
        factor = rotary.attention_factor(cfg)
        cos, sin = scaled(g.op("Cos", angles), factor), scaled(g.op("Sin", angles), factor)

        # additive mask [B, 1, 1, T, S]: key slot j is visible to query t when j <= past + t and attention_mask[j] is 1
        seq = g.op("Shape", "input_ids", start=1, end=2)
        total = g.op("Shape", "attention_mask", start=1, end=2)
        scalar = lambda x: g.op("Squeeze", x, g.const([0]))  # noqa: E731
        keys = g.op("Range", g.const(0), scalar(total), g.const(1))
        queries = g.op("Range", scalar(g.op("Sub", total, seq)), scalar(total), g.const(1))
        causal = g.op("LessOrEqual", g.op("Unsqueeze", keys, g.const([0])), g.op("Unsqueeze", queries, g.const([1])))
        padding = g.op("Unsqueeze", g.op("Cast", "attention_mask", to=TensorProto.BOOL), g.const([1, 2, 3]))
        mask = g.op("Where", g.op("And", causal, padding), g.const(0.0, np.float32), g.const(NEG, np.float32))

        h = scaled(h, cfg.embedding_scale)
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            h = g.op("Add", h, scaled(latent_attention(norm(h, p + "input_layernorm.weight"), p, i),
                                      cfg.residual_scale))
            h = mlp_block(h, p)
        h = scaled(norm(h, "model.norm.weight"), cfg.logit_scale, "Div")
    else:
        h = _gqa_decoder(g, ckpt, cfg, h, linear, norm)  # normed, divided by logit_scale
    if embedding != "f16":  # [B, T, hidden] -> [B, T, vocab] as it is
        if not cfg.tie_word_embeddings:
            table = quantized_head(ckpt.tensor("lm_head.weight"), embedding)
            table["B"] = g.weight("lm_head.qweight", table["B"])
            table["scales"] = g.weight("lm_head.scales", table["scales"])
        g.op("MatMulNBits", h, table["B"], table["scales"], outputs=["logits"], name="lm_head",
             domain="com.microsoft", K=table["K"], N=table["N"], bits=table["bits"],
             block_size=table["block_size"], accuracy_level=accuracy_level)
        return zero_points
    h = g.op("Reshape", h, g.const([-1, cfg.hidden_size]))
    if cfg.tie_word_embeddings:
        logits = head(h, embed, half)
    else:
        table = _table(ckpt, "lm_head.weight")
        logits = head(h, g.weight("lm_head.weight", table), table.dtype == np.float16)
    shape = g.op("Concat", g.op("Shape", "input_ids"), g.const([cfg.vocab_size]), axis=0)
    g.op("Reshape", logits, shape, outputs=["logits"])
    return zero_points


def _gqa_decoder(g: _Graph, ckpt: Checkpoint, cfg: ModelConfig, h: str, linear, norm) -> str:
    """The decoder layers with onnxruntime's fused decode ops on the embedding rows `h` (before muP's scale_emb);
    returns the final-normed hidden states / logit_scale.

    Per layer: q|k|v as one MatMulNBits into com.microsoft.GroupQueryAttention (causal, GQA, rotate-half rotary from
    cos/sin tables of the fixed frequencies with LongRoPE's attention factor folded in, key/value caches [B, kv, S, d]
    that it appends to, or fills in place when the runtime shares past and present buffers), gate|up as one
    MatMulNBits, and each residual add fused with the next RMSNorm (com.microsoft.SkipSimplifiedLayerNormalization).
    GroupQueryAttention takes positions from the cache length (seqlens_k = attention_mask sum - 1, so a batch is
    right-padded) and needs no position_ids. muP's multipliers cost no operations: residual_scale is folded into the
    float32 scales of o_proj and down_proj, 1/logit_scale into the final norm's weight (one float32 rounding each),
    and scale_emb into the residual stream's units: the graph carries h / scale_emb, so the branches' scales take
    residual_scale / scale_emb and every RMSNorm the epsilon eps / scale_emb^2, since
    RMSNorm_eps(s*x) = x / sqrt(mean(x^2) + eps / s^2) (no Mul on the embedding rows each token).
    """
    d, heads, kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    positions = max(cfg.exact_context, cfg.max_position_embeddings)
    angles = np.outer(np.arange(positions, dtype=np.float64),
                      rotary.inverse_frequencies(cfg, cfg.exact_context).double().numpy())
    factor = rotary.attention_factor(cfg)
    cos = g.weight("rotary.cos_cache", (np.cos(angles) * factor).astype(np.float32))
    sin = g.weight("rotary.sin_cache", (np.sin(angles) * factor).astype(np.float32))
    lengths = g.op("ReduceSum", "attention_mask", g.const([1]), keepdims=0)
    seqlens_k = g.op("Cast", g.op("Sub", lengths, g.const(1)), to=TensorProto.INT32)
    total = g.op("Cast", g.op("Gather", g.op("Shape", "attention_mask"), g.const(1), axis=0), to=TensorProto.INT32)
    unit = cfg.embedding_scale  # h here = the residual stream / scale_emb
    eps, branch = cfg.rms_norm_eps / unit**2, cfg.residual_scale / unit

    def skip_norm(h, branch, name, divide=1.0):  # (RMSNorm(h + branch) with weight `name` / divide, h + branch)
        node = f"{name}/skip_norm"
        outs = [f"{node}/out0", "", "", f"{node}/out3"]
        gamma = (ckpt.tensor(name).double().numpy() / divide).astype(np.float32)
        g.op("SkipSimplifiedLayerNormalization", h, branch, g.weight(name, gamma), outputs=outs, name=node,
             domain="com.microsoft", epsilon=eps)
        return outs[0], outs[3]

    x = norm(h, "model.layers.0.input_layernorm.weight", eps)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        qkv = linear(x, p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj")
        att = g.op("GroupQueryAttention", qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value",
                   seqlens_k, total, cos, sin, outputs=[f"{p}attn/out0", f"present.{i}.key", f"present.{i}.value"],
                   name=p + "attn", domain="com.microsoft", num_heads=heads, kv_num_heads=kv, do_rotary=1,
                   rotary_interleaved=0, scale=1 / math.sqrt(d))[0]
        x, h = skip_norm(h, linear(att, p + "self_attn.o_proj", factor=branch),
                         p + "post_attention_layernorm.weight")
        gate, up = g.op("Split", linear(x, p + "mlp.gate_proj", p + "mlp.up_proj"),
                        g.const([cfg.intermediate_size] * 2), axis=-1, outputs=2)
        last = i + 1 == cfg.num_hidden_layers
        down = linear(g.op("Mul", _activation(g, cfg, gate), up), p + "mlp.down_proj", factor=branch)
        x, h = skip_norm(h, down, "model.norm.weight" if last else f"model.layers.{i + 1}.input_layernorm.weight",
                         cfg.logit_scale if last else 1.0)
    return x


def _activation(g: _Graph, cfg: ModelConfig, gate: str) -> str:
    if cfg.hidden_act == "silu":
        return g.op("Mul", gate, g.op("Sigmoid", gate))
    if cfg.hidden_act == "relu":
        return g.op("Relu", gate)
    # FATReLU: x if x > threshold else 0
    return g.op("Where", g.op("Greater", gate, g.const(cfg.hidden_act_param, np.float32)), gate,
                g.const(0.0, np.float32))
