"""What a checkpoint directory holds (architecture, config, parameters, dtypes, shapes, tying), or an exported artifact
(its files, and what each model file in it gives a runtime: GGUF types and bits per weight, ONNX ops, MLC tensors)."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

from .errors import UserError
from .model import Checkpoint

_LAYER = re.compile(r"^model\.layers\.\d+\.")


def summarize(path: str | Path) -> dict:
    with Checkpoint(path) as ckpt:
        c = ckpt.config
        params, dtypes, shapes = 0, Counter(), {}
        for name in ckpt.names:
            shape = ckpt.shape(name)
            n = math.prod(shape)
            dtypes[ckpt.dtype(name)] += n
            if name.endswith(".qweight"):  # packed int32: count the weights it holds
                params += n * 32 // ckpt.quant["spec"].bits
            elif name.endswith(".ggml") and ckpt.quant:  # GGML blocks: the weights they hold
                params += math.prod(ckpt.linear_shape(name[:-len(".ggml")]))
            elif not (ckpt.quant and name.endswith((".qzeros", ".scales", ".g_idx"))):
                params += n
            key = _LAYER.sub("model.layers.*.", name)
            shapes.setdefault(key, [list(shape), 0])[1] += 1
        return {
            "path": str(path),
            "architecture": c.raw.get("architectures", [c.arch])[0] if c.raw.get("architectures") else c.arch,
            "variant": c.variant,
            "config": c.to_dict(),
            "muP": {"embedding_scale": c.embedding_scale, "residual_scale": c.residual_scale, "logit_scale": c.logit_scale},
            "parameters": params,  # weights, whether stored plain or packed
            "dtypes": dict(dtypes),
            "tensors": {k: {"shape": s, "count": n} for k, (s, n) in shapes.items()},
            "tied": c.tie_word_embeddings,
            "notes": c.notes(),  # rotary scaling, the context within which exports are exact, sparse attention
            "quantization": _quant(ckpt),
            "tokenizer": str(ckpt.tokenizer_path) if ckpt.tokenizer_path else None,
        }


def _quant(ckpt: Checkpoint) -> dict | None:
    if not ckpt.quant:
        return None
    if ckpt.quant["kind"] == "ggml":
        types = Counter(ckpt.quant["types"].values())
        return {"method": ckpt.quant["raw"].get("meta", {}).get("method", "gptq"), "format": ckpt.quant["format"],
                "types": dict(types), "desc_act": ckpt.quant["desc_act"]}
    spec = ckpt.quant["spec"]
    first = ckpt.quantized(f"model.layers.0.{next(iter(ckpt.config.linear_shapes()))}")
    return {"method": "GPTQ", "bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym,
            "format": "gptq_v2" if ckpt.quant["v2"] else "gptq (v1)", "desc_act": ckpt.quant["desc_act"],
            "contiguous_groups": first.contiguous}


def is_artifact(path: str | Path) -> bool:
    """A GGUF file, or a folder that minicpm-edge exported (a manifest and no checkpoint config)."""
    p = Path(path)
    return p.is_file() and p.suffix == ".gguf" or (p / "manifest.json").is_file() and not (p / "config.json").is_file()


def summarize_artifact(path: str | Path) -> dict:
    """What an exported artifact holds: its files and, per model file inside, what a runtime will read."""
    from .artifact import MANIFEST

    p = Path(path)
    if p.is_file():
        return {"path": str(p), "kind": "gguf", "tool": None, "bytes": p.stat().st_size, "files": {p.name: p.stat().st_size},
                "export": None, "models": [_gguf(p)]}
    try:
        manifest = json.loads((p / MANIFEST).read_text())
        files = {rel: int(rec["bytes"]) for rel, rec in manifest["files"].items()}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        raise UserError(f"{p / MANIFEST}: malformed manifest") from None
    try:
        export = json.loads((p / "export.json").read_text()) if (p / "export.json").is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{p / 'export.json'}: not readable JSON") from None
    models = [*map(_gguf, sorted(p.rglob("*.gguf"))), *map(_onnx, sorted(p.rglob("*.onnx"))),
              *map(_mlc, sorted(p.rglob("tensor-cache.json")))]
    return {"path": str(p), "kind": str(manifest.get("kind")), "tool": manifest.get("tool"), "bytes": sum(files.values()),
            "files": files, "export": export, "models": models}


def _gguf(path: Path) -> dict:
    from .artifact import open_gguf

    r = open_gguf(path)

    def field(key, default=None):
        f = r.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture", "?")
    params = sum(int(t.n_elements) for t in r.tensors)
    data = sum(int(t.n_bytes) for t in r.tensors)
    return {"file": path.name, "format": "gguf", "architecture": arch, "name": field("general.name"),
            "tensors": len(r.tensors), "parameters": params, "types": dict(Counter(t.tensor_type.name for t in r.tensors)),
            "bits_per_weight": round(8 * data / max(params, 1), 3), "layers": field(f"{arch}.block_count"),
            "context": field(f"{arch}.context_length"), "vocab": len(r.fields["tokenizer.ggml.tokens"].data)
            if "tokenizer.ggml.tokens" in r.fields else None, "chat_template": "tokenizer.chat_template" in r.fields}


def _onnx(path: Path) -> dict:
    import onnx

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise UserError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
    ops = Counter(n.op_type for n in m.graph.node)
    return {"file": path.name, "format": "onnx", "opsets": {o.domain or "ai.onnx": o.version for o in m.opset_import},
            "nodes": len(m.graph.node), "ops": dict(ops.most_common()), "inputs": len(m.graph.input),
            "outputs": [o.name for o in m.graph.output][:4], "initializers": len(m.graph.initializer)}


def _mlc(path: Path) -> dict:
    try:
        shards = json.loads(path.read_text())["records"]
        recs = [r for s in shards for r in s["records"]]
        dtypes = Counter(r["dtype"] for r in recs)
        nbytes = sum(int(s["nbytes"]) for s in shards)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise UserError(f"{path}: malformed tensor cache") from None
    chat = path.parent / "mlc-chat-config.json"
    try:
        cfg = json.loads(chat.read_text()) if chat.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{chat}: not readable JSON") from None
    return {"file": path.parent.name, "format": "mlc", "model_type": cfg.get("model_type"),
            "quantization": cfg.get("quantization"), "context": cfg.get("context_window_size"), "shards": len(shards),
            "tensors": len(recs), "dtypes": dict(dtypes), "bytes": nbytes}
