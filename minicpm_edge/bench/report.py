"""Decode tokens/s per device against its roofline bound, with the published MiniCPM-2B phone figures for reference.

The bound is the device's memory bandwidth over the artifact's bytes per token (roofline.py): measured rows use
the bandwidth measured with them, phone rows the table entry their device name matches. Each decode row shows the
prefill (pp) figure of the same run beside it: the prefill row of the same device, runtime, artifact and threads
whose date is nearest.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from ..ui import table as new_table
from . import roofline
from .ingest import PROMPT_TIME
from .store import Result

# FORMATS.md section 0: MiniCPM-2B
MINICPM_2B = {"hidden_size": 2304, "intermediate_size": 5760, "num_attention_heads": 36, "num_key_value_heads": 36,
              "num_hidden_layers": 40, "vocab_size": 122753}
# FORMATS.md section 6: MiniCPM-2B int4 text decode on phones, tokens/s (OpenBMB's published figures)
PUBLISHED_MLC = [("OPPO Find N3 (Snapdragon 8 Gen 2)", 6.5), ("Galaxy S23 Ultra (Snapdragon 8 Gen 2)", 6.4),
                 ("Snapdragon 888+", 3.7), ("Snapdragon 8 Gen 1", 3.7), ("Snapdragon 870", 3.5),
                 ("Snapdragon 865", 3.2), ("Snapdragon 855", 3.0), ("Snapdragon 845", 2.3),
                 ("Huawei Nova 11 SE, HarmonyOS 4.0 (Snapdragon 778)", 1.9), ("Snapdragon 835", 1.3)]
PUBLISHED_LLMFARM = [("Apple A17 Pro", 18.0), ("Apple A16", 15.0), ("Apple A14", 5.8), ("Apple A13", 4.6)]


def published() -> list[Result]:
    bpt = roofline.config_bytes_per_token(MINICPM_2B, bits=4, group_size=32)
    common = {"source": "published", "artifact": "MiniCPM-2B", "test": "tg", "quant": "int4",
              "bytes_per_token": bpt}
    return ([Result(device=d, runtime="mlc-llm", tokens_per_s=t, **common) for d, t in PUBLISHED_MLC]
            + [Result(device=d, runtime="llama.cpp (LLMFarm)", tokens_per_s=t, flags=PROMPT_TIME, **common)
               for d, t in PUBLISHED_LLMFARM])


def _run_key(r: Result) -> tuple:
    return r.source, r.device, r.runtime, r.artifact, r.artifact_sha256, r.quant, r.threads


def _when(r: Result) -> float | None:
    try:
        return datetime.fromisoformat(r.date.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _prefill_of(decode: Result, prefills: dict[tuple, list[Result]]) -> Result | None:
    """The prefill row measured with this decode row: same run key, nearest date (the first when undated)."""
    candidates = prefills.get(_run_key(decode), [])
    t = _when(decode)
    if not candidates or t is None:
        return candidates[0] if candidates else None
    return min(candidates, key=lambda p: abs((_when(p) if _when(p) is not None else float("inf")) - t))


def entries(rows: list[Result], bandwidths: dict | None = None, with_published: bool = True) -> list[dict]:
    """One dict per decode row: the row's figures, its run's prefill figure, the bandwidth used and the bound
    (None where unknown)."""
    table = bandwidths or roofline.BANDWIDTHS
    prefills: dict[tuple, list[Result]] = {}
    for r in rows:
        if r.test.startswith("pp") and "+" not in r.test:
            prefills.setdefault(_run_key(r), []).append(r)
    out = []
    for r in [r for r in rows if r.is_decode] + (published() if with_published else []):
        pp = _prefill_of(r, prefills)
        match = roofline.lookup_bandwidth(r.device, table)
        if r.raw.get("bandwidth_gbs"):  # measured with the row (bench run)
            match = ("measured", float(r.raw["bandwidth_gbs"]))
        bound = roofline.decode_bound(match[1], r.bytes_per_token) if match and r.bytes_per_token else None
        out.append({"device": r.device, "runtime": r.runtime, "artifact": r.artifact, "quant": r.quant,
                    "source": r.source, "test": r.test, "tokens_per_s": r.tokens_per_s, "stddev": r.stddev,
                    "prefill_test": pp.test if pp else None, "prefill_tokens_per_s": pp.tokens_per_s if pp else None,
                    "flags": r.flags, "date": r.date, "bandwidth": match[0] if match else "",
                    "bandwidth_gbs": match[1] if match else None, "bytes_per_token": r.bytes_per_token,
                    "bound": bound, "of_bound": r.tokens_per_s / bound if bound else None})
    return sorted(out, key=lambda e: (e["source"] == "published", e["device"].lower(), e["date"]))


def _f(x, fmt: str = "{:.1f}") -> str:
    return "—" if x is None else fmt.format(x)


def table(items: list[dict]):
    t = new_table("device", "runtime", "artifact", "source", "prefill tok/s", "decode tok/s", "bound tok/s",
                  "of bound", "bandwidth", "flags", title="prefill and decode speed; decode against the "
                  "memory-bandwidth roofline")
    for e in items:
        speed = _f(e["tokens_per_s"], "{:.2f}") + (f" ± {e['stddev']:.2f}" if e["stddev"] is not None else "")
        prefill = "—" if e["prefill_tokens_per_s"] is None else f"{e['prefill_tokens_per_s']:.2f} ({e['prefill_test']})"
        bw = f"{e['bandwidth']} {e['bandwidth_gbs']:.1f} GB/s" if e["bandwidth_gbs"] else "—"
        t.add_row(e["device"], e["runtime"], f"{e['artifact']} {e['quant']}".strip(), e["source"], prefill, speed,
                  _f(e["bound"]), _f(e["of_bound"], "{:.0%}"), bw, e["flags"],
                  style="dim" if e["source"] == "published" else None)
    return t


def plot(items: list[dict], path: Path) -> Path:
    """Horizontal bars of decode tok/s (log scale) with the roofline bound marked on each; published rows grey."""
    from matplotlib.figure import Figure

    items = list(reversed(items))
    fig = Figure(figsize=(10, 1.2 + 0.38 * len(items)), layout="constrained")
    ax = fig.subplots()
    y = range(len(items))
    colors = ["#9e9e9e" if e["source"] == "published" else "#1f77b4" for e in items]
    ax.barh(y, [e["tokens_per_s"] for e in items], color=colors,
            xerr=[e["stddev"] or 0 for e in items], ecolor="#444444")
    bounded = [(i, e["bound"]) for i, e in enumerate(items) if e["bound"]]
    if bounded:
        ax.scatter([b for _, b in bounded], [i for i, _ in bounded], marker="|", s=300, color="#d62728",
                   label="roofline bound (bandwidth / bytes per token)", zorder=3)
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(list(y), [f"{e['device']} · {e['runtime']} · {e['artifact']}"
                            + (" *" if e["flags"] else "") for e in items], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("decode tokens/s (grey: published MiniCPM-2B int4; * includes prompt time)")
    ax.grid(axis="x", which="both", alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
