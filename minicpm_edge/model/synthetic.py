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
# MiniCPM4 / 4.1 (MiniCPMForCausalLM + LongRoPE), MiniCPM-2B-128k (dynamic NTK), MiniCPM5 (llama format). Sources:
# MiniCPM4-8B: shape as in transformers' MiniCPM4 port (vocab 73448, hidden 4096, inter 16384, 32 layers) and its
#   HF model card (LongRoPE lists, original 32768, sparse_config); heads 32 / kv 2, rms 1e-6, untied, eos [2, 73440]
#   from memory of the published config.json, which could not be read here.
# MiniCPM4.1-8B: its config.json could not be read here; the MiniCPM4-8B architecture with max_position_embeddings and
#   original 65536 is assumed (unverified), the factor lists are MiniCPM4-8B's.
# MiniCPM4-0.5B: shape from a published copy of its config (hidden 1024, inter 4096, 24 layers, 16/2 heads, vocab
#   73448, muP 12 / 1.4 / 256); tied. Its own LongRoPE lists could not be read here: the 32 values are the lists OpenBMB
#   publishes for a head_dim-64 MiniCPM in its vLLM LongRoPE guide, not verified to be MiniCPM4-0.5B's.
# MiniCPM-2B-128k: 2B shape, vocab 122760, rope_theta 1e6, {"type": "dynamic", "factor": 4.0}, untied (issue 16);
#   max_position_embeddings was not found in any source here: 131072 (the model's name) is assumed.
# MiniCPM5-1B: LlamaForCausalLM, hidden 1536, inter 4608, 24 layers, 16 heads x head_dim 128 (!= 1536/16), 2 kv heads,
#   vocab 130560, rope_theta 5e6, rms 1e-6, untied, 131072 positions (published copies of its config); no
#   rope_scaling appears in any of them (null assumed); bos/eos 1/2 kept from the bundled tokenizer.
MINICPM4_8B_FACTORS = [
    0.9977997200264581, 1.014658295992452, 1.0349680404997148, 1.059429246056193, 1.0888815016813513,
    1.1243301355211495, 1.166977103606075, 1.2182568066927284, 1.2798772354275727, 1.3538666751582975,
    1.4426259039919596, 1.5489853358570191, 1.6762658237220625, 1.8283407612492941, 2.0096956085876183,
    2.225478927469756, 2.481536379650452, 2.784415934557119, 3.1413289096347365, 3.560047844772632, 4.048719380066383,
    4.752651957515948, 5.590913044973868, 6.584005926629993, 7.7532214876576155, 9.119754865903639,
    10.704443927019176, 12.524994176518703, 14.59739595363613, 16.93214476166354, 19.53823297353041,
    22.417131025031697, 25.568260840911098, 28.991144156566317, 32.68408069090375, 36.65174474170465,
    40.90396065611201, 45.4664008671033, 50.37147343433591, 55.6804490772103, 61.470816952306556, 67.8622707390618,
    75.00516023410414, 83.11898235973767, 92.50044360202462, 103.57086856690864, 116.9492274587385,
    118.16074567836519, 119.18497548708795, 120.04810876261652, 120.77352815196981, 121.38182790207875,
    121.89094985353891, 122.31638758099915, 122.6714244963338, 122.9673822552567, 123.21386397019609,
    123.41898278254268, 123.58957065488238, 123.73136519024158, 123.84917421274221, 123.94701903496814,
    124.02825801299717, 124.09569231686116]
HEAD64_FACTORS = [
    1.0004360675811768, 1.0668443441390991, 1.1631425619125366, 1.3025742769241333, 1.5040205717086792,
    1.7941505908966064, 2.2101221084594727, 2.802666664123535, 3.6389970779418945, 4.804192543029785, 6.39855432510376,
    8.527148246765137, 11.277542114257812, 14.684998512268066, 18.69317054748535, 23.13019371032715,
    27.72362518310547, 32.1606559753418, 36.168827056884766, 39.57627868652344, 42.32667541503906, 44.45526885986328,
    46.04962921142578, 47.21482849121094, 48.05115509033203, 48.64370346069336, 49.05967712402344, 49.34980392456055,
    49.551246643066406, 49.69068145751953, 49.78697967529297, 49.85338592529297]


def _longrope(factors: list, original: int) -> dict:
    return {"rope_type": "longrope", "long_factor": list(factors), "short_factor": list(factors),
            "original_max_position_embeddings": original}


_SPARSE = {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64, "window_size": 2048, "topk": 64,
           "use_nope": False, "dense_len": 8192}
_MINICPM4 = {**_MINICPM, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "vocab_size": 73448, "eos_token_id": [2, 73440],
             "max_position_embeddings": 32768}
SHAPES.update({
    "minicpm4-0.5b": {**_MINICPM4, "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                      "num_key_value_heads": 2, "num_hidden_layers": 24, "tie_word_embeddings": True,
                      "rope_scaling": _longrope(HEAD64_FACTORS, 32768)},
    "minicpm4-8b": {**_MINICPM4, "hidden_size": 4096, "intermediate_size": 16384, "num_attention_heads": 32,
                    "num_key_value_heads": 2, "num_hidden_layers": 32, "tie_word_embeddings": False,
                    "rope_scaling": _longrope(MINICPM4_8B_FACTORS, 32768), "sparse_config": _SPARSE},
    "minicpm4.1-8b": {**_MINICPM4, "hidden_size": 4096, "intermediate_size": 16384, "num_attention_heads": 32,
                      "num_key_value_heads": 2, "num_hidden_layers": 32, "tie_word_embeddings": False,
                      "max_position_embeddings": 65536, "rope_scaling": _longrope(MINICPM4_8B_FACTORS, 65536),
                      "sparse_config": _SPARSE},
    "minicpm-2b-128k": {**_MINICPM, "hidden_size": 2304, "intermediate_size": 5760, "num_attention_heads": 36,
                        "num_key_value_heads": 36, "num_hidden_layers": 40, "vocab_size": 122760,
                        "rope_theta": 1e6, "max_position_embeddings": 131072, "tie_word_embeddings": False,
                        "rope_scaling": {"type": "dynamic", "factor": 4.0}},
    "minicpm5-1b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                    "hidden_size": 1536, "intermediate_size": 4608, "num_attention_heads": 16, "head_dim": 128,
                    "num_key_value_heads": 2, "num_hidden_layers": 24, "vocab_size": 130560, "rope_theta": 5e6,
                    "rms_norm_eps": 1e-6, "max_position_embeddings": 131072, "tie_word_embeddings": False,
                    "rope_scaling": None, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"},
})
# MiniCPM3-4B (MiniCPM3ForCausalLM, multi-head latent attention): values as published copies of its config.json give
# them (hidden 2560, inter 6400, 62 layers, 40 heads, q_lora 768, kv_lora 256, nope 64, rope 32, v_head_dim absent
# = 2560/40 = 64, vocab 73448, muP 12 / 1.4 / 256, rms 1e-5, 32768 positions, eos [2, 73440]); tied. Its LongRoPE
# short and long lists are equal (16 values for qk_rope_head_dim 32), original 32768 = max_position_embeddings.
MINICPM3_FACTORS = [
    1.0591234137867171, 1.1241891283591912, 1.2596935748670968, 1.5380380402321725, 2.093982484148734,
    3.1446935121267696, 4.937952647693647, 7.524541999994549, 10.475458000005451, 13.062047352306353,
    14.85530648787323, 15.906017515851266, 16.461961959767827, 16.740306425132907, 16.87581087164081,
    16.940876586213285]
SHAPES["minicpm3-4b"] = {
    **_MINICPM, "architectures": ["MiniCPM3ForCausalLM"], "model_type": "minicpm3", "hidden_size": 2560,
    "intermediate_size": 6400, "num_attention_heads": 40, "num_key_value_heads": 40, "num_hidden_layers": 62,
    "q_lora_rank": 768, "kv_lora_rank": 256, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "vocab_size": 73448,
    "rope_theta": 10000.0, "max_position_embeddings": 32768, "tie_word_embeddings": True, "eos_token_id": [2, 73440],
    "rope_scaling": {"type": "longrope", "long_factor": MINICPM3_FACTORS, "short_factor": MINICPM3_FACTORS,
                     "original_max_position_embeddings": 32768}}
BUNDLED_TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "minicpm-tiny" / "tokenizer.model"


def _tensors(cfg: dict, gen: torch.Generator, dtype: torch.dtype):
    """(name, tensor) in checkpoint order, one at a time."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = cfg.get("kv_channels") or cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    mla = cfg.get("kv_lora_rank") and _mla_shapes(cfg)

    def normal(*shape, std):
        return (torch.randn(*shape, generator=gen) * std).to(dtype)

    yield "model.embed_tokens.weight", normal(v, h, std=0.1 / cfg.get("scale_emb", 1))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (1 + normal(h, std=0.05).float()).to(dtype)
        if mla:  # MiniCPM3: the latent norms, then the five attention Linears
            linears, norms = mla
            for name, width in norms.items():
                yield p + f"{name}.weight", (1 + normal(width, std=0.05).float()).to(dtype)
            for name, shape in linears.items():
                yield p + f"{name}.weight", normal(*shape, std=shape[1] ** -0.5)
        else:
            for name, shape in (("q_proj", (q, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h)), ("o_proj", (h, q))):
                yield p + f"self_attn.{name}.weight", normal(*shape, std=h ** -0.5)
        yield p + "post_attention_layernorm.weight", (1 + normal(h, std=0.05).float()).to(dtype)
        for name, shape in (("gate_proj", (inter, h)), ("up_proj", (inter, h)), ("down_proj", (h, inter))):
            yield p + f"mlp.{name}.weight", normal(*shape, std=shape[1] ** -0.5)
    yield "model.norm.weight", (1 + normal(h, std=0.05).float()).to(dtype)
    if cfg.get("tie_word_embeddings") is False:
        yield "lm_head.weight", normal(v, h, std=h ** -0.5)


def _mla_shapes(cfg: dict) -> tuple[dict, dict]:
    """MiniCPM3's attention Linears (out, in) and latent norm widths, from ModelConfig."""
    from .config import parse_config

    c = parse_config(cfg)
    linears = {k: v for k, v in c.linear_shapes().items() if k.startswith("self_attn.")}
    norms = {k: v for k, v in c.norm_shapes().items() if k.startswith("self_attn.")}
    return linears, norms


def write_synthetic(kind: str, out: Path, layers: int | None = None, seed: int = 0,
                    shard_mb: int = 1024, dtype: torch.dtype = torch.bfloat16, vocab: int | None = None) -> Path:
    """Write a sharded safetensors checkpoint with `kind`'s shapes (optionally fewer layers, or fewer embedding rows
    than the real vocabulary: every other width stays real); returns `out`."""
    if kind not in SHAPES:
        raise UserError(f"unknown synthetic model {kind!r}; choose from {', '.join(SHAPES)}")
    cfg = dict(SHAPES[kind])
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    if vocab is not None:
        if vocab < 4096:
            raise UserError(f"--vocab {vocab}: the bundled tokenizer needs at least 4096 rows")
        cfg["vocab_size"] = vocab
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
    ap.add_argument("--vocab", type=int, default=None, help="fewer embedding rows than the real vocabulary")
    a = ap.parse_args(argv)
    print(write_synthetic(a.kind, a.out, a.layers, a.seed, a.shard_mb, vocab=a.vocab))


if __name__ == "__main__":
    main()
