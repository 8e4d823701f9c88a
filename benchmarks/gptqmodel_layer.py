"""One MiniCPM-2B-shaped layer, same calibration tokens: our engine against gptqmodel 7.6.0, in one run.

  python benchmarks/gptqmodel_layer.py --nsamples 64 --seqlen 512 --ours fp32,bf16,bf16:gar,bf16:natural   (needs `make interop`'s venv)

Writes a 1-layer synthetic MiniCPM-2B-shaped checkpoint, quantises it with `minicpm-edge quantize` and, in the gptqmodel
venv, with GPTQModel (the checkpoint re-labelled GraniteForCausalLM, which gptqmodel quantises as a llama clone and
which computes MiniCPM's muP math), both w4 g32 symmetric, damp 0.01, on identical token ids; gptqmodel with its
defaults otherwise (act_group_aware on, i.e. GAR column order; model dtype bfloat16 on any CPU, so its layer forwards
run in bf16, fast only where the CPU has AVX512-BF16 or AMX; --peer-dtype float32 makes them fp32). Ours runs once
per --ours setting: COMPUTE[:ORDER], compute fp32 or bf16, --order act (default), gar or natural; with --gptaq 0
(plain GPTQ, like gptqmodel's default) unless --gptaq says otherwise. Prints seconds for the layer, the speed ratios,
and each module's relative output error on the layer's real inputs, measured the same way for every checkpoint by
our reader.

--rounds R repeats ours and the peer alternately (ours, peer, ours, peer, ...: the machine's other load hits both alike)
and prints medians and ranges. The floor: the layer's matrix-multiply FLOPs (one forward of the calibration tokens with
causal attention; the four Hessians X^T X, symmetric, so half a GEMM's work; per Hessian the upper Cholesky factor of
its inverse, as one Cholesky and one triangular inverse, 2/3 K^3; the GPTQ solver's in-block and lazy block updates,
blocksize 128) at this machine's fp32 GEMM rate (torch.mm on a 4096 square at the thread count the quantiser uses,
measured each round). Each of our runs goes through benchmarks/phases.py, which times every phase from outside the
product code; the table puts each phase beside its floor.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT / ".venv-gptqmodel" / "bin" / "python"

PEER_SCRIPT = r"""
import json, sys, time, torch
from gptqmodel import GPTQModel, QuantizeConfig
src, out, ids_path, dtype = sys.argv[1:5]
device = sys.argv[5] if len(sys.argv) > 5 else "auto"
ids = json.load(open(ids_path))
calib = [{"input_ids": torch.tensor(r), "attention_mask": torch.ones(len(r), dtype=torch.long)} for r in ids]
qc = QuantizeConfig(bits=4, group_size=32, sym=True, desc_act=False, damp_percent=0.01)
kw = ({} if dtype == "auto" else {"dtype": getattr(torch, dtype)}) | ({} if device == "auto" else {"device": device})
model = GPTQModel.load(src, qc, **kw)
cuda = torch.cuda.is_available()
if cuda:
    torch.cuda.reset_peak_memory_stats()
t = time.time()
model.quantize(calib, batch_size=1)
if cuda:
    torch.cuda.synchronize()
print(json.dumps({"seconds": time.time() - t, "gpu_peak_allocated": torch.cuda.max_memory_allocated() if cuda else None}))
model.save(out)
"""


def granite_copy(model: Path, dest: Path) -> Path:
    """`model` re-labelled GraniteForCausalLM (gptqmodel quantises it as a llama clone; its config carries MiniCPM's
    muP multipliers), at `dest`."""
    from minicpm_edge.model import Checkpoint

    c = Checkpoint(model).config
    shutil.copytree(model, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg.update(architectures=["GraniteForCausalLM"], model_type="granite", embedding_multiplier=float(c.scale_emb),
               residual_multiplier=c.residual_scale, logits_scaling=c.logit_scale, attention_multiplier=1 / math.sqrt(c.head_dim),
               attention_bias=False, mlp_bias=False, tie_word_embeddings=True, rope_theta=c.rope_theta)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


BLOCKSIZE = 128  # GPTQ.quantize's default block size, for the solver's floor
PHASES = ("forwards", "probe", "hessians", "target", "cholesky", "grid", "solver", "error", "packing", "io", "setup")


def floor_flops(c, tokens: int, seqlen: int, blocksize: int = BLOCKSIZE) -> dict[str, float]:
    """Matrix-multiply FLOPs a GPTQ pass over one decoder layer cannot avoid, by phase (multiply-add = 2 FLOPs)."""
    h, i, q, kv = c.hidden_size, c.intermediate_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    mods = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]  # (N, K): q k v o gate up down
    hessian_k = (h, q, h, i)  # one Hessian per shared input: [q k v], o, [gate up], down

    def solver(n, k):
        total = 0
        for i1 in range(0, k, blocksize):
            b = min(blocksize, k - i1)
            total += n * b * (b + 1) + 2 * n * b * (k - i1 - b)  # rank-1 updates inside the block, then the lazy GEMM
        return total

    return {"forwards": 2 * tokens * sum(n * k for n, k in mods) + 2 * tokens * (seqlen + 1) * q,  # + causal QK^T, PV
            "hessians": sum(tokens * k * (k + 1) for k in hessian_k),  # X^T X symmetric: K(K+1)/2 dot products
            "cholesky": sum(2 / 3 * k ** 3 for k in hessian_k),
            "solver": sum(solver(n, k) for n, k in mods)}


def gemm_rate(n: int = 4096, repeats: int = 5) -> float:
    """This machine's fp32 GEMM rate in FLOP/s: median of `repeats` torch.mm on an n x n square, default threads."""
    import torch

    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a, b, out=c)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b, out=c)
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)


def spread(xs: list[float], fmt: str = "{:.1f}") -> str:
    """median (min-max) of xs"""
    return (fmt + " ({}-{})").format(statistics.median(xs), fmt.format(min(xs)), fmt.format(max(xs)))


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ours", default="fp32,bf16,bf16:gar,bf16:natural", help="our settings COMPUTE[:ORDER], comma-separated")
    ap.add_argument("--rounds", type=int, default=1, help="repeat ours and the peer alternately this many times")
    ap.add_argument("--no-peer", action="store_true", help="ours (and the floor) only")
    ap.add_argument("--gptaq", type=float, default=0.0, help="our --gptaq (default 0: plain GPTQ, the algorithm "
                    "gptqmodel runs by default; its GPTAQ is v2=True); our default 0.5 adds the unquantised "
                    "stream's forwards and the cross products")
    ap.add_argument("--peer-dtype", default="auto", help="gptqmodel's model dtype: auto (its choice: bfloat16 on any "
                    "CPU) or float32 (its layer forwards in fp32 like ours at --compute fp32)")
    a = ap.parse_args()
    if not a.no_peer and not PEER.exists():
        raise SystemExit(f"{PEER} missing: run `make interop` first")
    import torch

    from minicpm_edge import calib
    from minicpm_edge.model import Checkpoint, Tokenizer, load_layer
    from minicpm_edge.model.forward import rope_tables
    from minicpm_edge.model.synthetic import write_synthetic

    root = Path(tempfile.mkdtemp(prefix="bench-peer-"))
    model = write_synthetic("minicpm-2b", root / "m", layers=1)
    tok = Tokenizer(model / "tokenizer.model")
    ids = calib.calibration_batches(tok, calib.load_documents(None), a.nsamples, a.seqlen)
    (root / "ids.json").write_text(json.dumps(ids.tolist()))
    c = Checkpoint(model).config
    settings = a.ours.split(",")

    granite = granite_copy(model, root / "granite")
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS="2")

    ours = {k: [] for k in settings}  # setting -> [(layer seconds, wall seconds, phases)]
    peer, rates = [], []
    for _ in range(a.rounds):
        rates.append(gemm_rate())
        for setting in settings:
            compute, _, order = setting.partition(":")
            shutil.rmtree(root / setting, ignore_errors=True)
            t0 = time.time()
            subprocess.run([sys.executable, str(ROOT / "benchmarks" / "phases.py"), str(root / "phases.json"),
                            "quantize", str(model), "--out", str(root / setting),
                            "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--compute", compute,
                            "--order", order or "act", "--gptaq", str(a.gptaq)],
                           check=True, capture_output=True)
            seconds = json.loads((root / setting / "quant_report.json").read_text())["layers"][0]["seconds"]
            ours[setting].append((seconds, time.time() - t0, json.loads((root / "phases.json").read_text())))
        if a.no_peer:
            continue
        shutil.rmtree(root / "peer", ignore_errors=True)
        t0 = time.time()
        p = subprocess.run([str(PEER), "-c", PEER_SCRIPT, str(granite), str(root / "peer"), str(root / "ids.json"),
                            a.peer_dtype],
                           capture_output=True, text=True, env=env)
        if p.returncode:
            sys.stderr.write(p.stderr[-3000:])
            raise SystemExit("gptqmodel run failed")
        peer_s = next(json.loads(line) for line in p.stdout.splitlines() if line.startswith('{"seconds"'))["seconds"]
        peer.append((peer_s, time.time() - t0))
        print(f"round {len(peer)}: GEMM {rates[-1] / 1e9:.0f} GFLOP/s; " + ", ".join(f"{k} {v[-1][0]:.1f} s" for k, v in ours.items())
              + f"; gptqmodel {peer_s:.1f} s", flush=True)

    # each module's relative output error on the layer's real inputs, the same measure for both checkpoints
    h = torch.nn.functional.embedding(ids, Checkpoint(model).embedding()) * c.embedding_scale
    cos, sin = rope_tables(c, torch.arange(a.seqlen))
    fp = load_layer(Checkpoint(model), 0)
    errors = {}
    for name, ckpt_dir in [(f"ours-{k}", root / k) for k in ours] + ([("gptqmodel", root / "peer")] if peer else []):
        cfg_q = json.loads((ckpt_dir / "config.json").read_text())
        if cfg_q.get("model_type") == "granite":  # read it back with our reader under the MiniCPM config
            cfg_q.update({k: v for k, v in json.loads((model / "config.json").read_text()).items()})
            (ckpt_dir / "config.json").write_text(json.dumps(cfg_q))
        q = load_layer(Checkpoint(ckpt_dir), 0)
        errs = {}
        with torch.no_grad():
            x1 = fp.input_layernorm(h[:8])
            mixed = fp.self_attn.mix(x1, cos, sin)[0]
            mid = h[:8] + fp.self_attn.o_proj(mixed) * fp.residual_scale
            x2 = fp.post_attention_layernorm(mid)
            act = fp.mlp.hidden(x2)
            for mod, x in (("self_attn.q_proj", x1), ("self_attn.k_proj", x1), ("self_attn.v_proj", x1),
                           ("self_attn.o_proj", mixed), ("mlp.gate_proj", x2), ("mlp.up_proj", x2), ("mlp.down_proj", act)):
                ref = fp.get_submodule(mod)(x)
                errs[mod.split(".")[1]] = float((q.get_submodule(mod)(x) - ref).norm() / ref.norm())
        errors[name] = errs
    tokens = a.nsamples * a.seqlen
    flops, rate = floor_flops(c, tokens, a.seqlen), statistics.median(rates)
    floor_s = sum(flops.values()) / rate
    bf16 = any(getattr(torch.cpu, n, lambda: False)() for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    print(f"MiniCPM-2B-shaped layer, {a.nsamples} x {a.seqlen} calibration tokens, w4 g32 sym, damp 0.01, "
          f"{a.rounds} round(s), median (range)")
    print(f"  CPU: {cpu_name()}, AVX512-BF16/AMX {'yes' if bf16 else 'no'}, {torch.get_num_threads()} torch threads; "
          f"fp32 GEMM {spread([r / 1e9 for r in rates], '{:.0f}')} GFLOP/s")
    print(f"  floor: {sum(flops.values()) / 1e12:.2f} TFLOP (" + ", ".join(f"{k} {v / 1e12:.3f}" for k, v in flops.items())
          + f") = {floor_s:.1f} s at {rate / 1e9:.0f} GFLOP/s")
    peer_s = statistics.median(s for s, _ in peer) if peer else None
    for k, runs in ours.items():
        secs = [r[0] for r in runs]
        vs_peer = f", {peer_s / statistics.median(secs):.2f}x gptqmodel's speed" if peer else ""
        print(f"  minicpm-edge {k}: {spread(secs)} s for the layer (wall incl. start-up and writing "
              f"{spread([r[1] for r in runs])} s): {statistics.median(secs) / floor_s:.2f}x the floor{vs_peer}")
    if peer:
        print(f"  gptqmodel 7.6.0 (dtype {a.peer_dtype}): {spread([s for s, _ in peer])} s in quantize() (wall {spread([w for _, w in peer])} s): "
              f"{peer_s / floor_s:.2f}x the floor")
    print("  our seconds per phase (benchmarks/phases.py), median over rounds; floor = that phase's FLOPs at the fp32 GEMM rate:")
    print("    " + f"{'phase':9s}" + "".join(f"{k:>16s}" for k in ours) + f"{'floor':>10s}")
    for ph in PHASES:
        row = [statistics.median(r[2].get(ph, 0.0) for r in runs) for runs in ours.values()]
        fl = f"{flops[ph] / rate:10.2f}" if ph in flops else ""
        print(f"    {ph:9s}" + "".join(f"{x:16.2f}" for x in row) + fl)
    print("  relative output error per module (first 8 samples, unquantised inputs):")
    for mod in next(iter(errors.values())):
        print(f"    {mod:10s} " + "  ".join(f"{name} {e[mod]:.5f}" for name, e in errors.items()))
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
