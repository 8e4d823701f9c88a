"""Interoperability: our GPTQ checkpoint loads through transformers + optimum + gptqmodel (its own venv).

  make interop      # = the two steps below
  .venv/bin/python tests/interop/gptqmodel_interop.py export DIR            (main venv)
  .venv-gptqmodel/bin/python tests/interop/gptqmodel_interop.py check DIR   (gptqmodel 7.6.0 venv)

`export` quantises the bundled model, rewrites its config.json as GraniteForCausalLM (which computes MiniCPM's muP
math: embedding_multiplier = scale_emb, residual_multiplier = scale_depth/sqrt(L), logits_scaling =
hidden/dim_model_base, attention_multiplier = 1/sqrt(head_dim)) and saves our dequantised forward's logits.
`check` loads the folder with transformers on CPU (GPTQ kernels from gptqmodel) and compares logits.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np

TOLERANCE = 2e-2  # max |logit difference|: our fp32 dequantised forward vs gptqmodel's fp16-scale torch kernel
IDS = [1, 37, 512, 1024, 77, 3000, 18, 2048, 999, 5, 4000, 123, 321, 77, 88, 2]


def export(out: Path) -> None:
    import torch

    from minicpm_edge.cli import BUNDLED_MODEL
    from minicpm_edge.model import Checkpoint, load_model
    from minicpm_edge.quant.driver import QuantOptions, quantize_checkpoint

    q = quantize_checkpoint(BUNDLED_MODEL, out, QuantOptions(nsamples=32, seqlen=256), force=True)
    ck = Checkpoint(q)
    c = ck.config
    cfg = json.loads((q / "config.json").read_text())
    cfg.update(architectures=["GraniteForCausalLM"], model_type="granite", embedding_multiplier=float(c.scale_emb),
               residual_multiplier=c.residual_scale, logits_scaling=c.logit_scale,
               attention_multiplier=1 / math.sqrt(c.head_dim), attention_bias=False, mlp_bias=False,
               tie_word_embeddings=True, torch_dtype="float16")
    (q / "config.json").write_text(json.dumps(cfg, indent=2))
    with torch.no_grad():
        logits = load_model(ck)(torch.tensor([IDS]))[0][0].numpy()
    np.save(q / "expected_logits.npy", logits)
    print(f"wrote {q}")


def check(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu", torch_dtype=torch.float16)
    kinds = sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__})
    with torch.no_grad():
        got = model(torch.tensor([IDS])).logits[0].float().numpy()
    want = np.load(out / "expected_logits.npy")
    diff = float(np.abs(got - want).max())
    top1 = float((got.argmax(-1) == want.argmax(-1)).mean())
    print(f"gptqmodel load: linear kinds {kinds}; max |logit diff| {diff:.5f} (tolerance {TOLERANCE}); top-1 agreement {top1:.3f}")
    if diff > TOLERANCE or not any("Quant" in k for k in kinds):
        sys.exit(1)


if __name__ == "__main__":
    {"export": export, "check": check}[sys.argv[1]](Path(sys.argv[2]))
