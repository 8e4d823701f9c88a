"""Lazy reader for HF checkpoint directories: safetensors (single or sharded) and pytorch_model*.bin.

Tensors are read on demand, so one decoder layer at a time can be loaded without the whole model in memory.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import UserError
from .config import ModelConfig, parse_config, read_config_json

LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# the Linears and norms of a llama-style decoder layer; ModelConfig.linear_shapes / norm_shapes give any model's
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")
DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in the floating-point tensor t: its smallest and largest values are finite (min and max carry a
    NaN through). One pass without temporaries: torch.isfinite(t).all() makes three of t's size (seconds and
    gigabytes on an embedding table)."""
    if t.numel() == 0:
        return True
    if t.dim() == 2 and not t.is_contiguous() and t.t().is_contiguous():
        t = t.t()  # column-major (LAPACK's factors): the same values in memory order, ~25x faster on CPU
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


class Checkpoint:
    """An HF checkpoint directory: its config, tokenizer path, and tensors read one at a time."""

    def __init__(self, model_dir: str | Path):
        from .hub import resolve_model

        self.dir = resolve_model(model_dir)  # a hub id (owner/name) becomes its cached snapshot
        if not self.dir.is_dir():
            raise UserError(f"{model_dir}: not a directory")
        self._where: dict[str, Path] = {}  # tensor name -> file
        self._handles: dict[Path, object] = {}
        raw = read_config_json(self.dir)
        parse_config(raw, source=str(self.dir / "config.json"))  # config errors first, before any weights are read
        self._kind = self._index()
        self.config: ModelConfig = parse_config(raw, has_lm_head="lm_head.weight" in self._where,
                                                source=str(self.dir / "config.json"))
        from ..quant.format import read_quant_config

        self.quant = read_quant_config(self.dir, raw)  # None for a plain (unquantised) checkpoint
        self._validate()

    # -- discovery -------------------------------------------------------------------------------
    def _index(self) -> str:
        d = self.dir
        for index_name, kind in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "bin")):
            index = d / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError) as e:
                    raise UserError(f"{index}: malformed index ({_short(e)})") from None
                if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                    raise UserError(f"{index}: malformed index (weight_map must map tensor names to file names)")
                for name, fname in weight_map.items():
                    path = d / fname
                    if not path.is_file():
                        raise UserError(f"{index}: shard {fname} is missing")
                    self._where[name] = path
                self._check_names_in_files(kind)
                return kind
        files = sorted(d.glob("*.safetensors"))
        kind = "safetensors"
        if not files:
            files, kind = sorted(d.glob("pytorch_model*.bin")), "bin"
        if not files:
            raise UserError(f"{d}: no weights found (model*.safetensors or pytorch_model*.bin)")
        for f in files:
            for name in self._keys(f, kind):
                self._where[name] = f
        return kind

    def _check_names_in_files(self, kind: str) -> None:
        for f in sorted(set(self._where.values())):
            present = set(self._keys(f, kind))
            absent = [n for n, p in self._where.items() if p == f and n not in present]
            if absent:
                raise UserError(f"{f}: index lists {absent[0]} but the shard does not hold it")

    def _open(self, path: Path):
        h = self._handles.get(path)
        if h is None:
            if path.suffix == ".safetensors":
                try:
                    h = safe_open(str(path), framework="pt")
                except (SafetensorError, OSError, ValueError) as e:
                    raise UserError(f"{path}: corrupt or unreadable safetensors file ({_short(e)})") from None
            else:
                try:
                    h = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
                except Exception as e:  # torch raises many types for corrupt pickles
                    raise UserError(f"{path}: corrupt or unreadable PyTorch checkpoint ({_short(e)})") from None
                if not isinstance(h, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in h.items()):
                    raise UserError(f"{path}: expected a state dict (tensor names to tensors)")
            self._handles[path] = h
        return h

    def _keys(self, path: Path, kind: str) -> list[str]:
        h = self._open(path)
        return list(h.keys())

    def _validate(self) -> None:
        c = self.config
        present = {int(m.group(1)) for n in self._where if (m := LAYER_RE.match(n))}
        if c.num_hidden_layers > len(present):  # before listing every tensor of every layer config.json claims
            first = next(i for i in range(c.num_hidden_layers) if i not in present)
            raise UserError(f"{self.dir}: config.json has {c.num_hidden_layers} layers but the checkpoint lacks "
                            f"model.layers.{first} ({len(present)} layers present)")
        need = ["model.embed_tokens.weight", "model.norm.weight"]
        linear = self._linear_suffix
        linears, norms = c.linear_shapes(), c.norm_shapes()
        for i in range(c.num_hidden_layers):
            need += [f"model.layers.{i}.{m}.weight" for m in norms]
            need += [f"model.layers.{i}.{m}{linear}" for m in linears]
            if self.quant and self.quant["kind"] == "gptq":
                need += [f"model.layers.{i}.{m}.{x}" for m in linears for x in ("qzeros", "scales")]
        missing = [n for n in need if n not in self._where]
        if missing:
            raise UserError(f"{self.dir}: checkpoint lacks {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        # every shape, from the file headers alone: a mismatch in any layer is refused before any work starts
        h = c.hidden_size
        expect = {"model.embed_tokens.weight": (c.vocab_size, h), "model.norm.weight": (h,)}
        if not c.tie_word_embeddings:
            expect["lm_head.weight"] = (c.vocab_size, h)
        for i in range(c.num_hidden_layers):
            expect.update({f"model.layers.{i}.{m}.weight": (w,) for m, w in norms.items()})
            expect.update({f"model.layers.{i}.{m}.weight": shape for m, shape in linears.items()})
        for name, shape in expect.items():
            got = self.linear_shape(name[:-len(".weight")]) if len(shape) == 2 and "layers." in name else self.shape(name)
            if tuple(got) != shape:
                raise UserError(f"{self.dir}: {name} has shape {list(got)} but config.json implies {list(shape)}")

    # -- access ----------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def _slice(self, name: str):
        if name not in self._where:
            raise UserError(f"{self.dir}: tensor {name} not found")
        return self._open(self._where[name])

    def shape(self, name: str) -> tuple[int, ...]:
        h = self._slice(name)
        if isinstance(h, dict):
            return tuple(h[name].shape)
        return tuple(h.get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        h = self._slice(name)
        if isinstance(h, dict):
            return str(h[name].dtype).replace("torch.", "")
        return h.get_slice(name).get_dtype()

    def tensor(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        h = self._slice(name)
        try:
            raw = h[name] if isinstance(h, dict) else h.get_tensor(name)
            t = (raw if dtype is None else raw.to(dtype)).contiguous()
            if isinstance(h, dict) and t.data_ptr() == raw.data_ptr():
                t = t.clone()  # the loaded dict's own tensor: every caller gets one of its own, free to change
        except (SafetensorError, OSError, RuntimeError, TypeError, ValueError) as e:
            raise UserError(f"{self._where[name]}: cannot read {name} ({_short(e)})") from None
        if t.is_floating_point() and not all_finite(t):
            raise UserError(f"{self._where[name]}: tensor {name} contains NaN or Inf")
        del raw
        self.drop_maps()  # a zero-copy tensor keeps its own map alive; a freed or copied one takes its pages along
        return t

    def drop_maps(self) -> None:
        """Unmap the safetensors files. Pages read through a memory map stay in this process's resident set while
        the map lives; streaming a 2B model layer by layer would otherwise grow by every layer read. Tensors still
        referring to a map (zero-copy reads) keep it; the files reopen on the next read (a header parse)."""
        for path in [p for p, h in self._handles.items() if not isinstance(h, dict)]:
            del self._handles[path]

    @property
    def _linear_suffix(self) -> str:
        return {None: ".weight", "gptq": ".qweight", "ggml": ".ggml"}[self.quant and self.quant["kind"]]

    def linear_shape(self, prefix: str) -> tuple[int, int]:
        """(out, in) of a Linear, quantised or not."""
        suffix = self._linear_suffix
        name = prefix + suffix if self.has(prefix + suffix) else prefix + ".weight"
        shape = self.shape(name)
        if len(shape) != 2:
            raise UserError(f"{self._where[name]}: {name} has shape {list(shape)}; a Linear's weight is a matrix")
        if name.endswith(".qweight"):
            return shape[1], shape[0] * 32 // self.quant["spec"].bits
        if name.endswith(".ggml"):
            from ..quant.kquant import TYPES

            t = TYPES[self._ggml_type(prefix)]
            return shape[0], shape[1] // t.nbytes * t.block
        return shape

    def _ggml_type(self, prefix: str) -> str:
        qtype = self.quant["types"].get(prefix)
        if qtype is None:
            raise UserError(f"{self.dir}: quantization_config.tensor_types names no type for {prefix}")
        return qtype

    def quantized(self, prefix: str):
        """The QuantizedLinear record of a GPTQ checkpoint's Linear (e.g. `model.layers.0.mlp.up_proj`), or the
        GGMLLinear of a --format q4_k_m / q3_k_m one."""
        from ..quant.format import SUFFIXES, GGMLLinear, QuantizedLinear

        q = self.quant
        if q["kind"] == "ggml":
            return GGMLLinear.read(self.tensor(prefix + ".ggml", None), self._ggml_type(prefix),
                                   self.linear_shape(prefix)[1], prefix)
        t = {s: self.tensor(f"{prefix}.{s}", None) for s in SUFFIXES if self.has(f"{prefix}.{s}")}
        spec = q["spec"]
        return QuantizedLinear.from_gptq(t, spec.bits, spec.group_size, spec.sym, q["v2"], name=prefix)

    def layer_state(self, i: int, dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
        """State dict of decoder layer i with the `model.layers.i.` prefix removed; GPTQ Linears dequantised."""
        prefix = f"model.layers.{i}."
        state = {}
        for n in self._where:
            if not n.startswith(prefix):
                continue
            short = n[len(prefix):]
            if short.endswith((".qweight", ".ggml")):
                base = short.rsplit(".", 1)[0]
                w = self.quantized(prefix + base).dequantize()
                state[base + ".weight"] = w if dtype is None else w.to(dtype)
            elif not short.endswith((".qzeros", ".scales", ".g_idx", ".bias")) or not self.quant:
                state[short] = self.tensor(n, dtype)
        return state

    def embedding(self, dtype=torch.float32) -> torch.Tensor:
        return self.tensor("model.embed_tokens.weight", dtype)

    def final_norm(self, dtype=torch.float32) -> torch.Tensor:
        return self.tensor("model.norm.weight", dtype)

    def lm_head(self, dtype=torch.float32) -> torch.Tensor | None:
        return None if self.config.tie_word_embeddings else self.tensor("lm_head.weight", dtype)

    @property
    def tokenizer_path(self) -> Path | None:
        """tokenizer.model (SentencePiece) where there is one, else tokenizer.json; None when neither is there."""
        from .tokenizer import TOKENIZER_NAMES

        return next((self.dir / n for n in TOKENIZER_NAMES if (self.dir / n).is_file()), None)

    def close(self) -> None:
        """Drop the open files (and their memory maps), and hand the memory freed so far back to the OS."""
        from ..memory import release

        self._handles.clear()
        release(collect=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__
