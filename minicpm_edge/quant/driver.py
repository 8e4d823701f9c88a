"""Layer-sequential GPTQ over a whole checkpoint: stream one decoder layer at a time, persist after each, resume.

Per layer, true-sequential: [q, k, v] -> o -> [gate, up] -> down (MiniCPM3's latent attention:
[q_a, kv_a_with_mqa] -> [q_b, kv_b] -> o -> [gate, up] -> down). Each group's inputs are collected with the earlier
groups already quantised, and the next layer's inputs are the outputs of the quantised layer.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import calib
from ..artifact import publish, write_manifest
from ..errors import UserError
from ..model import Checkpoint, Tokenizer, load_layer
from ..model.forward import DecoderLayer, LatentAttention, rope_tables
from .format import GGMLLinear, QuantizedLinear, ggml_quantization_config, quantization_config
from .gptq import GPTQ, rtn
from .grid import SEARCHES, QuantSpec
from .kquant import FORMATS, MIXES, TYPES, mix_type

GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
# MLA (MiniCPM3) in data-flow order: the two down-projections share the layer input; q_b and kv_b see the latents
# made by the quantised q_a / kv_a (two inputs, two Hessians); then o, the MLP as above. The latent norms stay as they are.
MLA_GROUPS = (("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"), ("self_attn.q_b_proj", "self_attn.kv_b_proj"),
              *GROUPS[1:])
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json",
                   "generation_config.json")
SHARD_BYTES = 2**30  # also bounds the memory used to assemble the checkpoint
PROBE_TOKENS = 2048  # calibration tokens (whole samples, at least one) the report's layer error is measured on
KEEP_BYTES = 2**31  # the most memory a layer's down_proj inputs may take to be kept rather than recomputed


@dataclass
class QuantOptions:
    spec: QuantSpec = field(default_factory=QuantSpec)
    method: str = "gptq"  # or "rtn"
    damp: float = 0.01
    nsamples: int = 128
    seqlen: int = 512
    calib: str | None = None
    order: str = "act"  # column order: act (act-order, static groups), gar (group-aware) or natural; see ORDERS
    static_groups: bool = False  # group parameters fixed before the error updates (always so with act-order)
    search: str = "weighted"  # grid search (grid.SEARCHES): Hessian-diagonal weighted, GPTQ's mse clipping, or max
    device: str = "cpu"
    compute: str = "auto"  # layer forwards: fp32, bf16 or auto (Hessians and the solver are always fp32)
    batch: int = 8  # calibration samples per forward chunk
    seed: int = 0
    # GPTAQ (GPTQ only): each Linear aims at the unquantised model's output, this share of the exact correction.
    # SmolLM2-135M Q4_K_M, 32 x 512 calibration, llama-perplexity KLD: 0 0.0345, 0.1 0.0289, 0.25 0.0253,
    # 0.5 0.0233, 1 0.0333 (the full correction overfits the cross term)
    gptaq: float = 0.5
    format: str | None = None  # a llama.cpp mix (kquant.MIXES: GGML blocks per Linear, `spec` unused) or None (GPTQ v1)

    @property
    def column_order(self) -> dict[str, bool]:
        """`order` as the solver's switches (GPTQ.quantize's keywords); RTN has no column order."""
        gptq = self.method == "gptq"
        return {"act_order": gptq and self.order == "act", "group_aware": gptq and self.order == "gar",
                "static_groups": gptq and (self.static_groups or self.order == "act")}

    def fingerprint(self, model_dir: Path, tokens: torch.Tensor) -> str:
        d = {k: v for k, v in self.__dict__.items() if k != "spec"} | self.spec.__dict__
        d["model"] = str(Path(model_dir).resolve())
        d["tokens"] = hashlib.sha256(tokens.numpy().tobytes()).hexdigest()
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def quantize_checkpoint(model_dir: Path, out: Path, opts: QuantOptions, resume: bool = False, force: bool = False,
                        on_layer: Callable[[dict], None] | None = None, stop_after: int | None = None) -> Path:
    """Quantise every decoder Linear of `model_dir` into a GPTQ v1 checkpoint at `out`. Returns `out`.

    On bad input or a failed write, the work area this run started is removed and `out` is left as it was; an
    interruption (Ctrl-C) keeps it for --resume.
    """
    t_start = time.time()
    with Checkpoint(model_dir) as ckpt:
        cfg = ckpt.config
        if ckpt.quant:
            raise UserError(f"{model_dir}: already a GPTQ checkpoint; quantise the original bf16/fp16 model")
        if opts.method not in ("gptq", "rtn"):
            raise UserError(f"--method {opts.method!r}: choose gptq or rtn")
        if opts.search not in SEARCHES:
            raise UserError(f"grid search {opts.search!r}: choose {', '.join(SEARCHES)}")
        if opts.order not in ORDERS:
            raise UserError(f"--order {opts.order!r}: choose {', '.join(ORDERS)}")
        if opts.format is not None and opts.format not in MIXES:
            raise UserError(f"--format {opts.format!r}: choose {', '.join(FORMATS)}")
        if not 0 <= opts.gptaq <= 1:
            raise UserError(f"--gptaq {opts.gptaq:g}: give a share of the correction from 0 (off) to 1")
        _check_device(opts.device)
        if opts.compute == "auto":
            opts = replace(opts, compute=auto_compute(opts.device))
        if opts.compute not in COMPUTE:
            raise UserError(f"--compute {opts.compute!r}: choose {', '.join(COMPUTE)} or auto")
        for name, k in _input_widths(cfg):
            opts.spec.check_k(k, f"{name} {k}")
        out = Path(out)
        if out.exists() and not force:
            raise UserError(f"{out} exists; add --force to replace it")
        if ckpt.tokenizer_path is None:
            raise UserError(f"{model_dir}: no tokenizer.model or tokenizer.json (needed to tokenise the calibration text)")
        tok = Tokenizer(ckpt.tokenizer_path)
        tok.check_vocab(cfg.vocab_size)
        tokens = calib.calibration_batches(tok, calib.load_documents(opts.calib), opts.nsamples, opts.seqlen,
                                           opts.seed)
        work = out.parent / f".{out.name}.work"
        fingerprint = opts.fingerprint(model_dir, tokens)
        existed, begun = work.exists(), None  # begun: layers already done when this run took the work area
        try:
            state = _open_work(work, fingerprint, resume, force)
            begun = state["layers_done"]
            done = _quantize_layers(ckpt, tokens, work, opts, state, on_layer, stop_after)
            if not done:
                return work
            _assemble(ckpt, work, out, opts, state, time.time() - t_start, force)
        except (UserError, OSError, SafetensorError) as e:
            # nothing half-written: a work area this run started (or that holds no finished layer) goes too
            if begun == 0 or begun is None and not existed:
                shutil.rmtree(work, ignore_errors=True)
            else:
                for tmp in work.glob("*.tmp"):
                    tmp.unlink(missing_ok=True)
                shutil.rmtree(work / "final", ignore_errors=True)
            if isinstance(e, UserError):
                raise
            reason = e.strerror or e if isinstance(e, OSError) else _short(e)
            raise UserError(f"{out}: writing failed ({reason}); nothing was written") from None
    return out


def _check_device(device: str) -> None:
    """Refuse, in one line, a --device torch cannot use here (or that names no CPU or CUDA device)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r}: choose cpu or cuda (cuda:N for the N-th GPU)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s) here (cuda:0 ...)")


def _quantize_layers(ckpt: Checkpoint, tokens: torch.Tensor, work: Path, opts: QuantOptions, state: dict,
                     on_layer, stop_after: int | None) -> bool:
    """Quantise the layers `state` has not done yet into `work`; False when stopped early by `stop_after`."""
    cfg = ckpt.config
    dev = torch.device(opts.device)
    cos, sin = (t.to(dev) for t in rope_tables(cfg, torch.arange(opts.seqlen)))

    start = state["layers_done"]
    gptaq = opts.method == "gptq" and opts.gptaq > 0  # a second, unquantised stream of hidden states
    if start == 0:
        emb = ckpt.tensor("model.embed_tokens.weight", None)  # original dtype: never the whole table in fp32
        h = emb[tokens].to(dev, torch.float32) * cfg.embedding_scale
        del emb
        ckpt.drop_maps()  # the table was read through a memory map: unmap it
        native = h.clone() if gptaq else None
    else:
        try:
            saved = load_file(str(_hidden_path(work, start)))
            h, native = saved["h"].to(dev), saved["native"].to(dev) if gptaq else None
        except (SafetensorError, OSError, KeyError) as e:
            raise UserError(f"{work}: the interrupted run's hidden states are unreadable ({_short(e)}); "
                            "start over with --force") from None
    for i in range(start, cfg.num_hidden_layers):
        t0 = time.time()
        layer = load_layer(ckpt, i).to(dev)
        records, report, h = quantize_layer(layer, h, cos, sin, opts, (i, cfg.num_hidden_layers), native)
        report.update(layer=i, seconds=round(time.time() - t0, 3))
        tensors = {f"model.layers.{i}.{m}.{s}": t.cpu() for m, r in records.items() for s, t in r.tensors().items()}
        for norm in cfg.norm_shapes():
            name = f"model.layers.{i}.{norm}.weight"
            tensors[name] = ckpt.tensor(name, None)
        _atomic_save(tensors, work / f"layer_{i:04d}.safetensors")
        streams = {"h": h} if native is None else {"h": h, "native": native}
        _atomic_save({k: t.cpu().contiguous() for k, t in streams.items()}, _hidden_path(work, i + 1))
        state["layers_done"] = i + 1
        state["report"].append(report)
        _atomic_json(state, work / "state.json")  # the commit point: until here a resume redoes layer i
        _hidden_path(work, i).unlink(missing_ok=True)
        if on_layer:
            on_layer(report)
        del layer, records
        if stop_after is not None and i + 1 >= stop_after:
            return False
    return True


def _input_widths(cfg) -> list[tuple[str, int]]:
    """The input widths (K) of the layer's Linears, each with the config key that sets it."""
    out = [("hidden_size", cfg.hidden_size), ("intermediate_size", cfg.intermediate_size)]
    if cfg.mla:
        out += [("q_lora_rank", cfg.q_lora_rank), ("kv_lora_rank", cfg.kv_lora_rank),
                ("num_attention_heads x v_head_dim", cfg.num_attention_heads * cfg.v_head_dim)]
    return out


def _hidden_path(work: Path, layer: int) -> Path:
    """The hidden states entering `layer`. One file per layer boundary, so that a run killed after the next
    boundary's file is written but before state.json says so resumes from the inputs state.json names."""
    return work / f"hidden_{layer:04d}.safetensors"


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


COMPUTE = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The order in which GPTQ visits a layer's input columns; every one keeps each group a contiguous run of K, so every
# export target stores the result. act: decreasing Hessian diagonal with static groups (GPTQ's --act-order
# --static-groups); gar: group-aware reordering (GPTQModel's act_group_aware); natural: left to right.
ORDERS = ("act", "gar", "natural")


def raised_damping(report: dict) -> list[float]:
    """The damping of each Linear in a quant_report whose factorisation failed at the run's --damp."""
    return [v["damp"] for r in report["layers"] for v in r["modules"].values() if v.get("damp", 0) > report["damp"]]


def auto_compute(device: str) -> str:
    """bf16 forwards where they are fast (CUDA; CPUs with AVX512-BF16 or AMX: ~4x fp32 on matmuls),
    fp32 elsewhere (CPUs without bf16 units emulate it, slower than fp32)."""
    if device.startswith("cuda"):
        return "bf16"
    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return "bf16" if any(p is not None and p() for p in probes) else "fp32"


def quantize_layer(layer: DecoderLayer, h: torch.Tensor, cos, sin, opts: QuantOptions,
                   position: tuple[int, int] = (0, 1), native: torch.Tensor | None = None):
    """Quantise one decoder layer in place, true-sequentially. Returns (records, report, output hidden states).
    `position`: (layer index, number of layers), which llama.cpp's mixes (opts.format) choose each Linear's type by.
    `native`: the unquantised model's hidden states entering the layer (opts.gptaq > 0: each Linear aims at the
    unquantised model's output, GPTQ.target); advanced through the unquantised layer in place.

    The residual stream h stays float32; with opts.compute "bf16" the layer's modules run in bfloat16 (several
    times faster on CPUs with AVX512-BF16 or AMX), while the Hessians are float32 products of their bfloat16
    inputs (GPTQ.add_batch says why) and each solver sees the float32 weights.
    """
    dt = COMPUTE[opts.compute]
    mla = isinstance(layer.self_attn, LatentAttention)
    groups = MLA_GROUPS if mla else GROUPS
    originals = {name: layer.get_submodule(name).weight.data for group in groups for name in group}
    layer = layer.to(dt)
    cos, sin = cos.to(dt), sin.to(dt)
    fp = copy.deepcopy(layer) if native is not None else None  # the unquantised layer, for the native stream
    n = h.shape[0]
    chunks = [slice(s, min(s + opts.batch, n)) for s in range(0, n, opts.batch)]
    probe = slice(0, min(n, max(1, PROBE_TOKENS // h.shape[1])))
    with torch.no_grad():
        probe_in = h[probe].clone()
        reference = layer(probe_in.to(dt), cos, sin)[0].float()  # unquantised output on a few samples
    records, modules = {}, {}

    def solve(names: tuple[str, ...], hessian: GPTQ) -> None:
        """Quantise the Linears that read one input; those on the same grid type as one matrix, their rows stacked
        (every row is solved on its own: one column loop instead of one per Linear)."""
        blocks = {name: TYPES[mix_type(opts.format, name, *position, originals[name].shape[1])] if opts.format else None
                  for name in names}
        modules.update(dict.fromkeys(names))  # the report in the layer's order
        for block in dict.fromkeys(blocks.values()):
            group = [name for name in names if blocks[name] is block]
            ws = [originals.pop(name) for name in group]
            w = torch.cat(ws) if len(ws) > 1 else ws[0]
            if opts.method == "gptq":
                order = opts.column_order
                w = hessian.target(w, opts.gptaq, opts.damp, opts.spec, **order) if native is not None else w
                r = hessian.quantize(w, opts.spec, opts.damp, search=opts.search, block=block, **order)
            else:
                r = rtn(w, opts.spec, opts.search, torch.diag(hessian.H), block=block)
            sizes = [x.shape[0] for x in ws]
            for name, wi, ri in zip(group, w.split(sizes), r.split(sizes) if len(ws) > 1 else [r]):
                solved = ri if opts.method == "gptq" else None  # the solver's loss gives the numerator
                modules[name] = {"rel_error": round(hessian.output_error(wi, ri.dequantized, solved, dt), 8),
                                 "damp": ri.damp_used}
                if block is not None:
                    modules[name]["type"] = block.name
                records[name] = GGMLLinear.from_result(ri) if block else QuantizedLinear.from_result(ri, opts.spec)
                layer.get_submodule(name).weight.data = ri.dequantized.to(dt)

    def fits(width: int) -> bool:
        """Whether inputs `width` wide for every calibration token, of both streams with GPTAQ, fit in KEEP_BYTES."""
        return (1 if native is None else 2) * n * h.shape[1] * width * torch.finfo(dt).bits // 8 <= KEEP_BYTES

    def normed(norm: str) -> list | None:
        """The norm's output on each chunk of both streams (the native stream's None without GPTAQ), made once for
        the two groups that read it; None where they do not fit (each pass then makes its own)."""
        if not fits(hidden):
            return None
        with torch.no_grad():
            return [(layer.get_submodule(norm)(h[c].to(dt)),
                     None if native is None else fp.get_submodule(norm)(native[c].to(dt))) for c in chunks]

    def collect(k: int, fn, norm: str, pre: list | None, keep: bool = False, free: bool = False):
        """Hessian of the inputs fn(layer, x) over the chunks x of the norm's output on h (`pre`'s, or made here),
        with the native stream's through the unquantised layer, for GPTQ.target; the inputs themselves only when
        `keep`. `free`: this is pre's last reader, which lets go of each chunk once used."""
        H = GPTQ(k, h.device)
        kept, kept_native = [], []
        with torch.no_grad():
            for i, c in enumerate(chunks):
                if pre is None:
                    x = layer.get_submodule(norm)(h[c].to(dt))
                    xn = None if native is None else fp.get_submodule(norm)(native[c].to(dt))
                else:
                    x, xn = pre[i]
                    if free:
                        pre[i] = None
                x = fn(layer, x)
                xn = fn(fp, xn) if native is not None else None
                H.add_batch(x, native=xn)
                if keep:
                    kept.append(x)
                    kept_native.append(xn)
        return H, kept, kept_native

    def residual(stream: torch.Tensor, c: slice, out: torch.Tensor) -> None:
        stream[c].add_(out, alpha=layer.residual_scale)  # float32, in place

    same = lambda m, x: x  # noqa: E731  (the norm's output itself)
    hidden = layer.input_layernorm.weight.shape[0]
    pre = normed("input_layernorm")
    # [q, k, v] (MLA: [q_a, kv_a_with_mqa]) share one input
    H, _, _ = collect(hidden, same, "input_layernorm", pre)
    solve(groups[0], H)
    del H
    if mla:  # q_b and kv_b: the normed latents of the quantised q_a / kv_a
        H, _, _ = collect(layer.self_attn.q_b_proj.in_features, lambda m, x: m.self_attn.q_latent(x),
                          "input_layernorm", pre)
        solve(groups[1][:1], H)
        H, _, _ = collect(layer.self_attn.kv_b_proj.in_features, lambda m, x: m.self_attn.kv_latent(x)[0],
                          "input_layernorm", pre)
        solve(groups[1][1:], H)
        del H
        groups = groups[1:]
    # o sees attention computed with quantised q, k, v
    H, mixed, mixed_fp = collect(layer.self_attn.o_proj.in_features, lambda m, x: m.self_attn.mix(x, cos, sin)[0],
                                 "input_layernorm", pre, keep=True, free=True)
    del pre
    solve(groups[1], H)
    with torch.no_grad():
        for i, c in enumerate(chunks):  # the streams now hold the mid-layer residual
            residual(h, c, layer.self_attn.o_proj(mixed[i]))
            if native is not None:
                residual(native, c, fp.self_attn.o_proj(mixed_fp[i]))
    del mixed, mixed_fp
    # [gate, up] share the post-attention norm's output
    pre = normed("post_attention_layernorm")
    H, _, _ = collect(hidden, same, "post_attention_layernorm", pre)
    solve(groups[2], H)
    # down's inputs (intermediate-sized, the largest activations) are kept for the residual update when they fit in
    # KEEP_BYTES (saving a second pass through gate and up), recomputed otherwise
    keep = fits(layer.mlp.down_proj.in_features)
    H, acts, acts_fp = collect(layer.mlp.down_proj.in_features, lambda m, x: m.mlp.hidden(x),
                               "post_attention_layernorm", pre, keep=keep, free=keep)
    solve(groups[3], H)

    def act(m, stream, i, c):  # down's input, recomputed (from pre's normed chunk where it was kept)
        x = m.post_attention_layernorm(stream[c].to(dt)) if pre is None else pre[i][0 if m is layer else 1]
        return m.mlp.hidden(x)

    with torch.no_grad():
        for i, c in enumerate(chunks):
            residual(h, c, layer.mlp.down_proj(acts[i] if keep else act(layer, h, i, c)))
            if native is not None:
                residual(native, c, fp.mlp.down_proj(acts_fp[i] if keep else act(fp, native, i, c)))
    del acts, acts_fp, fp, pre
    # the layer's relative output error on the probe samples: |out_q - out| / |out - in| (of what the layer adds)
    branch = (reference - probe_in).norm()
    rel = float((h[probe] - reference).norm() / branch) if branch > 0 else 0.0
    return records, {"modules": modules, "rel_error": round(rel, 8)}, h


def _open_work(work: Path, fingerprint: str, resume: bool, force: bool) -> dict:
    state_path = work / "state.json"
    if work.exists() and not resume:
        if not force:
            raise UserError(f"an interrupted run is in {work}; add --resume to continue it or --force to start over")
        shutil.rmtree(work)
    if resume and state_path.is_file():
        try:
            state = json.loads(state_path.read_text())
            assert isinstance(state, dict) and isinstance(state.get("layers_done"), int)
            assert isinstance(state.get("report"), list)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, AssertionError):
            raise UserError(f"{state_path}: unreadable; start over with --force") from None
        if state.get("fingerprint") != fingerprint:
            raise UserError(f"{work} was started with other settings, model or calibration text; "
                            "repeat the original options or start over with --force")
        return state
    work.mkdir(parents=True, exist_ok=True)
    state = {"fingerprint": fingerprint, "layers_done": 0, "report": []}
    _atomic_json(state, state_path)
    return state


def _atomic_save(tensors: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def _atomic_json(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _assemble(ckpt: Checkpoint, work: Path, out: Path, opts: QuantOptions, state: dict, seconds: float,
              force: bool) -> None:
    """Write the final checkpoint into the work area, then move it into place in one rename."""
    cfg = ckpt.config
    final = work / "final"
    if final.exists():
        shutil.rmtree(final)
    final.mkdir()
    head = {"model.embed_tokens.weight": ckpt.tensor("model.embed_tokens.weight", None),
            "model.norm.weight": ckpt.tensor("model.norm.weight", None)}
    if not cfg.tie_word_embeddings:
        head["lm_head.weight"] = ckpt.tensor("lm_head.weight", None)
    # shards are written as they fill, so at most one shard's tensors are in memory
    meta = {"format": "pt", "quantizer": "minicpm-edge"}
    files, weight_map, cur, size, total = [], {}, {}, 0, 0

    def flush():
        name = f"shard-{len(files) + 1:05d}.safetensors"
        save_file(cur, str(final / name), metadata=meta)
        files.append(name)
        weight_map.update({n: name for n in cur})
        cur.clear()

    for i in range(-1, cfg.num_hidden_layers):
        part = head if i < 0 else load_file(str(work / f"layer_{i:04d}.safetensors"))
        nbytes = sum(t.numel() * t.element_size() for t in part.values())
        if cur and size + nbytes > SHARD_BYTES:
            flush()
            size = 0
        cur.update(part)
        size += nbytes
        total += nbytes
    del head, part
    flush()
    names = {f: "model.safetensors" if len(files) == 1 else f"model-{k:05d}-of-{len(files):05d}.safetensors"
             for k, f in enumerate(files, 1)}
    for f, name in names.items():
        os.replace(final / f, final / name)
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {n: names[f] for n, f in weight_map.items()}}
        (final / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    order = opts.column_order
    if opts.format:
        from ..model.checkpoint import LINEARS

        n, widths = cfg.num_hidden_layers, {"self_attn.o_proj": cfg.num_attention_heads * cfg.head_dim,
                                            "mlp.down_proj": cfg.intermediate_size}
        types = {f"model.layers.{i}.{m}": mix_type(opts.format, m, i, n, widths.get(m, cfg.hidden_size))
                 for i in range(n) for m in LINEARS}
        qcfg = ggml_quantization_config(opts.format, types, opts.damp, opts.method, order["act_order"])
    else:
        qcfg = quantization_config(opts.spec, opts.damp, opts.method, order["act_order"], order["static_groups"],
                                   group_aware=order["group_aware"])
    config = dict(cfg.raw)
    config["quantization_config"] = qcfg
    config["torch_dtype"] = "float16"
    (final / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (final / "quantize_config.json").write_text(json.dumps(qcfg, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (ckpt.dir / name).is_file():
            shutil.copy(ckpt.dir / name, final / name)
    layers = state["report"]
    report = {"model": str(ckpt.dir), "method": opts.method, "format": opts.format or "gptq", "bits": opts.spec.bits,
              "group_size": opts.spec.group_size, "sym": opts.spec.sym, "damp": opts.damp,
              "gptaq": opts.gptaq if opts.method == "gptq" else None, "order": opts.order if opts.method == "gptq" else None, "search": opts.search, "compute": opts.compute,
              "calibration": {"source": opts.calib or "bundled", "nsamples": opts.nsamples, "seqlen": opts.seqlen},
              "totals": {"seconds": round(seconds, 2), "layer_seconds": round(sum(r["seconds"] for r in layers), 2),
                         "mean_layer_rel_error": sum(r["rel_error"] for r in layers) / len(layers)},
              "layers": layers}
    (final / "quant_report.json").write_text(json.dumps(report, indent=1) + "\n")
    write_manifest(final, "gptq")
    publish(final, out, force)
    shutil.rmtree(work)
