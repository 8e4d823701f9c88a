"""Random-weight checkpoints in the exact HF layout of real MiniCPM models, for shape tests and benchmarks.

Random, not trained: use the bundled reference model for anything that measures quality.
`python -m minicpm_edge.model.synthetic minicpm-2b --out /tmp/minicpm-2b [--layers 2]`
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import UserError

_MINICPM = {"architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm", "hidden_act": "silu",
            "scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 256, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}
# FORMATS.md section 0. The 2B config is written the old way (no tie_word_embeddings, model_type kept, no rope_theta).
SHAPES = {
    "minicpm-2b": {**_MINICPM, "hidden_size": 2304, "intermediate_size": 5760, "num_attention_heads": 36,
                   "num_key_value_heads": 36, "num_hidden_layers": 40, "vocab_size": 122753},
    "minicpm-1b": {**_MINICPM, "hidden_size": 1536, "intermediate_size": 3840, "num_attention_heads": 24,
                   "num_key_value_heads": 8, "num_hidden_layers": 52, "vocab_size": 73440, "rope_theta": 10000.0,
                   "tie_word_embeddings": True},
    "minicpm-s-1b": {**_MINICPM, "hidden_size": 1536, "intermediate_size": 3840, "num_attention_heads": 24,
                     "num_key_value_heads": 8, "num_hidden_layers": 52, "vocab_size": 73440, "rope_theta": 10000.0,
                     "tie_word_embeddings": True, "hidden_act": "fatrelu", "hidden_act_param": 0.03},
}
BUNDLED_TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "minicpm-tiny" / "tokenizer.model"


def _tensors(cfg: dict, gen: torch.Generator, dtype: torch.dtype):
    """(name, tensor) in checkpoint order, one at a time."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d

    def normal(*shape, std):
        return (torch.randn(*shape, generator=gen) * std).to(dtype)

    yield "model.embed_tokens.weight", normal(v, h, std=0.1 / cfg.get("scale_emb", 1))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (1 + normal(h, std=0.05).float()).to(dtype)
        for name, shape in (("q_proj", (h, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h)), ("o_proj", (h, h))):
            yield p + f"self_attn.{name}.weight", normal(*shape, std=h ** -0.5)
        yield p + "post_attention_layernorm.weight", (1 + normal(h, std=0.05).float()).to(dtype)
        for name, shape in (("gate_proj", (inter, h)), ("up_proj", (inter, h)), ("down_proj", (h, inter))):
            yield p + f"mlp.{name}.weight", normal(*shape, std=shape[1] ** -0.5)
    yield "model.norm.weight", (1 + normal(h, std=0.05).float()).to(dtype)


def write_synthetic(kind: str, out: Path, layers: int | None = None, seed: int = 0,
                    shard_mb: int = 1024, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a sharded safetensors checkpoint with `kind`'s shapes (optionally fewer layers); returns `out`."""
    if kind not in SHAPES:
        raise UserError(f"unknown synthetic model {kind!r}; choose from {', '.join(SHAPES)}")
    cfg = dict(SHAPES[kind])
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    size = 0
    files: list[str] = []
    weight_map: dict[str, str] = {}
    total = 0

    def flush():
        tmp = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(out / tmp), metadata={"format": "pt"})
        files.append(tmp)
        shard.clear()

    for name, t in _tensors(cfg, gen, dtype):
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > shard_mb * 2**20:
            flush()
            size = 0
        shard[name] = t
        size += nbytes
        total += nbytes
        weight_map[name] = str(len(files) + 1)
    flush()
    # rename to HF's model-0000k-of-0000n.safetensors now that n is known
    final = {}
    for k, tmp in enumerate(files, 1):
        fname = f"model-{k:05d}-of-{len(files):05d}.safetensors"
        (out / tmp).rename(out / fname)
        final[str(k)] = fname
    index = {"metadata": {"total_size": total}, "weight_map": {n: final[k] for n, k in weight_map.items()}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "tokenizer.model").write_bytes(padded_tokenizer(cfg["vocab_size"]))
    shutil.copy(BUNDLED_TOKENIZER.parent / "tokenizer_config.json", out / "tokenizer_config.json")
    return out


def padded_tokenizer(vocab_size: int) -> bytes:
    """The bundled SentencePiece model with UNUSED pieces appended up to `vocab_size` (one piece per embedding row,
    as exporters and llama.cpp require); it encodes text exactly as the bundled tokenizer does."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(BUNDLED_TOKENIZER.read_bytes())
    for i in range(len(proto.pieces), vocab_size):
        proto.pieces.add(piece=f"<unused_{i}>", score=0.0, type=pb.ModelProto.SentencePiece.UNUSED)
    return proto.SerializeToString()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Write a random-weight MiniCPM checkpoint with real shapes.")
    ap.add_argument("kind", choices=sorted(SHAPES))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the real model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-mb", type=int, default=1024)
    a = ap.parse_args(argv)
    print(write_synthetic(a.kind, a.out, a.layers, a.seed, a.shard_mb))


if __name__ == "__main__":
    main()
