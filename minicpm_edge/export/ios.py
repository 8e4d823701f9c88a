"""iOS target: a GGUF that carries the GPTQ codes, the LLMFarm settings template for MiniCPM, and how to import both."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..artifact import staging
from ..model import Checkpoint
from .gguf import write_gguf

TARGET_DIR = Path(__file__).resolve().parents[2] / "targets" / "ios"
TEMPLATE = TARGET_DIR / "MiniCPM.json"
GUIDE = TARGET_DIR / "README.md"


def gguf_name(ckpt: Checkpoint, kind: str) -> str:
    from ..model.hub import model_name

    return f"{model_name(ckpt.dir)}-{kind}.gguf"


def export_ios(checkpoint: Path, out: Path, force: bool = False, dtype: str = "f16", embedding: str = "f16") -> Path:
    """Write `out/` with <name>-Q4_0.gguf (or Q4_1 / Q4_K_M / Q3_K_M / F16 / F32), MiniCPM.json (LLMFarm template) and README.md."""
    with Checkpoint(checkpoint) as ckpt, staging(out, force, "ios") as tmp:
        from .gguf import check_exportable

        qtype = check_exportable(ckpt)
        kind = dtype.upper() if qtype is None else qtype.upper() if isinstance(qtype, str) else qtype.name
        summary = write_gguf(ckpt, tmp / gguf_name(ckpt, kind), dtype=dtype, embedding=embedding)
        template = json.loads(TEMPLATE.read_text())
        template["template_name"] = f"MiniCPM ({ckpt.dir.name})"
        (tmp / "MiniCPM.json").write_text(json.dumps(template, indent=2, ensure_ascii=False) + "\n")
        shutil.copy(GUIDE, tmp / "README.md")
        (tmp / "export.json").write_text(json.dumps({"target": "ios", "source": str(ckpt.dir), **summary}, indent=1) + "\n")
    return out
