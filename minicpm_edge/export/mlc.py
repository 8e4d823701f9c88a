"""Android / HarmonyOS target: MLC-LLM weights for mlc-llm's `minicpm` model that carry the GPTQ codes exactly.

Group quantisation as mlc-llm defines it (python/mlc_llm/quantization/group_quantization.py): groups of 32 along K,
value = (q - 7) * scale, eight 4-bit codes per uint32 with element 0 in the low nibble, scales in float16.
q4f16_1 stores a Linear as q_weight [N, K/8] and q_scale [N, K/32]; q4f16_0 stores both transposed
([K/8, N], [K/32, N]).
Symmetric GPTQ (value = s * (q - 8)) maps exactly with q' = 15 - q and scale' = -s, since (q' - 7) * (-s) = s * (q - 8).
The embedding is no GPTQ tensor: it is quantised here by mlc's own rule (scale = max|w| / 7 per group of 32, codes
round(w / scale + 7) clipped to 0..14, all in float16) and is [V, H/8] / [V, H/32] in both layouts. Norms are float16.
mlc's minicpm model fuses q, k, v into `wqkv_pack` (rows of q, then k, then v) and gate, up into `gate_up_proj`.
Shards and tensor-cache.json follow tvm's tvmjs.dump_tensor_cache; ndarray-cache.json is the same file under the name
runtimes before late 2025 read. One decoder layer is read at a time; the writer holds at most one shard.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..artifact import staging
from ..errors import UserError
from ..model import Checkpoint, all_finite
from ..model.checkpoint import LINEARS
from ..model.hub import model_name
from ..quant.format import require_gptq
from ..model.tokenizer import AI, USER, Tokenizer, dummy_prefix

LAYOUTS = {"q4f16_0": "KN", "q4f16_1": "NK"}
TARGETS = ("android", "harmony")
GROUP = 32
SHARD_CAP = 32 << 20  # tvmjs.dump_tensor_cache's shard_cap_mb=32
CACHE_FILES = ("tensor-cache.json", "ndarray-cache.json")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json")  # a SentencePiece checkpoint: the runtime's SP path
JSON_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # a tokenizer.json-only checkpoint
SAMPLING = {"temperature": 0.5, "top_p": 0.8, "repetition_penalty": 1.02, "presence_penalty": 0.0,
            "frequency_penalty": 0.0}  # MiniCPM's chat defaults (as in the iOS template)
GUIDE = Path(__file__).resolve().parents[2] / "targets" / "android" / "README.md"
DEVICE_DIR = "/storage/emulated/0/Android/data/ai.mlc.mlcchat/files"
FUSED = {"self_attn.wqkv_pack": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),  # mlc <- HF rows
         "self_attn.o_proj": ("self_attn.o_proj",),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
         "mlp.down_proj": ("mlp.down_proj",)}


# -- codes -> mlc tensors ------------------------------------------------------------------------------------------
def pack4(codes: torch.Tensor) -> np.ndarray:
    """uint8 codes [R, C] (0..15) -> uint32 [R, C/8]: element 8j + r of a row in bits 4r..4r+3 of word j."""
    c = codes.to(torch.uint8).numpy()
    pairs = c[:, 0::2] | (c[:, 1::2] << 4)  # byte b holds elements 2b (low nibble) and 2b + 1
    return np.ascontiguousarray(pairs).view("<u4")


def gptq_params(parts: list, order: str) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric GPTQ Linears, rows concatenated in order, as (q_weight, q_scale) of one mlc Linear ("KN" or "NK").
    Groups of 64, 128 or one per channel repeat their scale over each of their groups of 32."""
    codes = torch.cat([15 - q.codes for q in parts], dim=0)  # [N, K]
    scales = -torch.cat([q.per_block(GROUP)[0] for q in parts], dim=1).half()  # [K/32, N]
    words = pack4(codes)
    if order == "KN":
        return np.ascontiguousarray(words.T), scales.numpy()
    return words, np.ascontiguousarray(scales.numpy().T)


def rtn_params(ckpt: Checkpoint, name: str, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """mlc's q4f16 rule for a float weight [R, C], grouped along C: (q_weight [R, C/8], q_scale [R, C/32]).

    Rows are read `chunk` at a time in their stored dtype: Checkpoint.tensor would hold the whole table plus a
    float32 finiteness check of it (about 2 GB for MiniCPM-2B's embedding).
    """
    rows, cols = ckpt.shape(name)
    h = ckpt._slice(name)  # the open file: a safetensors handle, or the state dict of a .bin
    words = np.empty((rows, cols // 8), dtype="<u4")
    scales = np.empty((rows, cols // GROUP), dtype="<f2")
    for a in range(0, rows, chunk):
        x = (h[name][a:a + chunk] if isinstance(h, dict) else h.get_slice(name)[a:a + chunk]).to(torch.float16)
        if not all_finite(x):
            raise UserError(f"{ckpt.dir}: {name} has values that are not finite in float16, which mlc's q4f16 stores")
        g = x.view(x.shape[0], -1, GROUP)
        s = g.abs().amax(-1, keepdim=True) / torch.tensor(7, dtype=torch.float16)
        q = torch.round(g / s + torch.tensor(7, dtype=torch.float16)).clamp(0, 14)
        q = torch.where(s == 0, torch.full_like(q, 7), q)  # an all-zero group: mlc would divide 0 by 0
        words[a:a + chunk] = pack4(q.view(x.shape).to(torch.uint8))
        scales[a:a + chunk] = s.squeeze(-1).numpy()
    return words, scales


def half(t: torch.Tensor, name: str) -> np.ndarray:
    x = t.to(torch.float16)
    if not all_finite(x):
        raise UserError(f"{name} has values that are not finite in float16, which mlc's q4f16 stores")
    return x.numpy()


# -- the tensor cache ----------------------------------------------------------------------------------------------
class TensorCache:
    """params_shard_*.bin and the cache json as tvm's tvmjs.dump_tensor_cache writes them.

    Tensors go back to back into the current shard. When one would bring it to the cap or past it, a tensor of half
    the cap or more gets a shard of its own at once (the current shard stays open); otherwise the current shard is
    written out and a new one started.
    """

    def __init__(self, folder: Path, cap: int = SHARD_CAP):
        self.folder, self.cap = folder, cap
        self.shards, self.records, self.pending = [], [], bytearray()
        self.count, self.nbytes = 0, 0

    def add(self, name: str, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        data = a.reshape(-1).view(np.uint8)
        rec = {"name": name, "shape": list(a.shape), "dtype": str(a.dtype), "format": "f32-to-bf16",
               "nbytes": data.nbytes}
        self.count, self.nbytes = self.count + 1, self.nbytes + data.nbytes
        if len(self.pending) + data.nbytes >= self.cap:
            if 2 * data.nbytes >= self.cap:
                self._write([dict(rec, byteOffset=0)], data)
                return
            self.flush()
        self.records.append(dict(rec, byteOffset=len(self.pending)))
        self.pending += memoryview(data)

    def flush(self) -> None:
        if self.pending:
            self._write(self.records, self.pending)
            self.records, self.pending = [], bytearray()

    def _write(self, records: list, data) -> None:
        path = f"params_shard_{len(self.shards)}.bin"
        (self.folder / path).write_bytes(data)
        self.shards.append({"dataPath": path, "format": "raw-shard", "nbytes": len(data), "records": records,
                            "md5sum": hashlib.md5(data).hexdigest()})

    def finish(self, total_params: int) -> dict:
        self.flush()
        meta = {"ParamSize": self.count, "ParamBytes": float(self.nbytes),
                "BitsPerParam": self.nbytes * 8.0 / total_params}
        text = json.dumps({"metadata": meta, "records": self.shards}, indent=4)
        for name in CACHE_FILES:
            (self.folder / name).write_text(text)
        return meta


# -- checks --------------------------------------------------------------------------------------------------------
def check_exportable(ckpt: Checkpoint) -> None:
    """Raise a UserError saying why mlc's minicpm model cannot run this checkpoint with its GPTQ codes unchanged."""
    c, where = ckpt.config, ckpt.dir
    if c.mla:
        raise UserError(f"{where}: mlc-llm has no MiniCPM3 model (multi-head latent attention: q_a/q_b, kv_a/kv_b "
                        "projections its minicpm model lacks; mlc-llm issue 3051); export --target ios (GGUF, "
                        "llama.cpp's minicpm3) or onnx instead")
    if c.hidden_act != "silu":
        raise UserError(f"{where}: hidden_act {c.hidden_act!r} (MiniCPM-S) is not supported by mlc-llm's minicpm "
                        "model, which hard-codes SiLU; export --target onnx runs this model")
    r = c.rope_scaling
    if r is not None and r.kind != "dynamic":
        raise UserError(f"{where}: rope_scaling {r.kind} is ignored by mlc-llm's minicpm model (plain rotary only), "
                        "which would give a silently wrong model; export --target ios or onnx instead")
    if c.head_dim * c.num_attention_heads != c.hidden_size:
        raise UserError(f"{where}: head_dim {c.head_dim} x {c.num_attention_heads} heads differs from hidden_size "
                        f"{c.hidden_size}, which mlc-llm's minicpm model asserts against; export --target ios or onnx "
                        "instead")
    how = "quantise with `minicpm-edge quantize --bits 4 --group-size 32` (symmetric)"
    q = ckpt.quant
    if q is None:
        raise UserError(f"{where}: not a GPTQ checkpoint; the MLC export stores GPTQ int4 codes, {how} first")
    require_gptq(q, where, "mlc's q4f16 (one fp16 scale per group of 32)")
    spec = q["spec"]
    if spec.bits != 4:
        raise UserError(f"{where}: GPTQ {spec.bits}-bit has no exact q4f16 form (mlc stores 4-bit codes); {how}")
    for name, k in (("hidden_size", c.hidden_size), ("intermediate_size", c.intermediate_size)):
        if spec.group_len(k) % GROUP:
            raise UserError(f"{where}: {name} {k} with group size {spec.group_size} is no whole number of mlc's "
                            f"groups of {GROUP} per group; {how}")
    if not spec.sym:
        raise UserError(f"{where}: asymmetric GPTQ has no exact q4f16 form (mlc's groups have no zero point); {how}, "
                        "or export --target ios (Q4_1 holds asymmetric codes)")
    if c.mup and c.dim_model_base and c.hidden_size % c.dim_model_base:
        raise UserError(f"{where}: mlc's minicpm model divides by hidden_size // dim_model_base (integer), which "
                        f"differs from {c.hidden_size} / {c.dim_model_base}; export --target onnx or ios instead")
    for m in LINEARS:
        check_linear(ckpt, f"model.layers.0.{m}")
    if ckpt.tokenizer_path is None:
        raise UserError(f"{where}: no tokenizer.model or tokenizer.json; the MLC runtime needs the tokenizer beside "
                        "the weights")


def check_linear(ckpt: Checkpoint, prefix: str):
    q = ckpt.quantized(prefix)
    if not q.contiguous:
        raise UserError(f"{ckpt.dir}: {prefix} uses act-order groups that are not contiguous along the input, which "
                        "q4f16 cannot express; re-quantise with `minicpm-edge quantize` (its act-order keeps groups "
                        "contiguous) or with static groups")
    if not bool((q.zeros == 8).all()):
        raise UserError(f"{ckpt.dir}: {prefix} is marked symmetric but has zero points other than 8; "
                        "re-quantise with `minicpm-edge quantize --bits 4 --group-size 32`")
    return q


# -- the export ----------------------------------------------------------------------------------------------------
def params(ckpt: Checkpoint, layout: str):
    """(name, array) of every mlc parameter, in the order of mlc's MiniCPMForCausalLM, one layer read at a time."""
    c = ckpt.config
    w, s = rtn_params(ckpt, "model.embed_tokens.weight")
    yield "model.embed_tokens.q_weight", w
    yield "model.embed_tokens.q_scale", s
    del w, s
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        for dst, srcs in FUSED.items():
            w, s = gptq_params([check_linear(ckpt, p + m) for m in srcs], LAYOUTS[layout])
            yield p + dst + ".q_weight", w
            yield p + dst + ".q_scale", s
        for norm in ("input_layernorm", "post_attention_layernorm"):
            yield p + norm + ".weight", half(ckpt.tensor(p + norm + ".weight", None), p + norm)
    yield "model.norm.weight", half(ckpt.final_norm(None), "model.norm")
    if not c.tie_word_embeddings:  # no GPTQ codes: mlc quantises the final Linear too (quantize_final_fc)
        w, s = rtn_params(ckpt, "lm_head.weight")
        if LAYOUTS[layout] == "KN":
            w, s = np.ascontiguousarray(w.T), np.ascontiguousarray(s.T)
        yield "lm_head.q_weight", w
        yield "lm_head.q_scale", s


def source_params(ckpt: Checkpoint) -> int:
    """Weights of the unquantised model: what mlc's loader counts for BitsPerParam."""
    c = ckpt.config
    linear = sum(math.prod(ckpt.linear_shape(f"model.layers.0.{m}")) for m in LINEARS)
    heads = 1 if c.tie_word_embeddings else 2
    return heads * c.vocab_size * c.hidden_size + c.num_hidden_layers * (linear + 2 * c.hidden_size) + c.hidden_size


def muP(c) -> dict:
    """scale_emb, scale_depth, dim_model_base for mlc's graph (which always applies them); llama-format checkpoints
    have the factors folded in, and use_mup false has none: both get values that make the three factors 1."""
    if not c.mup:
        return {"scale_emb": 1, "scale_depth": math.sqrt(c.num_hidden_layers), "dim_model_base": c.hidden_size}
    num = lambda x: int(x) if float(x).is_integer() else x  # noqa: E731
    return {"scale_emb": num(c.scale_emb), "scale_depth": c.scale_depth,
            "dim_model_base": num(c.dim_model_base or c.hidden_size)}


def conversation(c) -> dict:
    """MiniCPM's chat format as an mlc Conversation: BOS, then `<用户>{prompt}<AI>` (no template ships with mlc)."""
    return {"name": "minicpm", "system_template": "{system_message}", "system_message": "",
            "system_prefix_token_ids": [c.bos_token_id], "add_role_after_system_message": True,
            "roles": {"user": USER, "assistant": AI},
            "role_templates": {"user": "{user_message}", "assistant": "{assistant_message}", "tool": "{tool_message}"},
            "messages": [], "seps": [""], "role_content_sep": "", "role_empty_sep": "",
            "stop_str": [USER], "stop_token_ids": [c.eos_token_id], "strip_reasoning_in_history": False,
            "function_string": "", "use_function_calling": False}


def tokenizer_files(ckpt: Checkpoint) -> list[str]:
    names = TOKENIZER_FILES if ckpt.tokenizer_path.suffix == ".model" else JSON_TOKENIZER_FILES
    return [n for n in names if (ckpt.dir / n).is_file()]


def tokenizer_info(ckpt: Checkpoint) -> dict:
    """mlc's tokenizer_info: how its runtime turns token strings back into bytes.

    tokenizer.model alone: the SentencePiece path and its default info. A tokenizer.json: "byte_level" for byte-level
    BPE (GPT-2's byte-to-unicode table), "byte_fallback" for a SentencePiece-derived one (`▁` for spaces, `<0xXX>`
    pieces), with the dummy-prefix space it prepends and strips again."""
    info = {"token_postproc_method": "byte_fallback", "prepend_space_in_encode": False, "strip_space_in_decode": False}
    if ckpt.tokenizer_path.suffix == ".model":
        return info
    tok = Tokenizer(ckpt.tokenizer_path)
    if tok.kind == "bpe":
        return {**info, "token_postproc_method": "byte_level"}
    return {**info, "prepend_space_in_encode": dummy_prefix(tok.json),
            "strip_space_in_decode": "Strip" in json.dumps(tok.json.get("decoder"))}


def chat_config(ckpt: Checkpoint, layout: str, context: int, chunk: int, tokenizer_files: list[str]) -> dict:
    c = ckpt.config
    model_config = {"vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
                    "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
                    "hidden_act": "silu", "rms_norm_eps": c.rms_norm_eps, "intermediate_size": c.intermediate_size,
                    **muP(c), "use_cache": True, "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
                    "tie_word_embeddings": c.tie_word_embeddings, "rope_theta": c.rope_theta,
                    "context_window_size": context, "prefill_chunk_size": chunk, "tensor_parallel_shards": 1,
                    "head_dim": c.head_dim, "max_batch_size": 128, "num_experts_per_tok": 0, "num_experts": 0}
    sampling = dict(SAMPLING)
    gen = ckpt.dir / "generation_config.json"
    if gen.is_file():
        try:
            sampling.update({k: v for k, v in json.loads(gen.read_text()).items() if k in SAMPLING})
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, AttributeError) as e:
            raise UserError(f"{gen}: not a valid JSON object ({str(e)[:160]})") from None
    return {"version": "0.1.0", "model_type": "minicpm", "quantization": layout, "model_config": model_config,
            "vocab_size": c.vocab_size, "context_window_size": context, "sliding_window_size": -1,
            "prefill_chunk_size": chunk, "attention_sink_size": -1, "tensor_parallel_shards": 1,
            "pipeline_parallel_stages": 1, "active_vocab_size": c.vocab_size, **sampling,
            "tokenizer_files": tokenizer_files, "tokenizer_info": tokenizer_info(ckpt),
            "conv_template": conversation(c), "pad_token_id": int(c.raw.get("pad_token_id") or 0),
            "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "model_task": "chat",
            "embedding_metadata": None}


def windows(c, context: int | None, chunk: int | None) -> tuple[int, int]:
    context = min(2048, c.max_position_embeddings) if context is None else context
    chunk = min(128, context) if chunk is None else chunk
    if not 0 < context <= c.max_position_embeddings:
        raise UserError(f"context window {context} must be between 1 and the model's max_position_embeddings "
                        f"{c.max_position_embeddings} (the context within which the export is exact)")
    if not 0 < chunk <= context:
        raise UserError(f"prefill chunk {chunk} must be between 1 and the context window {context}")
    return context, chunk


def export_mlc(checkpoint: Path, out: Path, *, target: str = "android", layout: str = "q4f16_0",
               model_id: str | None = None, context_window: int | None = None, prefill_chunk: int | None = None,
               force: bool = False) -> Path:
    """Write `out/` with `<model_id>/` (the MLC model folder: weights, mlc-chat-config.json, tokenizer), the
    mlc-package-config.json that `mlc_llm package` reads, README.md and export.json. Returns `out`.

    context_window defaults to min(2048, max_position_embeddings), prefill_chunk to min(128, context_window), as mlc's
    own Android configs do; model_id to `<checkpoint name>-<layout>-MLC`.
    """
    if target not in TARGETS:
        raise UserError(f"target {target!r} is not an MLC target; choose {' or '.join(TARGETS)}")
    if layout not in LAYOUTS:
        raise UserError(f"layout {layout!r} is not supported; choose q4f16_0 (default) or q4f16_1")
    out = Path(out)
    with Checkpoint(checkpoint) as ckpt:
        model_id = model_id or f"{model_name(ckpt.dir.resolve())}-{layout}-MLC"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", model_id):
            raise UserError(f"model id {model_id!r} must be letters, digits, '.', '_' or '-' "
                            "(it names a folder on the phone)")
        check_exportable(ckpt)
        c = ckpt.config
        context, chunk = windows(c, context_window, prefill_chunk)
        with staging(out, force, target) as tmp:
            folder = tmp / model_id
            folder.mkdir()
            cache = TensorCache(folder, SHARD_CAP)
            for name, array in params(ckpt, layout):
                cache.add(name, array)
            meta = cache.finish(source_params(ckpt))
            files = tokenizer_files(ckpt)
            for n in files:
                shutil.copy(ckpt.dir / n, folder / n)
            write_json(folder / "mlc-chat-config.json", chat_config(ckpt, layout, context, chunk, files))
            lib = re.sub(r"\W", "_", f"minicpm_{model_id}")  # a C identifier: the system-lib prefix
            kv = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * context * 2
            activations = chunk * (c.vocab_size + 4 * c.intermediate_size + 8 * c.hidden_size) * 4
            write_json(tmp / "mlc-package-config.json", {
                "device": "android",
                "model_list": [{"model": model_id, "model_id": model_id, "model_lib": lib,
                                "estimated_vram_bytes": int(meta["ParamBytes"]) + kv + activations,
                                "bundle_weight": True,
                                "overrides": {"context_window_size": context, "prefill_chunk_size": chunk}}],
                "model_lib_path_for_prepare_libs": {lib: f"lib/{model_id}-android.tar"}})
            guide = GUIDE.read_text()
            if target == "harmony":
                guide = ("> Exported for HarmonyOS: these are the Android artifacts; read *HarmonyOS* below for which "
                         "devices run them.\n\n" + guide)
            (tmp / "README.md").write_text(guide)
            write_json(tmp / "export.json", {
                "target": target, "source": str(ckpt.dir), "layout": layout, "model_id": model_id, "model_lib": lib,
                "device_dir": f"{DEVICE_DIR}/{model_id}", "context_window_size": context, "prefill_chunk_size": chunk,
                "shards": len(cache.shards), "model": c.notes(), **meta})
    return out


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
