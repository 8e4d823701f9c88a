"""onnxruntime on an ONNX export folder (model.onnx with onnxruntime-genai's decoder inputs and outputs)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..memory import release
from . import check_ids


class OnnxRunner:
    name = "onnxruntime"

    def __init__(self, folder: Path, threads: int | None = None):
        import onnxruntime as ort

        path = Path(folder) / "model.onnx"
        if not path.is_file():
            raise UserError(f"{folder}: no model.onnx; export one with `minicpm-edge export --target onnx`")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for unreadable or invalid models
            raise UserError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]})") from None
        self.threads = threads or os.cpu_count() or 1
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past = sorted((n for n in inputs if n.startswith("past_key_values.")), key=_layer_kind)
        outputs = {o.name: o for o in self.session.get_outputs()}
        self.outputs = ["logits", *(n.replace("past_key_values.", "present.", 1) for n in self.past)]
        if not {"input_ids", "attention_mask"} <= inputs.keys() or not self.past \
                or not set(self.outputs) <= outputs.keys():
            raise UserError(f"{path}: not a decoder with input_ids, attention_mask, past_key_values.* and logits; "
                            "re-export it with `minicpm-edge export --target onnx`")
        self.positions = "position_ids" in inputs  # GroupQueryAttention graphs take positions from the cache
        # [batch, kv, 0, head_dim] each (MiniCPM3's latent cache: key and value widths differ)
        self.kv_shapes = _cache_shapes({n: inputs[n].shape for n in self.past}, Path(folder))
        self.vocab_size = outputs["logits"].shape[-1]

    def _run(self, ids: list[int], past=None) -> tuple[np.ndarray, object]:
        """Logits [T, vocab] of `ids` following the cache `past` (None: an empty one) and the cache after them.

        GroupQueryAttention graphs (no position_ids input) get onnxruntime-genai's shared buffers through io-binding:
        each past_key_values.N is bound as the present.N output too, so the attention writes the new keys and values
        in place (capacity doubled when full) instead of copying the whole cache every token; that cache is updated
        in place, so continue from it once. Other graphs (MLA) get growing arrays: the cache is [present arrays]."""
        if not len(ids):
            raise UserError("no tokens to run")
        ids = check_ids(ids, self.vocab_size, "the ONNX model")
        if not self.positions:
            cache = past if past is not None else _SharedCache(self.kv_shapes)
            cache.reserve(cache.length + len(ids))
            io = self.session.io_binding()
            io.bind_cpu_input("input_ids", np.asarray([ids], np.int64))
            io.bind_cpu_input("attention_mask", np.ones((1, cache.length + len(ids)), np.int64))
            io.bind_output("logits")  # first: outputs follow the binding order
            for name, out, value in zip(self.past, self.outputs[1:], cache.values):
                io.bind_ortvalue_input(name, value)
                io.bind_ortvalue_output(out, value)
            try:
                self.session.run_with_iobinding(io)
            except Exception as e:  # onnxruntime's own types, e.g. a position past the rotary tables' rows
                raise UserError(f"onnxruntime: {str(e).splitlines()[0][:300]}") from None
            cache.length += len(ids)
            return io.get_outputs()[0].numpy()[0], cache  # the logits only: the cache stays where it is
        if past is None:
            past = [np.zeros([1, *shape[1:]], np.float32) for shape in self.kv_shapes]
        start, n = past[0].shape[2], len(ids)
        feeds = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, start + n), np.int64),
                 "position_ids": np.arange(start, start + n, dtype=np.int64)[None], **dict(zip(self.past, past))}
        logits, *present = self.session.run(self.outputs, feeds)
        return logits[0], present

    def logits(self, ids) -> np.ndarray:
        return self._run(list(ids), None)[0]

    def close(self) -> None:
        """Free the session (weights and arenas) now rather than when the runner is dropped."""
        if self.__dict__.pop("session", None) is not None:
            release()

    def generate(self, ids, n_new: int) -> list[int]:
        """Greedy decoding: one pass over the prompt, then one token at a time on the key/value cache."""
        logits, past = self._run(list(ids), None)
        out = []
        for i in range(n_new):
            out.append(int(logits[-1].argmax()))
            if i + 1 < n_new:
                logits, past = self._run(out[-1:], past)
        return out


class _SharedCache:
    """Key/value buffers [1, kv, capacity, head_dim] that past and present share, and how many positions are filled."""

    def __init__(self, shapes: list[list[int]], capacity: int = 256):
        self.shapes, self.length, self.arrays, self.values = shapes, 0, [], []
        self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        import onnxruntime as ort

        old = self.arrays
        self.arrays = [np.zeros([1, shape[1], capacity, shape[3]], np.float32) for shape in self.shapes]
        for new, before in zip(self.arrays, old):
            new[:, :, :self.length] = before[:, :, :self.length]
        self.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.arrays]  # views of the arrays' memory

    def reserve(self, total: int) -> None:
        capacity = self.arrays[0].shape[2]
        if total > capacity:
            while capacity < total:
                capacity *= 2
            self._allocate(capacity)

    def view(self, i: int) -> np.ndarray:
        """Layer i's filled part of the cache (past_key_values / present order)."""
        return self.arrays[i][:, :, :self.length]


def _cache_shapes(shapes: dict, folder: Path) -> list[list[int]]:
    """The past_key_values inputs' shapes (name -> onnxruntime's shape) with symbolic dimensions as 0; a symbolic
    kv-head count or head size (onnxruntime-genai's builder writes `kv_cache_dim`) is what genai_config.json gives
    genai (read once)."""
    out, decoder = [], None
    for name, shape in shapes.items():
        dims = [d if isinstance(d, int) else 0 for d in shape]
        if len(dims) != 4:
            raise UserError(f"{folder / 'model.onnx'}: {name} has {len(dims)} dimensions, not [batch, heads, "
                            "sequence, head size]")
        if not (dims[1] and dims[3]):
            try:
                decoder = decoder or json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
                dims[1] = dims[1] or int(decoder["num_key_value_heads"])
                dims[3] = dims[3] or int(decoder["head_size"])
            except (OSError, ValueError, KeyError, TypeError):
                raise UserError(f"{folder / 'model.onnx'}: {name} leaves its head count or size symbolic and no "
                                "genai_config.json gives them") from None
        out.append(dims)
    return out


def _layer_kind(name: str) -> tuple[int, str]:
    """past_key_values.10.key -> (10, "key"): layers in numeric order."""
    _, i, kind = (name.split(".") + ["", ""])[:3]
    return int(i) if i.isdigit() else -1, kind
