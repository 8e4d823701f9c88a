"""Interoperability: our GPTQ checkpoint loads through transformers + optimum + gptqmodel (its own venv).

  make interop      # = the two steps below
  .venv/bin/python tests/interop/gptqmodel_interop.py export DIR            (main venv)
  .venv-gptqmodel/bin/python tests/interop/gptqmodel_interop.py check DIR   (gptqmodel 7.6.0 venv)
  .venv/bin/python tests/interop/gptqmodel_interop.py export-mla DIR        (MiniCPM3: then `check DIR` as above)

`export` quantises the bundled model, rewrites its config.json as GraniteForCausalLM (which computes MiniCPM's muP
math: embedding_multiplier = scale_emb, residual_multiplier = scale_depth/sqrt(L), logits_scaling =
hidden/dim_model_base, attention_multiplier = 1/sqrt(head_dim)) and saves our dequantised forward's logits.
`export-mla` does the same for MiniCPM3 (the bundled model converted to latent attention and fine-tuned,
minicpm_edge.reference.make_mla_model): transformers has MiniCPM3ForCausalLM itself, so config.json stays as written.
`check` loads the folder with transformers on CPU (GPTQ kernels from gptqmodel) and compares logits.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np

# gptqmodel's CPU kernel (TorchAtenLinear) dequantises with bf16 scales, so its weights equal ours computed in bf16
# exactly (checked tensor by tensor), and its logits differ from our fp32 forward by bf16 rounding: measured 0.06-0.15
# max |diff| on logits of magnitude ~10; top-1 agreement 1.000 on 256 held-out tokens.
TOLERANCE = 0.3
DTYPE_NAME = "float32"


def export(out: Path, mla: bool = False) -> None:
    import torch

    from minicpm_edge import calib
    from minicpm_edge.cli import BUNDLED_MODEL
    from minicpm_edge.model import Checkpoint, Tokenizer, load_model
    from minicpm_edge.quant.driver import QuantOptions, quantize_checkpoint

    src = BUNDLED_MODEL
    if mla:
        from minicpm_edge.reference import make_mla_model

        src = out.parent / f"{out.name}-bf16"
        make_mla_model(src)
    q = quantize_checkpoint(src, out, QuantOptions(nsamples=32, seqlen=256), force=True)
    ck = Checkpoint(q)
    c = ck.config
    if not mla:
        cfg = json.loads((q / "config.json").read_text())
        cfg.update(architectures=["GraniteForCausalLM"], model_type="granite", embedding_multiplier=float(c.scale_emb),
                   residual_multiplier=c.residual_scale, logits_scaling=c.logit_scale,
                   attention_multiplier=1 / math.sqrt(c.head_dim), attention_bias=False, mlp_bias=False,
                   tie_word_embeddings=True, torch_dtype="float16")
        (q / "config.json").write_text(json.dumps(cfg, indent=2))
    ids = calib.token_stream(Tokenizer(q / "tokenizer.model"), calib.heldout_documents())[:256]  # unseen text
    (q / "ids.json").write_text(json.dumps(ids))
    with torch.no_grad():
        logits = load_model(ck)(torch.tensor([ids]))[0][0].numpy()
    np.save(q / "expected_logits.npy", logits)
    print(f"wrote {q}")


def check(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    DTYPE = getattr(torch, DTYPE_NAME)

    model = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu", torch_dtype=DTYPE)
    kinds = sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__})
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from safetensors.torch import load_file

    from minicpm_edge.quant.format import SUFFIXES, QuantizedLinear

    tensors = load_file(str(out / "model.safetensors"))
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    worst, checked = 0.0, 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if not hasattr(module, "qweight"):
                continue
            rec = QuantizedLinear.from_gptq({s: tensors[f"{name}.{s}"] for s in SUFFIXES}, q["bits"], q["group_size"], q["sym"])
            g = rec.g_idx.long()
            ours = (rec.scales.bfloat16()[g].t() * (rec.codes.bfloat16() - rec.zeros.bfloat16()[g].t())).float()
            theirs = module(torch.eye(rec.shape[1])).t().float()
            worst, checked = max(worst, float((ours - theirs).abs().max())), checked + 1
        got = model(torch.tensor([json.loads((out / "ids.json").read_text())])).logits[0].float().numpy()
    want = np.load(out / "expected_logits.npy")
    diff = float(np.abs(got - want).max())
    top1 = float((got.argmax(-1) == want.argmax(-1)).mean())
    print(f"gptqmodel load: linear kinds {kinds}; {checked} quantised Linears, max |weight diff| vs ours in bf16 "
          f"{worst:g}; max |logit diff| vs our fp32 forward {diff:.4f} (tolerance {TOLERANCE}); top-1 agreement {top1:.3f}")
    if checked == 0 or worst != 0.0 or diff > TOLERANCE or top1 < 0.9:
        sys.exit(1)


if __name__ == "__main__":
    {"export": export, "export-mla": lambda p: export(p, mla=True), "check": check}[sys.argv[1]](Path(sys.argv[2]))
