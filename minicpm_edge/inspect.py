"""What a checkpoint directory holds: architecture, config, parameters, dtypes, shapes, tying."""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

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
