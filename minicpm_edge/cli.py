"""The `minicpm-edge` command line: parses options and calls the pipeline; no logic of its own."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import UserError
from .model.synthetic import BUNDLED_TOKENIZER

BUNDLED_MODEL = BUNDLED_TOKENIZER.parent
console = Console()
err = Console(stderr=True)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="MiniCPM checkpoints in, int4 artifacts for Android and iOS out, with proof that quality held.")
bench_app = typer.Typer(no_args_is_help=True, help="Tokens/s here, device kits for phones, and ingest of their results.")
app.add_typer(bench_app, name="bench")


class Method(str, Enum):
    gptq = "gptq"
    rtn = "rtn"


class Target(str, Enum):
    android = "android"
    harmony = "harmony"
    ios = "ios"
    onnx = "onnx"


def _not_yet(what: str, issue: int) -> None:
    err.print(f"error: {what} is not built yet (tracked as issue {issue})", highlight=False)
    raise typer.Exit(2)


def _version(value: bool):
    if value:
        console.print(f"minicpm-edge {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version.")):
    pass


@app.command()
def quantize(
    model: Path = typer.Argument(BUNDLED_MODEL, help="HF checkpoint directory (default: the bundled model)."),
    bits: int = typer.Option(4, help="Bits per weight: 2, 3, 4 or 8."),
    group_size: int = typer.Option(32, help="Group size along the input dimension (-1: per channel)."),
    sym: bool = typer.Option(True, "--sym/--asym", help="Symmetric (every target) or asymmetric grid."),
    method: Method = typer.Option(Method.gptq, help="gptq (Hessian error updates) or rtn (round to nearest)."),
    calib: Optional[str] = typer.Option(None, help="Calibration text: .txt/.jsonl file, folder, wikitext2 or c4."),
    nsamples: int = typer.Option(128, help="Calibration samples."),
    seqlen: int = typer.Option(512, help="Tokens per calibration sample."),
    damp: float = typer.Option(0.01, help="Hessian damping as a fraction of its mean diagonal."),
    device: str = typer.Option("cpu", help="cpu, or cuda where present."),
    out: Optional[Path] = typer.Option(None, help="Output checkpoint directory."),
    resume: bool = typer.Option(False, help="Continue an interrupted run in --out."),
    force: bool = typer.Option(False, help="Replace an existing --out."),
    act_order: bool = typer.Option(False, help="Quantise columns by decreasing Hessian diagonal (with static groups)."),
    static_groups: bool = typer.Option(False, help="Fix group parameters before the error updates."),
    mse: bool = typer.Option(False, help="Search the clipping range that minimises the rounding error."),
):
    """GPTQ int4 group quantisation, layer by layer, on CPU."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .model import Checkpoint
    from .quant.driver import QuantOptions, quantize_checkpoint
    from .quant.grid import QuantSpec

    opts = QuantOptions(spec=QuantSpec(bits, group_size, sym), method=method.value, damp=damp, nsamples=nsamples,
                        seqlen=seqlen, calib=calib, act_order=act_order, static_groups=static_groups or act_order,
                        mse=mse, device=device)
    if out is None:
        out = Path("out") / f"{model.name}-{method.value}-w{bits}g{group_size}{'' if sym else '-asym'}"
    layers = Checkpoint(model).config.num_hidden_layers
    with Progress(TextColumn("[bold]quantize[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=False) as bar:
        task = bar.add_task("layers", total=layers)

        def on_layer(r: dict) -> None:
            bar.update(task, completed=r["layer"] + 1,
                       description=f"layer {r['layer']}: rel. error {r['rel_error']:.4f}, {r['seconds']:.1f}s")

        result = quantize_checkpoint(model, out, opts, resume=resume, force=force, on_layer=on_layer)
    report = json.loads((result / "quant_report.json").read_text())
    console.print(f"wrote {result} ({method.value}, {bits}-bit, group {group_size}, {'sym' if sym else 'asym'}; "
                  f"{report['totals']['seconds']:.1f}s; mean layer rel. error {report['totals']['mean_layer_rel_error']:.4f})")


@app.command("eval")
def eval_(
    ref: Optional[Path] = typer.Option(None, help="Reference (bf16) checkpoint; default: the bundled model."),
    quant: Optional[Path] = typer.Option(None, help="GPTQ checkpoint, GGUF file or ONNX folder."),
    data: Optional[str] = typer.Option(None, help="Evaluation text (default: bundled held-out text)."),
    ctx: int = typer.Option(512, help="Context length."),
    method: str = typer.Option("llama", help="Perplexity convention: llama (llama-perplexity) or gptq (papers)."),
    runtime: Optional[str] = typer.Option(None, help="torch, llama.cpp or onnxruntime (default: from --quant)."),
    max_drift: Optional[float] = typer.Option(None, help="Fail when relative PPL drift exceeds this."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON."),
    plot: Optional[Path] = typer.Option(None, help="Write a PNG plot."),
):
    """Perplexity, KL divergence and top-1 agreement of the int4 model against bf16."""
    _not_yet("eval", 4)


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="GPTQ checkpoint directory."),
    target: Target = typer.Option(..., help="android, harmony, ios or onnx."),
    out: Optional[Path] = typer.Option(None, help="Output directory."),
):
    """Write the phone artifacts for one target, storing the GPTQ codes bit-exactly."""
    issue = {"ios": 5, "android": 6, "harmony": 6, "onnx": 7}[target.value]
    _not_yet(f"export --target {target.value}", issue)


@bench_app.command("run")
def bench_run(artifact: Path = typer.Argument(...), db: Optional[Path] = typer.Option(None, help="Results store.")):
    """Prefill and decode tokens/s through the artifact's own runtime."""
    _not_yet("bench run", 8)


@bench_app.command("plan")
def bench_plan(target: Target = typer.Option(...), out: Optional[Path] = typer.Option(None),
               db: Optional[Path] = typer.Option(None, help="Results store.")):
    """Write a device kit that benchmarks a phone."""
    _not_yet("bench plan", 8)


@bench_app.command("ingest")
def bench_ingest(files: list[Path] = typer.Argument(...), db: Optional[Path] = typer.Option(None, help="Results store.")):
    """Read result files produced on phones into the store."""
    _not_yet("bench ingest", 8)


@bench_app.command("report")
def bench_report(db: Optional[Path] = typer.Option(None, help="Results store."), plot: Optional[Path] = typer.Option(None)):
    """Table and plot of measured speeds against rooflines and published figures."""
    _not_yet("bench report", 8)


@app.command()
def inspect(
    path: Path = typer.Argument(BUNDLED_MODEL, help="Checkpoint directory (default: the bundled model)."),
    verify: bool = typer.Option(False, help="Re-check an artifact's manifest and checksums."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
):
    """Architecture, config, parameter count, dtypes, shapes and tying of a checkpoint."""
    if verify:
        _not_yet("inspect --verify", 9)
    from .inspect import summarize

    s = summarize(path)
    if json_out:
        console.print_json(json.dumps(s))
        return
    c = s["config"]
    console.print(f"[bold]{s['architecture']}[/bold] ({s['variant']}) at {s['path']}")
    console.print(f"parameters: {s['parameters']:,} ({s['parameters'] / 1e9:.3f} B); tied embeddings: {s['tied']}; "
                  f"dtypes: {', '.join(f'{k} {v:,}' for k, v in s['dtypes'].items())}")
    if s["quantization"]:
        q = s["quantization"]
        console.print(f"quantization: {q['method']} {q['bits']}-bit, group {q['group_size']}, "
                      f"{'symmetric' if q['sym'] else 'asymmetric'}, format {q['format']}, act-order {q['desc_act']}")
    console.print(f"muP: embedding x{s['muP']['embedding_scale']:g}, residual x{s['muP']['residual_scale']:.6g}, "
                  f"logits / {s['muP']['logit_scale']:g}; tokenizer: {s['tokenizer'] or 'none'}")
    cfg = Table("key", "value", title="config")
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "hidden_act", "hidden_act_param", "rope_theta", "rms_norm_eps",
              "max_position_embeddings", "scale_emb", "scale_depth", "dim_model_base"):
        cfg.add_row(k, str(c[k]))
    console.print(cfg)
    t = Table("tensor", "shape", "count", title="tensors")
    for name, v in s["tensors"].items():
        t.add_row(name, "x".join(map(str, v["shape"])), str(v["count"]))
    console.print(t)


def run() -> None:
    """Console entry point: UserError becomes one line on stderr and exit status 2."""
    try:
        app(standalone_mode=True)
    except UserError as e:
        err.print(f"error: {e}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
