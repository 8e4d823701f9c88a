"""The `minicpm-edge` command line: parses options and calls the pipeline; no logic of its own."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from . import __version__
from .errors import UserError
from .model.config import MLA_KEYS
from .model.synthetic import BUNDLED_TOKENIZER
from .ui import console, err, out_for, table, write_json, writing

BUNDLED_MODEL = BUNDLED_TOKENIZER.parent
JSON_HELP = "Also write the results as JSON to this file (- for standard output; the tables then go to stderr)."

# rich_markup_mode None: click's plain help and usage errors, which wrap words but never cut an option name short
# (typer's rich boxes truncate them at 40 columns, and wrap at 80 in a log)
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="MiniCPM checkpoints in, int4 artifacts for Android and iOS out, with proof that quality held.")
bench_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                        help="Tokens/s here, device kits for phones, and ingest of their results.")
app.add_typer(bench_app, name="bench")


class Method(str, Enum):
    gptq = "gptq"
    rtn = "rtn"


class Target(str, Enum):
    android = "android"
    harmony = "harmony"
    ios = "ios"
    onnx = "onnx"


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
    bits: Optional[int] = typer.Option(None, help="Bits per weight: 2, 3, 4 or 8 (default 4)."),
    group_size: Optional[int] = typer.Option(None, help="Group size along the input dimension (-1: per channel; "
                                             "default 32)."),
    sym: Optional[bool] = typer.Option(None, "--sym/--asym", help="Symmetric (every target; default) or asymmetric "
                                       "grid."),
    fmt: Optional[str] = typer.Option(None, "--format", help="A llama.cpp type instead of --bits/--group-size/"
                                         "--asym: q4_0 (= w4 g32 sym), q4_1 (= w4 g32 asym), or the mixes q4_k_m / "
                                         "q3_k_m (llama.cpp's K-quant blocks per tensor; GGUF export only)."),
    method: Method = typer.Option(Method.gptq, help="gptq (Hessian error updates) or rtn (round to nearest)."),
    calib: Optional[str] = typer.Option(None, help="Calibration text: .txt/.jsonl file, folder, wikitext2 or c4."),
    nsamples: int = typer.Option(128, help="Calibration samples."),
    seqlen: int = typer.Option(512, help="Tokens per calibration sample."),
    damp: float = typer.Option(0.01, help="Hessian damping as a fraction of its mean diagonal."),
    device: str = typer.Option("cpu", help="cpu, or cuda where present."),
    compute: str = typer.Option("auto", help="Layer forwards in fp32 or bf16; auto: bf16 on GPUs and CPUs with "
                                "AVX512-BF16/AMX, else fp32 (Hessians and the solver are fp32 either way)."),
    out: Optional[Path] = typer.Option(None, help="Output checkpoint directory."),
    resume: bool = typer.Option(False, help="Continue an interrupted run in --out."),
    force: bool = typer.Option(False, help="Replace an existing --out."),
    order: str = typer.Option("act", help="Column order: act (decreasing Hessian diagonal, static groups), gar "
                              "(group-aware reordering) or natural; each keeps groups contiguous for every target."),
    static_groups: bool = typer.Option(False, help="Fix group parameters before the error updates (implied by act)."),
    search: str = typer.Option("weighted", help="Per-group scale search: weighted (Hessian-diagonal weighted "
                               "rounding error), mse (GPTQ's unweighted clipping search) or max (no search)."),
    mse: bool = typer.Option(False, help="Same as --search mse."),
    gptaq: Optional[float] = typer.Option(None, help="GPTAQ: each Linear aims at the unquantised model's output "
                                          "(fed the unquantised model's inputs) rather than at its own output on "
                                          "the quantised model's inputs; the share of that correction, 0 (plain "
                                          "GPTQ) to 1 (default 0.5). Runs a second, unquantised stream of hidden "
                                          "states (about 1.4x the time)."),
):
    """GPTQ int4 group quantisation (or onto llama.cpp's K-quant mixes), layer by layer, on CPU (or a CUDA GPU)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .model import Checkpoint
    from .quant.driver import QuantOptions, quantize_checkpoint, raised_damping
    from .quant.grid import QuantSpec

    from .quant.kquant import FORMATS, MIXES

    if fmt is not None:
        if fmt not in FORMATS:
            raise UserError(f"--format {fmt}: choose {', '.join(FORMATS)}")
        if (bits, group_size, sym) != (None, None, None):
            raise UserError(f"--format {fmt} sets the grid itself; give either --format or --bits/--group-size/"
                            "--sym/--asym")
        bits, group_size, sym = 4, 32, fmt != "q4_1"
    if gptaq is not None and method.value != "gptq":
        raise UserError("--gptaq changes GPTQ's target; it needs --method gptq")
    bits, group_size, sym = 4 if bits is None else bits, 32 if group_size is None else group_size, sym is not False
    mix = fmt if fmt in MIXES else None
    opts = QuantOptions(spec=QuantSpec(bits, group_size, sym), method=method.value, damp=damp, nsamples=nsamples,
                        seqlen=seqlen, calib=calib, order=order, static_groups=static_groups,
                        search="mse" if mse else search, device=device, compute=compute, format=mix,
                        gptaq=QuantOptions.gptaq if gptaq is None else gptaq)
    grid = mix or f"w{bits}g{group_size}{'' if sym else '-asym'}"
    if out is None:
        out = Path("out") / f"{model.name}-{method.value}-{grid}"
    layers = Checkpoint(model).config.num_hidden_layers
    with Progress(TextColumn("[bold]quantize[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=False) as bar:
        task = bar.add_task("layers", total=layers)

        def on_layer(r: dict) -> None:
            bar.update(task, completed=r["layer"] + 1,
                       description=f"layer {r['layer']}: rel. error {r['rel_error']:.4f}, {r['seconds']:.1f}s")

        try:
            result = quantize_checkpoint(model, out, opts, resume=resume, force=force, on_layer=on_layer)
        except BaseException:
            bar.live.transient = True  # the error alone is the message: no half-finished bar above it
            raise
    report = json.loads((result / "quant_report.json").read_text())
    what = f"llama.cpp {mix} mix" if mix else f"{bits}-bit, group {group_size}, {'sym' if sym else 'asym'}"
    console.print(f"wrote {result} ({method.value}, {what}; "
                  f"{report['totals']['seconds']:.1f}s; mean layer rel. error {report['totals']['mean_layer_rel_error']:.4f})")
    raised = raised_damping(report)
    if raised:
        n = sum(len(r["modules"]) for r in report["layers"])
        err.print(f"note: {len(raised)} of {n} Linears needed more damping than --damp {damp:g} (up to {max(raised):g}; "
                  "quant_report.json names them): their Hessians are near-singular; more calibration tokens "
                  "(--nsamples, --seqlen) lower their error", soft_wrap=True)


@app.command("eval")
def eval_(
    ref: Path = typer.Option(BUNDLED_MODEL, help="Reference (bf16) checkpoint; default: the bundled model."),
    quant: Optional[Path] = typer.Option(None, help="GPTQ checkpoint, GGUF file or ONNX folder; default: the bundled "
                                         "model's GPTQ w4 g32 (made on first use)."),
    data: Optional[str] = typer.Option(None, help="Evaluation text file or folder (default: bundled held-out text)."),
    ctx: int = typer.Option(512, help="Context length (tokens per chunk)."),
    method: str = typer.Option("llama", help="Perplexity convention: llama (llama-perplexity) or gptq (papers)."),
    runtime: Optional[str] = typer.Option(None, help="torch, llama.cpp or onnxruntime (default: from --quant)."),
    chunks: Optional[int] = typer.Option(None, help="Score at most this many chunks."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for the runtimes."),
    max_drift: Optional[float] = typer.Option(None, help="Exit 1 when relative PPL drift exceeds this (0.05 = 5%)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help=JSON_HELP),
    plot: Optional[Path] = typer.Option(None, help="Write a PNG plot."),
    sweep: bool = typer.Option(False, help="Quantise and evaluate a grid of methods x bits x group sizes."),
    grid: str = typer.Option("gptq,rtn:3,4:32,128", help="Sweep grid METHODS:BITS:GROUPS."),
    sweep_dir: Path = typer.Option(Path("out/sweep"), help="Where the sweep keeps its checkpoints (reused)."),
    nsamples: int = typer.Option(128, help="Calibration samples for the sweep's quantisations."),
    sparsity: bool = typer.Option(False, help="Also report the fraction of zero FFN activations (ReLU/FATReLU models)."),
):
    """Perplexity, KL divergence and top-1 agreement of the int4 model against bf16."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from . import evaluation as ev

    show = out_for(json_out)
    if sweep:
        rows = []
        with Progress(TextColumn("[bold]sweep[/bold]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err) as bar:
            items = ev.parse_grid(grid)
            task = bar.add_task("", total=len(items))
            rows = ev.sweep(ref, sweep_dir, items, data, ctx, method, nsamples=nsamples, max_chunks=chunks,
                            on_item=lambda r: bar.advance(task))
        t = table("method", "bits", "group", "PPL ref", "PPL quant", "drift", "KL mean", "KL p99", "top-1",
                  title=f"{ref.name}: {method} convention, ctx {ctx}, {rows[0]['tokens_scored']} tokens")
        for r in rows:
            t.add_row(r["quant_method"], str(r["bits"]), str(r["group_size"]), f"{r['ref']['ppl']:.3f}",
                      f"{r['quant']['ppl']:.3f}", f"{r['drift']:+.2%}", f"{r['kl_mean']:.4f}", f"{r['kl_p99']:.4f}",
                      f"{r['top1']:.3f}")
        show.print(t)
        if json_out:
            write_json(json_out, rows)
        if plot:
            with writing(plot):
                ev.plot_sweep(rows, plot)
        return
    if quant is None:
        if ref.resolve() != BUNDLED_MODEL.resolve():
            raise UserError("give --quant (the quantised artifact to compare with --ref)")
        quant = Path("out") / f"{BUNDLED_MODEL.name}-gptq-w4g32"
        if not (quant / "quant_report.json").is_file():
            from .quant.driver import QuantOptions, quantize_checkpoint

            err.print(f"quantising the bundled model into {quant} first")
            quantize_checkpoint(BUNDLED_MODEL, quant, QuantOptions(), force=True)
    with Progress(TextColumn("[bold]eval[/bold] chunks"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task("", total=None)
        report = ev.evaluate(ref, quant, data, ctx, method, runtime, max_chunks=chunks, threads=threads,
                             on_chunk=lambda k, n: bar.update(task, completed=k, total=n))
    if sparsity:
        from .model import Tokenizer

        tokens = Tokenizer(ref).encode(ev.eval_text(data))
        report["sparsity"] = {"ref": ev.sparsity(ref, tokens, ctx, chunks), "quant": ev.sparsity(quant, tokens, ctx, chunks)}
    t = table("model", "runtime", "PPL", title=f"{report['method']} perplexity convention, ctx {report['ctx']}, "
              f"{report['tokens_scored']:,} tokens scored in {report['chunks']} chunks ({report['data']})")
    t.add_row(str(ref), report["ref"]["runtime"], f"{report['ref']['ppl']:.4f}")
    t.add_row(str(quant), report["quant"]["runtime"], f"{report['quant']['ppl']:.4f}")
    show.print(t)
    show.print(f"drift {report['drift']:+.3%} (± {report['drift_se']:.3%}); KL divergence mean {report['kl_mean']:.5f}, "
               f"p99 {report['kl_p99']:.5f}; top-1 agreement {report['top1']:.4f}")
    if "sparsity" in report:
        s = report["sparsity"]
        show.print("zero FFN activations per layer: ref " + ", ".join(f"{x:.3f}" for x in s["ref"]) +
                   "; quant " + ", ".join(f"{x:.3f}" for x in s["quant"]))
    if json_out:
        write_json(json_out, report)
    if plot:
        with writing(plot):
            ev.plot_report(report, plot)
    if max_drift is not None:
        failure = ev.gate(report, max_drift)
        if failure:
            err.print(f"drift gate failed: {failure}")
            raise typer.Exit(1)
        show.print(f"drift gate passed ({report['drift']:+.3%} <= {max_drift:.2%})")


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="GPTQ checkpoint directory (or an unquantised one with --dtype)."),
    target: Target = typer.Option(..., help="android, harmony, ios or onnx."),
    out: Optional[Path] = typer.Option(None, help="Output directory (default: out/<checkpoint>-<target>)."),
    force: bool = typer.Option(False, help="Replace an existing --out."),
    dtype: str = typer.Option("f16", help="ios, unquantised checkpoints: f16 or f32 weights."),
    embedding: str = typer.Option("f16", help="ios: embedding (and untied head) type f16, f32, q8_0 or q6_k (what "
                                  "llama.cpp's mixes give a tied table); onnx: f16, or q8_0 / q4_0 (the table on "
                                  "that grid for the lookup and the head: smaller, faster decode)."),
    layout: str = typer.Option("q4f16_0", help="android/harmony: q4f16_0 (default) or q4f16_1."),
    accuracy_level: int = typer.Option(4, help="onnx: MatMulNBits accuracy_level: 4 int8 compute (faster), 0 fp32."),
    model_id: Optional[str] = typer.Option(None, help="android/harmony: MLC model id (default: <name>-<layout>-MLC)."),
    context_window: Optional[int] = typer.Option(None, help="android/harmony: context window (default: 2048)."),
    prefill_chunk: Optional[int] = typer.Option(None, help="android/harmony: prefill chunk (default: 128)."),
):
    """Write the phone artifacts for one target, storing the GPTQ codes bit-exactly."""
    out = out or Path("out") / f"{checkpoint.name}-{target.value}"
    if target is Target.ios:
        from .export.ios import export_ios

        export_ios(checkpoint, out, force=force, dtype=dtype, embedding=embedding)
    elif target is Target.onnx:
        from .export.onnx import export_onnx

        export_onnx(checkpoint, out, force=force, accuracy_level=accuracy_level, embedding=embedding)
    else:
        from .export.mlc import export_mlc

        export_mlc(checkpoint, out, target=target.value, layout=layout, model_id=model_id,
                   context_window=context_window, prefill_chunk=prefill_chunk, force=force)
    files = sorted((p for p in out.rglob("*") if p.is_file()), key=lambda p: -p.stat().st_size)
    total = sum(p.stat().st_size for p in files)
    main = ", ".join(f"{p.relative_to(out)} {p.stat().st_size / 2**20:.2f} MiB" for p in files[:3]
                     if p.stat().st_size >= total / 20)  # the files that hold the weights
    console.print(f"wrote {out}: {len(files)} files, {total / 2**20:.1f} MiB ({main}; "
                  f"`minicpm-edge inspect --verify {out}` checks them)")


@bench_app.command("run")
def bench_run(
    artifact: Path = typer.Argument(..., help="GGUF file, ONNX export folder or checkpoint directory."),
    runtime: Optional[str] = typer.Option(None, help="torch, llama.cpp or onnxruntime (default: from the artifact)."),
    n_prompt: int = typer.Option(512, help="Prompt tokens for the prefill test (pp)."),
    n_gen: int = typer.Option(128, help="Generated tokens for the decode test (tg)."),
    runs: int = typer.Option(3, help="Repetitions; the median is reported."),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: all cores)."),
    db: Optional[Path] = typer.Option(None, help="Results store (default: the user data directory)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help=JSON_HELP + " bench ingest reads it."),
):
    """Prefill and decode tokens/s through the artifact's own runtime."""
    from .bench.run import context_needed, measure, measure_apart, rows
    from .bench.store import Store
    from .runtimes import open_runner, resolve

    artifact, runtime = resolve(artifact, runtime)
    n_ctx, kw = context_needed(n_prompt, n_gen), dict(n_prompt=n_prompt, n_gen=n_gen, runs=runs)
    with err.status(f"timing {artifact} through {runtime} ({runs} runs)"):
        if runtime == "llama.cpp":  # in a process of its own, at OpenMP's default wait policy (minicpm_edge/__init__)
            summary = measure_apart(artifact, runtime, threads, n_ctx, **kw)
        else:
            summary = measure(open_runner(artifact, runtime, threads=threads, n_ctx=n_ctx), artifact=artifact, **kw)
    with Store(db) as store:
        new = store.add(rows(summary))
        where = store.path
    show = out_for(json_out)
    t = table("test", "tokens/s (median)", "spread", "runs", title=f"{summary['artifact']['name']} on "
              f"{summary['device']} ({summary['runtime']}, {summary['threads']} threads)")
    for kind, test in (("prefill", f"pp{n_prompt}"), ("decode", f"tg{n_gen}")):
        s = summary[kind]
        t.add_row(test, f"{s['tokens_per_s']:.2f}", f"{s['min']:.2f}-{s['max']:.2f}", str(len(s["samples"])))
    show.print(t)
    bound = summary["decode_bound"]
    show.print(f"artifact {summary['artifact']['bytes'] / 2**20:.1f} MiB, {summary['bytes_per_token'] / 2**20:.2f} MiB "
               f"read per token, memory bandwidth {summary['bandwidth_gbs']:.1f} GB/s (measured): decode bound "
               + (f"{bound:.1f} tok/s, measured {summary['decode']['tokens_per_s'] / bound:.0%} of it" if bound else
                  "unknown") + f"; peak RSS {summary['peak_rss_bytes'] / 2**20:.0f} MiB")
    show.print(f"{new} new rows in {where}")
    if json_out:
        write_json(json_out, summary)


@bench_app.command("plan")
def bench_plan(
    target: str = typer.Option(..., help="android or ios."),
    artifact: Optional[Path] = typer.Option(None, help="The GGUF (or MLC export folder) to benchmark on the phone."),
    out: Optional[Path] = typer.Option(None, help="Kit folder (default: out/bench-kit-<target>)."),
    force: bool = typer.Option(False, help="Replace an existing --out."),
):
    """Write a device kit that benchmarks a phone and brings back files for `bench ingest`."""
    from .bench.plan import write_plan

    out = out or Path("out") / f"bench-kit-{target}"
    write_plan(target, out, artifact, force=force)
    console.print(f"wrote {out}: " + ", ".join(sorted(p.name for p in out.iterdir())) + f" (read {out}/README.md)")


@bench_app.command("ingest")
def bench_ingest(
    files: list[Path] = typer.Argument(..., help="llama-bench json/jsonl/csv/md, MLC stats, LLMFarm or our JSON."),
    device: Optional[str] = typer.Option(None, help="Device name, where the file does not say."),
    artifact: Optional[str] = typer.Option(None, help="Artifact name, where the file does not say."),
    db: Optional[Path] = typer.Option(None, help="Results store (default: the user data directory)."),
):
    """Read result files produced on phones into the store (every file is checked before any is stored)."""
    from .bench.ingest import ingest_file
    from .bench.store import Store

    batches = [(f, ingest_file(f, device=device, artifact=artifact)) for f in files]
    with Store(db) as store:
        for f, rows in batches:
            new = store.add(rows)
            console.print(f"{f}: {len(rows)} rows, {new} new")
        console.print(f"{len(store)} rows in {store.path}")


@bench_app.command("report")
def bench_report(
    db: Optional[Path] = typer.Option(None, help="Results store (default: the user data directory)."),
    plot: Optional[Path] = typer.Option(None, help="Write a PNG plot."),
    bandwidths: Optional[Path] = typer.Option(None, help='JSON of extra device bandwidths: {"name": GB/s} or {"name": {"gbs": x, "aliases": [...]}}.'),
    published: bool = typer.Option(True, help="Include the published MiniCPM-2B phone figures as reference rows."),
):
    """Table and plot of measured decode speeds against rooflines and the published phone figures."""
    from .bench import report
    from .bench.roofline import load_bandwidths
    from .bench.store import Store

    with Store(db) as store:
        items = report.entries(store.rows(), load_bandwidths(bandwidths), with_published=published)
    if not items:
        raise UserError("no decode results to report; add some with `bench run` or `bench ingest`")
    console.print(report.table(items))
    if plot:
        with writing(plot):
            console.print(f"wrote {report.plot(items, plot)}")


@app.command()
def inspect(
    path: Path = typer.Argument(BUNDLED_MODEL, help="Checkpoint directory (default: the bundled model)."),
    verify: bool = typer.Option(False, help="Re-check an artifact's manifest and checksums."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
):
    """Architecture, config, parameter count, dtypes, shapes and tying of a checkpoint; or what an exported artifact
    (a GGUF file, or a folder `export` wrote) holds."""
    if verify:
        from .artifact import verify as verify_folder

        v = verify_folder(path)
        console.print(f"{path}: {v['kind']} artifact, {v['files']} files match manifest.json")
        for line in v["checks"]:
            console.print(f"  {line}")
        if v["unlisted"]:
            console.print(f"  not in the manifest (not checked): {', '.join(v['unlisted'])}")
        return
    from .inspect import is_artifact, summarize, summarize_artifact

    if is_artifact(path):
        s = summarize_artifact(path)
        if json_out:
            write_json("-", s)
            return
        _print_artifact(s)
        return
    s = summarize(path)
    if json_out:
        write_json("-", s)
        return
    c = s["config"]
    console.print(f"{s['architecture']} ({s['variant']}) at {s['path']}", style="bold")
    console.print(f"parameters: {s['parameters']:,} ({s['parameters'] / 1e9:.3f} B); tied embeddings: {s['tied']}; "
                  f"dtypes: {', '.join(f'{k} {v:,}' for k, v in s['dtypes'].items())}")
    if s["quantization"]:
        q = s["quantization"]
        if "types" in q:
            console.print(f"quantization: {q['method']} on llama.cpp's {q['format']} mix ("
                          f"{', '.join(f'{t} x{n}' for t, n in q['types'].items())}), act-order {q['desc_act']}")
        else:
            console.print(f"quantization: {q['method']} {q['bits']}-bit, group {q['group_size']}, "
                          f"{'symmetric' if q['sym'] else 'asymmetric'}, format {q['format']}, act-order {q['desc_act']}")
    console.print(f"muP: embedding x{s['muP']['embedding_scale']:g}, residual x{s['muP']['residual_scale']:.6g}, "
                  f"logits / {s['muP']['logit_scale']:g}; tokenizer: {s['tokenizer'] or 'none'}")
    cfg = table("key", "value", title="config")
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "hidden_act", "hidden_act_param", "rope_theta", "rms_norm_eps",
              "max_position_embeddings", "scale_emb", "scale_depth", "dim_model_base", "use_mup", "rope_scaling",
              "sparse_config") + (MLA_KEYS if c["kv_lora_rank"] else ()):
        cfg.add_row(k, str(c[k]))
    console.print(cfg)
    t = table("tensor", "shape", "count", title="tensors")
    for name, v in s["tensors"].items():
        t.add_row(name, "x".join(map(str, v["shape"])), str(v["count"]))
    console.print(t)


def _print_artifact(s: dict) -> None:
    console.print(f"{s['kind']} artifact at {s['path']}: {len(s['files'])} file(s), {s['bytes'] / 2**20:.2f} MiB"
                  + (f", written by {s['tool']}" if s["tool"] else ""), style="bold")
    if s["export"]:
        console.print("export: " + "; ".join(f"{k} {v}" for k, v in s["export"].items() if not isinstance(v, (dict, list))))
    for m in s["models"]:
        if m["format"] == "gguf":
            console.print(f"{m['file']}: GGUF, {m['architecture']}, {m['layers']} layers, context {m['context']}, "
                          f"vocab {m['vocab']}; {m['tensors']} tensors, {m['parameters']:,} weights, "
                          f"{m['bits_per_weight']} bits per weight; types "
                          + ", ".join(f"{t} x{n}" for t, n in m["types"].items())
                          + f"; chat template {'yes' if m['chat_template'] else 'no'}")
        elif m["format"] == "onnx":
            console.print(f"{m['file']}: ONNX, opsets " + ", ".join(f"{d} {v}" for d, v in m["opsets"].items())
                          + f"; {m['nodes']} nodes (" + ", ".join(f"{o} x{n}" for o, n in m["ops"].items())
                          + f"); {m['initializers']} initializers, {m['inputs']} inputs")
        else:
            console.print(f"{m['file']}: MLC weights, {m['model_type']} {m['quantization']}, context {m['context']}; "
                          f"{m['tensors']} tensors in {m['shards']} shard(s), {m['bytes'] / 2**20:.2f} MiB; dtypes "
                          + ", ".join(f"{d} x{n}" for d, n in m["dtypes"].items()))
    t = table("file", "bytes", title="files")
    for name, n in s["files"].items():
        t.add_row(name, f"{n:,}")
    console.print(t)


def _fail(message: str, code: int = 2):
    message = " ".join(str(message).split("\n"))  # one line, whatever a message quotes from a file
    err.print(f"error: {message}", soft_wrap=True)
    raise SystemExit(code)


def run() -> None:
    """Console entry point: bad input (a UserError, or a misspelt option or value) is one line on stderr, exit 2."""
    import sys

    click = sys.modules[typer.BadParameter.__module__]  # click's exceptions, as the typer in use has them
    try:
        code = app(standalone_mode=False)
    except UserError as e:
        _fail(str(e))
    except click.UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # the verb's help, asked for by giving nothing
            e.show()
            raise SystemExit(e.exit_code) from None
        where = e.ctx.command_path if e.ctx else "minicpm-edge"
        _fail(f"{e.format_message()} (see '{where} --help')", e.exit_code)
    except click.ClickException as e:
        _fail(e.format_message(), e.exit_code)
    except typer.Abort:  # click's Abort, or typer's own where typer vendors click (0.2x has none in click's module)
        _fail("aborted", 1)
    raise SystemExit(code if isinstance(code, int) else 0)
