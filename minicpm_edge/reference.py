"""Train the bundled reference model: a tiny MiniCPM with real muP scaling, GQA, tied embeddings and a bilingual
SentencePiece BPE tokenizer, on text every machine with the project has (Python standard library docstrings and the
bundled calibration set). Seeded and reproducible for a given Python version: `make reference-model`.

Held out from training (and from calibration): `calib_data/heldout/` and the docstrings of one module in ten.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import random
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from . import calib
from .model import Checkpoint, Tokenizer, load_model, parse_config
from .model.forward import MiniCPM

DEFAULT_DIR = Path(__file__).resolve().parent / "assets" / "minicpm-tiny"
# The files the shipped model was trained and evaluated on; the calibration set may grow, the training text may not.
TRAIN_FILES = ("core_chat.jsonl", "core_code.txt", "core_prose_en.txt", "core_prose_zh.txt", "core_translation.jsonl",
               "math_drills.txt")
HELDOUT_FILES = ("core_en.txt", "core_zh.txt")
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo", "ensurepip", "__pycache__", "dist-packages"}

CONFIG = {
    "architectures": ["MiniCPMForCausalLM"],
    "model_type": "minicpm",
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 640,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "hidden_act": "silu",
    "scale_emb": 12,
    "scale_depth": 1.4,
    "dim_model_base": 64,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}


def stdlib_docstrings(held_out: bool) -> list[str]:
    """Docstrings of the standard library's modules, classes and functions (parsed, never imported)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if SKIP_DIRS & set(path.relative_to(root).parts[:-1]):
            continue
        if (zlib.crc32(rel.encode()) % 10 == 0) != held_out:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc and len(doc) >= 40:
                    docs.append(doc)
    return docs


def train_tokenizer(docs: list[str], out: Path, vocab_size: int) -> Tokenizer:
    """BPE with byte fallback, identity normalisation and whitespace kept (what llama.cpp reproduces exactly)."""
    lines = [line for d in docs for line in d.split("\n") if line.strip()]
    random.Random(0).shuffle(lines)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(out / "tokenizer"), model_type="bpe",
        vocab_size=vocab_size, character_coverage=0.9995, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        split_digits=True, allow_whitespace_only_pieces=True, user_defined_symbols=["<用户>", "<AI>"],
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentence_length=16384, num_threads=2,
        input_sentence_size=2_000_000, shuffle_input_sentence=False, minloglevel=2,
    )
    (out / "tokenizer.vocab").unlink(missing_ok=True)
    return Tokenizer(out / "tokenizer.model")


def init_weights(model: MiniCPM, std: float = 0.02) -> None:
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        else:
            torch.nn.init.normal_(p, std=std)


def nll(model: MiniCPM, ids: torch.Tensor) -> torch.Tensor:
    logits, _ = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


@torch.no_grad()
def window_ppl(model: MiniCPM, ids: list[int], seqlen: int) -> tuple[float, int]:
    """Non-overlapping windows, every position scored (the GPTQ papers' convention)."""
    total, count = 0.0, 0
    for s in range(0, len(ids) - 1, seqlen):
        w = torch.tensor([ids[s:s + seqlen + 1]])
        if w.shape[1] < 2:
            break
        logits, _ = model(w[:, :-1])
        total += F.cross_entropy(logits[0].float(), w[0, 1:], reduction="sum").item()
        count += w.shape[1] - 1
    return math.exp(total / count), count


def unigram_ppl(train_ids: list[int], eval_ids: list[int], vocab: int) -> float:
    """Add-one smoothed unigram model estimated on the training tokens, scored on the same positions."""
    counts = np.bincount(np.asarray(train_ids), minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(math.exp(-logp[np.asarray(eval_ids[1:])].mean()))


def train(model: MiniCPM, train_ids: list[int], steps: int, batch: int, seqlen: int, lr: float, seed: int,
          t0: float, weight_decay: float = 0.1, log_every: int = 50) -> list[float]:
    """AdamW with warm-up and cosine decay on random windows of `train_ids`; returns each step's loss."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) *
                                              (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    data = torch.tensor(train_ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(data) - seqlen - 1, (batch,), generator=gen)
        ids = torch.stack([data[s:s + seqlen + 1] for s in starts.tolist()])
        loss = nll(model, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step:5d} loss {loss.item():.3f} lr {sched.get_last_lr()[0]:.2e} {time.time() - t0:.0f}s", flush=True)
    model.eval()
    return losses


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    calib_docs = [d for f in TRAIN_FILES for d in calib.read_file(calib.CALIB_DIR / f)]
    train_docs = stdlib_docstrings(held_out=False) + calib_docs
    heldout_docs = [d for f in HELDOUT_FILES for d in calib.read_file(calib.HELDOUT_DIR / f)] + stdlib_docstrings(held_out=True)
    tok = train_tokenizer(train_docs, out, CONFIG["vocab_size"])
    train_ids = calib.token_stream(tok, train_docs)
    heldout_ids = calib.token_stream(tok, heldout_docs)[:40000]
    print(f"tokenizer: {tok.vocab_size} pieces; train {len(train_ids)} tokens; held-out {len(heldout_ids)} tokens")

    cfg = parse_config(CONFIG, has_lm_head=False)
    model = MiniCPM(cfg)
    init_weights(model)
    losses = train(model, train_ids, args.steps, args.batch, args.seqlen, args.lr, args.seed, t0)
    train_s = time.time() - t0

    state = {f"model.{k}": v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "chat_template": None}, indent=2) + "\n")
    shipped = load_model(Checkpoint(out))  # evaluate what ships: the bf16 weights
    ppl, n = window_ppl(shipped, heldout_ids, args.seqlen)
    uni = unigram_ppl(train_ids, heldout_ids, tok.vocab_size)
    n_params = sum(p.numel() for p in shipped.parameters())
    report = {"params": n_params, "train_tokens_seen": args.steps * args.batch * args.seqlen,
              "train_corpus_tokens": len(train_ids), "steps": args.steps, "batch": args.batch, "seqlen": args.seqlen,
              "seconds": round(train_s, 1), "heldout_tokens": n, "heldout_ppl": round(ppl, 3),
              "unigram_ppl": round(uni, 3), "final_loss": round(float(np.mean(losses[-50:])), 4),
              "python": sysconfig.get_python_version(), "seed": args.seed, "losses": [round(x, 4) for x in losses]}
    (out / "training.json").write_text(json.dumps(report) + "\n")
    plot_loss(losses, out / "loss.png")
    write_card(out, report)
    print(f"held-out PPL {ppl:.2f} (unigram {uni:.2f}) on {n} tokens; {n_params} params; {train_s:.0f}s")


# -- a small trained MiniCPM3 (multi-head latent attention): the bundled model converted, then fine-tuned ----------

def mla_config(cfg: dict, nope: int = 32) -> dict:
    """The MiniCPM3 config that holds `cfg`'s GQA attention exactly (to_mla), with llama.cpp's fixed muP constants.

    Full-rank latents (q_lora_rank = kv_lora_rank = hidden_size), every KV head's rotary key in the one shared rope
    key (qk_rope_head_dim = kv_heads x head_dim), its frequencies set through LongRoPE factors (short = long), a
    `nope`-wide non-rotary part, v_head_dim = head_dim; dim_model_base 256 (llama.cpp's minicpm3 graph fixes it:
    the logit scale difference is folded into the final norm)."""
    m, d = cfg["num_key_value_heads"], cfg["hidden_size"] // cfg["num_attention_heads"]
    big, half = m * d, d // 2
    theta = cfg.get("rope_theta", 10000.0)
    # rope index i = g * d/2 + j must turn at the original head's frequency j: theta^(-2j/d) = base_i / factor_i
    factors = [theta ** (-2 * i / big) / theta ** (-2 * (i % half) / d) for i in range(big // 2)]
    out = {k: v for k, v in cfg.items() if k not in ("rope_scaling", "architectures", "model_type")}
    return {"architectures": ["MiniCPM3ForCausalLM"], "model_type": "minicpm3", **out,
            "num_key_value_heads": cfg["num_attention_heads"], "q_lora_rank": cfg["hidden_size"],
            "kv_lora_rank": cfg["hidden_size"], "qk_nope_head_dim": nope, "qk_rope_head_dim": big, "v_head_dim": d,
            "dim_model_base": 256, "rope_scaling": {"rope_type": "longrope", "short_factor": factors,
                                                    "long_factor": factors, "original_max_position_embeddings":
                                                    cfg["max_position_embeddings"]}}


@torch.no_grad()
def to_mla(src: MiniCPM, raw: dict, nope: int = 32, seed: int = 0) -> MiniCPM:
    """A MiniCPM3 with the same function as the GQA model `src` (up to the latent norms' eps).

    The input norm's weight moves into the projections (the norm itself becomes 1, so the layer input has unit RMS);
    q_a_proj and the latent half of kv_a_proj are the identity, their norms 1 (an RMS-1 input passes unchanged);
    q_b / kv_b / the rope rows of kv_a hold q, v and k, each head's rotary dims placed in its KV head's slot of the
    shared rope key; q is scaled by sqrt(qk_head_dim / head_dim) for MLA's softmax scale. The non-rotary query rows
    are 0 and the key rows small and random, so q_nope . k_nope = 0 and fine-tuning has a gradient there."""
    c = src.cfg
    new = MiniCPM(parse_config(mla_config(raw, nope), has_lm_head=src.lm_head is not None))
    n, m, d, h = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
    half, big = d // 2, m * d
    gen = torch.Generator().manual_seed(seed)
    new.embed_tokens.weight.copy_(src.embed_tokens.weight)
    new.norm.weight.copy_(src.norm.weight * new.cfg.logit_scale / c.logit_scale)
    if src.lm_head is not None:
        new.lm_head.weight.copy_(src.lm_head.weight)

    def slot(g):  # rows of the shared rope key that hold KV head g's rotary dims (rotate-half pairs kept)
        return torch.cat([g * half + torch.arange(half), big // 2 + g * half + torch.arange(half)])

    for a, b in zip(src.layers, new.layers):
        b.load_state_dict({k: v for k, v in a.state_dict().items() if not k.startswith(("self_attn.", "input_"))},
                          strict=False)
        w_in = a.input_layernorm.weight
        sa, sb = a.self_attn, b.self_attn
        q, k, v = (x.weight * w_in for x in (sa.q_proj, sa.k_proj, sa.v_proj))
        eye = torch.eye(h)
        sb.q_a_proj.weight.copy_(eye)
        qb = torch.zeros(n, nope + big, h)
        kv_a = torch.zeros(h + big, h)
        kv_a[:h] = eye
        kvb = torch.zeros(n, nope + d, h)
        kvb[:, :nope] = torch.randn(n, nope, h, generator=gen) * h ** -0.5
        for hd in range(n):
            g = hd // (n // m)
            qb[hd, nope + slot(g)] = q[hd * d:(hd + 1) * d] * math.sqrt((nope + big) / d)
            kvb[hd, nope:] = v[g * d:(g + 1) * d]
        for g in range(m):
            kv_a[h + slot(g)] = k[g * d:(g + 1) * d]
        sb.q_b_proj.weight.copy_(qb.reshape(-1, h))
        sb.kv_a_proj_with_mqa.weight.copy_(kv_a)
        sb.kv_b_proj.weight.copy_(kvb.reshape(-1, h))
        sb.o_proj.weight.copy_(sa.o_proj.weight)
    return new.eval()


def save_model(model: MiniCPM, config: dict, out: Path, tokenizer_from: Path) -> None:
    """bf16 safetensors + config.json + the tokenizer files of `tokenizer_from`."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    state = {f"model.{k}": v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, out / name)


def make_mla_model(out: Path, steps: int = 12, batch: int = 4, seqlen: int = 128, lr: float = 3e-4, seed: int = 0,
                   nope: int = 32, src: Path = DEFAULT_DIR) -> dict:
    """The bundled model converted to MiniCPM3's latent attention (to_mla), then fine-tuned for `steps` on its own
    training text (the calibration part: no docstring scan, so it stays about a minute on 2 cores), written to `out`.
    Returns a summary (held-out PPL of the source, the conversion and the fine-tuned model; seconds)."""
    t0 = time.time()
    torch.manual_seed(seed)
    ckpt = Checkpoint(src)
    tok = Tokenizer(ckpt.tokenizer_path)
    base = load_model(ckpt)
    model = to_mla(base, ckpt.config.raw, nope, seed)
    docs = [d for f in TRAIN_FILES for d in calib.read_file(calib.CALIB_DIR / f)]
    heldout = calib.token_stream(tok, [d for f in HELDOUT_FILES for d in calib.read_file(calib.HELDOUT_DIR / f)])
    heldout = heldout[:2560]
    ppl_converted, _ = window_ppl(model, heldout, seqlen)  # = the GQA model's (test_mla checks the logits)
    losses = train(model, calib.token_stream(tok, docs), steps, batch, seqlen, lr, seed, t0, weight_decay=0.0,
                   log_every=max(1, steps // 4))
    config = mla_config(ckpt.config.raw, nope)
    save_model(model, config, Path(out), src)
    ppl, n = window_ppl(load_model(Checkpoint(out)), heldout, seqlen)
    return {"steps": steps, "batch": batch, "seqlen": seqlen, "heldout_tokens": n, "ppl_converted": round(ppl_converted, 3), "ppl_finetuned": round(ppl, 3),
            "final_loss": round(float(np.mean(losses[-10:])), 4), "seconds": round(time.time() - t0, 1)}


def plot_loss(losses: list[float], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, lw=0.6, alpha=0.5, label="batch loss")
    k = 25
    if len(losses) > k:
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(range(k - 1, len(losses)), smooth, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title("minicpm-tiny training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_card(out: Path, r: dict) -> None:
    c = CONFIG
    (out / "MODEL_CARD.md").write_text(f"""# minicpm-tiny: the bundled reference model

A {r['params'] / 1e6:.2f}M-parameter MiniCPM trained by `make reference-model` (`python -m minicpm_edge.reference`),
so that quantisation drift is measured on a trained model, not random weights. Not a useful chat model.

| | |
|---|---|
| architecture | MiniCPMForCausalLM, {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, intermediate {c['intermediate_size']}, {c['num_attention_heads']} heads / {c['num_key_value_heads']} KV heads (GQA), SiLU |
| muP | scale_emb {c['scale_emb']}, scale_depth {c['scale_depth']}, dim_model_base {c['dim_model_base']} (logits / {c['hidden_size'] // c['dim_model_base']}), tied embeddings |
| tokenizer | SentencePiece BPE, {c['vocab_size']} pieces, byte fallback, identity normaliser, `<用户>` and `<AI>` pieces |
| weights | bf16 safetensors |
| training text | Python {r['python']} standard-library docstrings (9 modules in 10) + `calib_data/` {', '.join(TRAIN_FILES)} ({r['train_corpus_tokens']} tokens) |
| training | {r['steps']} steps x {r['batch']} x {r['seqlen']} tokens = {r['train_tokens_seen']} tokens, AdamW, seed {r['seed']}, {r['seconds']:.0f} s on 2 CPU cores |
| held-out text | `calib_data/heldout/` {', '.join(HELDOUT_FILES)} + docstrings of the held-out modules: {r['heldout_tokens']} tokens scored |
| held-out PPL | **{r['heldout_ppl']:.2f}** (non-overlapping {r['seqlen']}-token windows, every position scored, bf16 weights) |
| unigram PPL | {r['unigram_ppl']:.2f} (add-one unigram estimated on the training tokens, same positions) |

![loss](loss.png)
""")


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["mla"]:  # python -m minicpm_edge.reference mla OUT [STEPS]
        print(json.dumps(make_mla_model(Path(sys.argv[2]), *map(int, sys.argv[3:4]))))
    else:
        main()
