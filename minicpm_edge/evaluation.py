"""Quality of a quantised artifact against its reference: perplexity drift, KL divergence, top-1 agreement.

Both models see the same token windows; every figure is paired position by position. Two perplexity conventions
(FORMATS.md section 5), named in every report:
- `llama`: llama-perplexity's. The text is tokenised once; chunks of n_ctx tokens, each chunk's first token replaced
  by BOS, only the second half of each chunk scored (n_ctx - 1 - n_ctx/2 predictions per chunk).
- `gptq`: the GPTQ papers'. Non-overlapping windows of n_ctx tokens, every position scored (n_ctx - 1 predictions).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from . import calib
from .errors import UserError

METHODS = ("llama", "gptq")


def eval_text(data: str | Path | None) -> str:
    """The evaluation text: bundled held-out documents (None) or a .txt/.jsonl file or folder, documents joined by blank lines."""
    docs = calib.heldout_documents() if data is None else calib.load_documents(data)
    return "\n\n".join(docs)


def windows(tokens: list[int], ctx: int, method: str, bos_id: int | None) -> list[tuple[list[int], int]]:
    """(window ids, first scored position) per chunk; position j predicts ids[j + 1]. With the llama convention each
    chunk starts with BOS, unless the tokenizer adds none (bos_id None), as llama-perplexity does."""
    if method not in METHODS:
        raise UserError(f"unknown perplexity method {method!r}; choose llama or gptq")
    if ctx < 8:
        raise UserError(f"--ctx {ctx} is too small (at least 8)")
    n = len(tokens) // ctx
    if n == 0:
        raise UserError(f"evaluation text has {len(tokens)} tokens, fewer than one window of --ctx {ctx}")
    out = []
    for k in range(n):
        ids = list(tokens[k * ctx:(k + 1) * ctx])
        if method == "llama":
            if bos_id is not None:
                ids[0] = bos_id
            out.append((ids, ctx // 2))
        else:
            out.append((ids, 0))
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(ref, quant, tokens: list[int], ctx: int = 512, method: str = "llama", bos_id: int | None = 1,
            max_chunks: int | None = None, on_chunk=None) -> dict:
    """Score both runners on the same windows. Returns the report dict (PPL, drift, KL, top-1)."""
    chunks = windows(tokens, ctx, method, bos_id)[:max_chunks]
    nll_r, nll_q, kl, top1, chunk_ppl = [], [], [], [], []
    for k, (ids, first) in enumerate(chunks):
        targets = np.asarray(ids[first + 1:])
        pos = np.arange(len(targets))
        lr = _log_softmax(ref.logits(ids)[first:-1])
        lq = _log_softmax(quant.logits(ids)[first:-1])
        nll_r.append(-lr[pos, targets])
        nll_q.append(-lq[pos, targets])
        kl.append((np.exp(lr) * (lr - lq)).sum(-1))
        top1.append(lr.argmax(-1) == lq.argmax(-1))
        chunk_ppl.append((float(np.exp(nll_r[-1].mean())), float(np.exp(nll_q[-1].mean()))))
        if on_chunk:
            on_chunk(k + 1, len(chunks))
    nll_r, nll_q, kl, top1 = map(np.concatenate, (nll_r, nll_q, kl, top1))
    ppl_r, ppl_q = float(np.exp(nll_r.mean())), float(np.exp(nll_q.mean()))
    diff = nll_q - nll_r  # paired: the drift's uncertainty comes from the per-position differences
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    return {
        "method": method, "ctx": ctx, "chunks": len(chunks), "tokens_scored": int(len(nll_r)),
        "ref": {"ppl": ppl_r, "runtime": getattr(ref, "name", "?")},
        "quant": {"ppl": ppl_q, "runtime": getattr(quant, "name", "?")},
        "drift": ppl_q / ppl_r - 1, "drift_se": float(math.exp(diff.mean()) * se),
        "kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)), "kl_max": float(kl.max()),
        "top1": float(top1.mean()), "chunk_ppl": chunk_ppl,
    }


def evaluate(ref_path: Path, quant_path: Path, data=None, ctx: int = 512, method: str = "llama",
             runtime: str | None = None, ref_runtime: str | None = None, max_chunks: int | None = None,
             threads: int | None = None, on_chunk=None) -> dict:
    """Open both artifacts in their runtimes, tokenise the evaluation text with the reference's tokenizer, compare."""
    from .model import Checkpoint, Tokenizer
    from .model.hub import resolve_model
    from .model.tokenizer import TOKENIZER_NAMES
    from .runtimes import open_runner

    ref_path, quant_path = resolve_model(ref_path), resolve_model(quant_path)

    tok_dir = Path(ref_path) if Path(ref_path).is_dir() else Path(quant_path)
    if not any((tok_dir / n).is_file() for n in TOKENIZER_NAMES):
        raise UserError(f"{tok_dir}: no tokenizer.model or tokenizer.json (needed to tokenise the evaluation text)")
    tok = Tokenizer(tok_dir)
    tokens = tok.encode(eval_text(data), bos=True)
    ref = open_runner(ref_path, ref_runtime, threads=threads, n_ctx=ctx)
    quant = None
    try:
        quant = open_runner(quant_path, runtime, threads=threads, n_ctx=ctx)
        if ref.vocab_size != quant.vocab_size:
            raise UserError(f"vocabularies differ: {ref_path} has {ref.vocab_size}, {quant_path} has {quant.vocab_size}")
        tok.check_vocab(ref.vocab_size)
        report = compare(ref, quant, tokens, ctx, method, tok.bos_id if tok.add_bos else None, max_chunks, on_chunk)
    finally:  # both models go before the next one is loaded (sweeps evaluate many)
        for r in (ref, quant):
            if r is not None:
                r.close()
    report["ref"]["path"], report["quant"]["path"] = str(ref_path), str(quant_path)
    report["data"] = "bundled held-out" if data is None else str(data)
    if report["quant"]["runtime"] == "torch" and Path(quant_path).is_dir():
        with Checkpoint(quant_path) as ckpt:
            q = ckpt.quant
        if q and q["kind"] == "ggml":
            report["quantization"] = {"format": q["format"], "method": q["raw"].get("meta", {}).get("method", "gptq")}
        elif q:
            report["quantization"] = {"bits": q["spec"].bits, "group_size": q["spec"].group_size, "sym": q["spec"].sym,
                                      "method": q["raw"].get("meta", {}).get("method", "gptq")}
    return report


def gate(report: dict, max_drift: float) -> str | None:
    """The CI gate: a message when the relative PPL drift exceeds max_drift, else None."""
    if not math.isfinite(report["drift"]) or report["drift"] > max_drift:
        return (f"PPL drift {report['drift']:+.2%} exceeds --max-drift {max_drift:.2%} "
                f"({report['ref']['ppl']:.3f} -> {report['quant']['ppl']:.3f}, {report['method']} ctx {report['ctx']})")
    return None


# -- MiniCPM-S: activation sparsity ------------------------------------------------------------------
def sparsity(model_path: Path, tokens: list[int], ctx: int, max_chunks: int | None = None) -> list[float]:
    """Fraction of exactly-zero FFN activations act(gate(x)) per layer, over non-overlapping windows (torch forward)."""
    import torch

    from .model import Checkpoint, load_model

    with Checkpoint(model_path) as ckpt:
        if ckpt.config.hidden_act not in ("relu", "fatrelu"):
            raise UserError(f"{model_path}: --sparsity needs a ReLU or FATReLU model (this one uses {ckpt.config.hidden_act})")
        model = load_model(ckpt)
    zeros = [0] * len(model.layers)
    total = [0] * len(model.layers)

    def hook(i):
        def fn(module, inputs, out):
            a = model.layers[i].mlp.activation(out)
            zeros[i] += int((a == 0).sum())
            total[i] += a.numel()
        return fn

    handles = [layer.mlp.gate_proj.register_forward_hook(hook(i)) for i, layer in enumerate(model.layers)]
    try:
        with torch.no_grad():
            for ids, _ in windows(tokens, ctx, "gptq", 1)[:max_chunks]:
                model(torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    return [z / t for z, t in zip(zeros, total)]


# -- the sweep: method x bits x group size ---------------------------------------------------------------
def sweep(ref_path: Path, work: Path, grid: list[tuple[str, int, int]], data=None, ctx: int = 512, method: str = "llama",
          nsamples: int = 128, seqlen: int = 512, max_chunks: int | None = None, on_item=None) -> list[dict]:
    """Quantise `ref_path` once per (method, bits, group) into `work` (reused when already there) and evaluate each."""
    from .quant import QuantSpec
    from .quant.driver import QuantOptions, quantize_checkpoint

    rows = []
    for qmethod, bits, group in grid:
        out = Path(work) / f"{Path(ref_path).name}-{qmethod}-w{bits}g{group}"
        if not (out / "quant_report.json").is_file():
            opts = QuantOptions(spec=QuantSpec(bits, group, True), method=qmethod, nsamples=nsamples, seqlen=seqlen)
            quantize_checkpoint(ref_path, out, opts, force=True)
        r = evaluate(ref_path, out, data, ctx, method, max_chunks=max_chunks)
        r.pop("chunk_ppl")
        r.update(quant_method=qmethod, bits=bits, group_size=group)
        rows.append(r)
        if on_item:
            on_item(r)
    return rows


def parse_grid(spec: str) -> list[tuple[str, int, int]]:
    """'gptq,rtn:3,4:32,128' -> every (method, bits, group) combination."""
    try:
        methods, bits, groups = spec.split(":")
        grid = [(m, int(b), int(g)) for m in methods.split(",") for b in bits.split(",") for g in groups.split(",")]
    except ValueError:
        raise UserError(f"--grid {spec!r}: expected METHODS:BITS:GROUPS, e.g. gptq,rtn:3,4:32,128") from None
    for m, _, _ in grid:
        if m not in ("gptq", "rtn"):
            raise UserError(f"--grid: unknown method {m!r} (gptq or rtn)")
    return grid


# -- plots --------------------------------------------------------------------------------------------------
def plot_report(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref, quant = zip(*report["chunk_ppl"])
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(ref, label=f"reference ({report['ref']['runtime']})", marker=".")
    ax.plot(quant, label=f"quantised ({report['quant']['runtime']})", marker=".")
    ax.set_xlabel("chunk")
    ax.set_ylabel("perplexity")
    ax.set_title(f"PPL {report['ref']['ppl']:.2f} -> {report['quant']['ppl']:.2f} ({report['drift']:+.2%}), "
                 f"KL {report['kl_mean']:.4f}, top-1 {report['top1']:.3f}\n"
                 f"{report['method']} convention, ctx {report['ctx']}, {report['tokens_scored']} tokens", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    configs = sorted({(r["bits"], r["group_size"]) for r in rows}, key=lambda c: (-c[0], c[1]))
    labels = [f"w{b}g{g}" for b, g in configs]
    x = np.arange(len(configs))
    for k, m in enumerate(sorted({r["quant_method"] for r in rows})):
        by = {(r["bits"], r["group_size"]): r for r in rows if r["quant_method"] == m}
        for ax, key, scale in ((axes[0], "drift", 100), (axes[1], "kl_mean", 1)):
            ax.bar(x + 0.4 * k - 0.2, [by[c][key] * scale if c in by else 0 for c in configs], 0.4, label=m)
    axes[0].set_ylabel("PPL drift (%)")
    axes[1].set_ylabel("mean KL divergence (nats)")
    for ax in axes:
        ax.set_xticks(x, labels)
        ax.legend()
    r0 = rows[0]
    fig.suptitle(f"{Path(r0['ref']['path']).name}: {r0['method']} convention, ctx {r0['ctx']}, "
                 f"{r0['tokens_scored']} tokens", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
