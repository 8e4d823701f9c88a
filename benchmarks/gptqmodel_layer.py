"""One MiniCPM-2B-shaped layer, same calibration tokens: our engine against gptqmodel 7.6.0, in one run.

  python benchmarks/gptqmodel_layer.py --nsamples 64 --seqlen 512 --ours fp32,bf16,bf16:gar,bf16:natural   (needs `make interop`'s venv)

Writes a 1-layer synthetic MiniCPM-2B-shaped checkpoint, quantises it with `minicpm-edge quantize` and, in the gptqmodel
venv, with GPTQModel (the checkpoint re-labelled GraniteForCausalLM, which gptqmodel quantises as a llama clone and
which computes MiniCPM's muP math), both w4 g32 symmetric, damp 0.01, on identical token ids; gptqmodel with its
defaults otherwise (act_group_aware on, i.e. GAR column order). Ours runs once per --ours setting: COMPUTE[:ORDER],
compute fp32 or bf16, --order act (default), gar or natural. Prints seconds for the layer, the speed ratios,
and each module's relative output error on the layer's real inputs, measured the same way for every checkpoint by
our reader.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT / ".venv-gptqmodel" / "bin" / "python"

PEER_SCRIPT = r"""
import json, sys, time, torch
from gptqmodel import GPTQModel, QuantizeConfig
src, out, ids_path = sys.argv[1:4]
ids = json.load(open(ids_path))
calib = [{"input_ids": torch.tensor(r), "attention_mask": torch.ones(len(r), dtype=torch.long)} for r in ids]
qc = QuantizeConfig(bits=4, group_size=32, sym=True, desc_act=False, damp_percent=0.01)
model = GPTQModel.load(src, qc)
t = time.time()
model.quantize(calib, batch_size=1)
print(json.dumps({"seconds": time.time() - t}))
model.save(out)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ours", default="fp32,bf16,bf16:gar,bf16:natural", help="our settings COMPUTE[:ORDER], comma-separated")
    a = ap.parse_args()
    if not PEER.exists():
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

    ours = {}
    for setting in a.ours.split(","):
        compute, _, order = setting.partition(":")
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "minicpm_edge", "quantize", str(model), "--out", str(root / setting),
                        "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--compute", compute,
                        "--order", order or "act"],
                       check=True, capture_output=True)
        seconds = json.loads((root / setting / "quant_report.json").read_text())["layers"][0]["seconds"]
        ours[setting] = (seconds, time.time() - t0)

    granite = root / "granite"
    shutil.copytree(model, granite)
    c = Checkpoint(model).config
    cfg = json.loads((granite / "config.json").read_text())
    cfg.update(architectures=["GraniteForCausalLM"], model_type="granite", embedding_multiplier=float(c.scale_emb),
               residual_multiplier=c.residual_scale, logits_scaling=c.logit_scale, attention_multiplier=1 / math.sqrt(c.head_dim),
               attention_bias=False, mlp_bias=False, tie_word_embeddings=True, rope_theta=c.rope_theta)
    (granite / "config.json").write_text(json.dumps(cfg))
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS="2")
    t0 = time.time()
    p = subprocess.run([str(PEER), "-c", PEER_SCRIPT, str(granite), str(root / "peer"), str(root / "ids.json")],
                       capture_output=True, text=True, env=env)
    if p.returncode:
        sys.stderr.write(p.stderr[-3000:])
        raise SystemExit("gptqmodel run failed")
    peer_s = next(json.loads(line) for line in p.stdout.splitlines() if line.startswith('{"seconds"'))["seconds"]
    peer_wall = time.time() - t0

    # each module's relative output error on the layer's real inputs, the same measure for both checkpoints
    h = torch.nn.functional.embedding(ids, Checkpoint(model).embedding()) * c.embedding_scale
    cos, sin = rope_tables(c, torch.arange(a.seqlen))
    fp = load_layer(Checkpoint(model), 0)
    errors = {}
    for name, ckpt_dir in [(f"ours-{k}", root / k) for k in ours] + [("gptqmodel", root / "peer")]:
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
    print(f"MiniCPM-2B-shaped layer, {a.nsamples} x {a.seqlen} calibration tokens, w4 g32 sym, damp 0.01")
    for k, (seconds, wall) in ours.items():
        print(f"  minicpm-edge {k}: {seconds:.1f} s for the layer ({wall:.1f} s wall incl. start-up and "
              f"writing): {peer_s / seconds:.2f}x gptqmodel's speed")
    print(f"  gptqmodel 7.6.0: {peer_s:.1f} s in quantize() ({peer_wall:.1f} s wall)")
    print("  relative output error per module (first 8 samples, unquantised inputs):")
    for mod in errors["gptqmodel"]:
        print(f"    {mod:10s} " + "  ".join(f"{name} {e[mod]:.5f}" for name, e in errors.items()))
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
