"""Read benchmark result files from phones into store rows; the format is detected from the content.

- llama-bench `-o json | jsonl | csv | md` (also the markdown table of llama.cpp's iOS/Android example apps' Bench);
- MLC-LLM statistics text: `prefill: X tok/s, decode: Y tok/s` lines (MLCChat app, `mlc_llm chat` /stats; older
  builds say `encode:`), or the verbose block (`----------- prefill -----------` / `throughput: X tok/s` ...);
- LLMFarm: the figure under each reply, `12.34 ses, 15.60 t/s` (LLMFarm's own spelling), one per line in our kit's
  fill-in file, or LLMFarm's chat history JSON (messages with `tok_sec`). Its t/s divides the reply's tokens by the
  whole time since the message was sent, so rows carry the flag "includes prompt time";
- our own JSON: {"format": "minicpm-edge-bench", "version": 1, "rows": [...]} as `bench run --json` writes it.

Text files may start with `key: value` lines (keys in HEADER_KEYS), and a `meta.txt` beside the result file
(written by the Android kit) is read the same way: `device:` and `soc:` name the phone, `artifact:`, `sha256:`,
`quant:`, `threads:`, `n_prompt:`, `n_gen:` and `date:` describe the run. Values given to `ingest_file` win.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..errors import UserError
from .store import Result

OURS = "minicpm-edge-bench"
HEADER_KEYS = ("format", "device", "soc", "artifact", "sha256", "quant", "threads", "n_prompt", "n_gen", "date")
PROMPT_TIME = "includes prompt time"
NUM = r"(\d+(?:[.,]\d+)?|N/A)"  # MLCChat formats with the phone's locale: "12,3" is possible
MLC_LINE = re.compile(rf"(prefill|encode|decode):\s*{NUM}\s*tok/s", re.I)
MLC_SECTION = re.compile(r"^-{3,}\s*(prefill|decode)\s*-{3,}$", re.I)
MLC_THROUGHPUT = re.compile(rf"^throughput:\s*{NUM}\s*tok/s", re.I)
LLMFARM_LINE = re.compile(r"^(\d+(?:\.\d+)?)\s*(?:s|sec|ses|secs)\s*,\s*(\d+(?:\.\d+)?)\s*t/s\s*$", re.I)
MD_TEST = re.compile(r"^(pp|tg)\s*(\d+)(?:\s*\+\s*tg\s*(\d+))?(?:\s*@\s*d(\d+))?$")
QUANT = re.compile(r"\b(I?Q\d\w*|BF16|F16|F32|q\df\d+_\d)\b", re.I)


class Bad(Exception):
    """A problem with the file's content; ingest_file turns it into a one-line UserError naming the file."""


def ingest_file(path: Path, device: str | None = None, artifact: str | None = None, bytes_per_token: int = 0,
                sha256: str | None = None) -> list[Result]:
    """Rows from one result file. device / artifact / sha256 override what the file (or its meta.txt) says."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder; give the result files inside it") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    fmt = ""
    try:
        if not text.strip():
            raise Bad("empty file")
        fmt, records = detect(text)
        meta = {**sidecar(path), **header(text)}
        meta.update({k: v for k, v in (("device", device), ("artifact", artifact), ("sha256", sha256)) if v})
        mtime = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
        meta.setdefault("date", mtime.isoformat(timespec="seconds"))
        rows = PARSERS[fmt](records, meta)
        if not rows:
            raise Bad("no results in it")
        for r in rows:
            r.bytes_per_token = bytes_per_token or r.bytes_per_token
            r.check()
        return rows
    except Bad as e:
        raise UserError(f"{path}: {fmt + ': ' if fmt else ''}{e}") from None
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    except RecursionError:
        raise UserError(f"{path}: malformed {fmt or 'result'} file (nested too deeply)") from None
    except (KeyError, ValueError, TypeError, AttributeError, IndexError, OverflowError, csv.Error) as e:
        raise UserError(f"{path}: malformed {fmt or 'result'} file ({type(e).__name__}: {str(e)[:200]})") from None


def detect(text: str) -> tuple[str, object]:
    """(format name, parsed records) from the text of a result file."""
    body = text.strip()
    if body[:1] in "[{":
        try:
            doc = json.loads(body)
        except json.JSONDecodeError:
            doc = None
        if isinstance(doc, dict) and doc.get("format") == OURS:
            return "minicpm-edge JSON", doc
        if isinstance(doc, dict) and "avg_ts" in doc:
            return "llama-bench jsonl", [doc]
        if isinstance(doc, list) and doc and all(isinstance(r, dict) for r in doc):
            if any("avg_ts" in r for r in doc):  # the parser names any entry that lacks it
                return "llama-bench json", doc
            if any("tok_sec" in r for r in doc):
                return "LLMFarm history", doc
        if doc is None and body.startswith("{"):
            records = []
            for i, line in enumerate(body.splitlines(), 1):
                try:
                    records += [json.loads(line)] if line.strip() else []
                except json.JSONDecodeError as e:
                    raise Bad(f"invalid JSON on line {i} ({e.msg})") from None
            if all(isinstance(r, dict) for r in records) and any("avg_ts" in r for r in records):
                return "llama-bench jsonl", records
        if doc is None:
            raise Bad("invalid JSON")
        raise Bad("JSON that is neither llama-bench output, an LLMFarm history nor minicpm-edge results")
    lines = [ln.strip() for ln in body.splitlines()]
    first = next((ln for ln in lines if ln and not ln.startswith("#")), "")
    if "avg_ts" in first and "," in first:
        return "llama-bench csv", list(csv.DictReader(io.StringIO(body[body.index(first):]), restkey="extra_fields"))
    if any(ln.startswith("|") and "t/s" in ln and "test" in ln for ln in lines):
        return "llama-bench md", lines
    if any(MLC_LINE.search(ln) or MLC_SECTION.match(ln) for ln in lines):
        return "MLC stats", lines
    if header(text).get("format", "").lower().startswith("llmfarm") or any(LLMFARM_LINE.match(ln) for ln in lines):
        return "LLMFarm", lines
    raise Bad("not a result file minicpm-edge reads (llama-bench json/jsonl/csv/md, MLC stats, LLMFarm, "
              "minicpm-edge JSON)")


def header(text: str) -> dict:
    """Leading `key: value` lines with keys from HEADER_KEYS; comments (#) and blank lines skipped."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if not sep or key.strip().lower() not in HEADER_KEYS:
            break
        out[key.strip().lower()] = value.strip()
    return {k: v for k, v in out.items() if v}


def sidecar(path: Path) -> dict:
    meta = path.parent / "meta.txt"
    return header(meta.read_text(errors="replace")) if meta.is_file() and meta != path else {}


def _device(meta: dict, fallback: str = "") -> str:
    name = meta.get("device") or fallback
    if not name:
        raise Bad("no device named: add a 'device:' line (e.g. 'device: Galaxy S23 (SM8550)') or pass --device")
    soc = meta.get("soc")
    return f"{name} ({soc})" if soc and soc.lower() not in name.lower() else name


def _num(v, what: str) -> float:
    if isinstance(v, str):
        v = v.strip().replace(",", ".")
        try:
            v = float(v)
        except ValueError:
            raise Bad(f"{what} is not a number ({v!r})") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or abs(v) > 1e300 or not math.isfinite(v):
        raise Bad(f"{what} is not a number ({str(v)[:40]!r})")
    return float(v)


def _int(v, what: str) -> int:
    x = _num(v, what)
    if x != int(x) or x < 0:
        raise Bad(f"{what} must be a whole number >= 0 ({v!r})")
    return int(x)


def _test(n_prompt: int, n_gen: int, depth: int = 0) -> str:
    name = f"pp{n_prompt}" if not n_gen else f"tg{n_gen}" if not n_prompt else f"pp{n_prompt}+tg{n_gen}"
    return name + (f"@d{depth}" if depth else "")


def _spread(samples: list[float]) -> tuple[float, float | None]:
    return float(np.median(samples)), (float(np.std(samples, ddof=1)) if len(samples) > 1 else None)


def _meta_int(meta: dict, key: str) -> int:
    return _int(meta[key], f"'{key}:' line") if key in meta else 0


def _llama_bench(records: list[dict], meta: dict) -> list[Result]:
    rows = []
    for i, r in enumerate(records, 1):
        where = f"result {i}"
        for key in ("avg_ts", "n_prompt", "n_gen"):
            if r.get(key) in (None, ""):
                raise Bad(f"{where} has no {key}")
        n_p, n_g = _int(r["n_prompt"], f"{where} n_prompt"), _int(r["n_gen"], f"{where} n_gen")
        if not n_p and not n_g:
            raise Bad(f"{where} has n_prompt = n_gen = 0")
        depth = _int(r.get("n_depth") or 0, f"{where} n_depth")
        std = r.get("stddev_ts")
        hardware = ", ".join(x for x in (r.get("cpu_info"), r.get("gpu_info")) if x)
        model = meta.get("artifact") or Path(str(r.get("model_filename") or "")).name or r.get("model_type") or ""
        quant = meta.get("quant") or (m.group(1) if (m := QUANT.search(str(r.get("model_type", "")))) else "")
        rows.append(Result(
            source="llama-bench", device=_device(meta, hardware), runtime="llama.cpp", artifact=model,
            test=_test(n_p, n_g, depth), tokens_per_s=_num(r["avg_ts"], f"{where} avg_ts"), n_prompt=n_p, n_gen=n_g,
            stddev=None if std in (None, "") else _num(std, f"{where} stddev_ts"),
            threads=_int(r.get("n_threads") or meta.get("threads") or 0, f"{where} n_threads"),
            artifact_sha256=meta.get("sha256", ""), quant=quant, date=str(r.get("test_time") or meta["date"]),
            bytes_per_token=_model_size(r.get("model_size"), where), raw=dict(r)))
    return rows


SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB)\s*$", re.I)
UNITS = {"b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def _model_size(v, where: str) -> int:
    """llama-bench's model_size (bytes of the weights, i.e. what a decoded token reads; markdown: "3.50 MiB"),
    0 when absent."""
    if v in (None, ""):
        return 0
    if isinstance(v, str) and (m := SIZE.match(v)):
        return int(float(m.group(1)) * UNITS[m.group(2).lower()])
    return _int(v, f"{where} model_size")


def _markdown(lines: list[str], meta: dict) -> list[Result]:
    table = [ln for ln in lines if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in table]
    head = next((i for i, c in enumerate(cells) if "test" in c and "t/s" in c), None)
    if head is None:
        raise Bad("no table header with 'test' and 't/s' columns")
    cols = cells[head]
    records = []
    for c in cells[head + 1:]:
        if all(set(x) <= set("-: ") for x in c):
            continue
        if len(c) != len(cols):
            raise Bad(f"table row has {len(c)} cells, the header {len(cols)}")
        rec = dict(zip(cols, c))
        m = MD_TEST.match(rec["test"])
        if not m:
            raise Bad(f"unknown test {rec['test']!r} (expected pp512, tg128, pp512+tg128 ...)")
        kind, n, tg, depth = m.groups()
        avg, _, std = rec["t/s"].replace("+/-", "±").partition("±")
        records.append({"n_prompt": int(n) if kind == "pp" else 0, "n_gen": int(tg or 0) if kind == "pp" else int(n),
                        "n_depth": int(depth or 0), "avg_ts": avg, "stddev_ts": std or None,
                        "model_type": rec.get("model", ""), "n_threads": rec.get("threads"),
                        "backend": rec.get("backend", ""), "model_size": rec.get("size", "")})
    build = next((ln.removeprefix("build:").strip() for ln in lines if ln.startswith("build:")), "")
    rows = _llama_bench(records, meta)
    for r in rows:
        r.raw["build"] = build
    return rows


def _mlc(lines: list[str], meta: dict) -> list[Result]:
    samples: dict[str, list[float]] = {"prefill": [], "decode": []}
    section = None
    for line in lines:
        if m := MLC_SECTION.match(line):
            section = m.group(1).lower()
        elif (m := MLC_THROUGHPUT.match(line)) and section and m.group(1).upper() != "N/A":
            samples[section].append(_num(m.group(1), "throughput"))
        else:
            for kind, value in MLC_LINE.findall(line):
                if value.upper() != "N/A":
                    samples["decode" if kind.lower() == "decode" else "prefill"].append(_num(value, f"{kind} tok/s"))
    device = _device(meta)
    n_p, n_g = _meta_int(meta, "n_prompt"), _meta_int(meta, "n_gen")
    rows = []
    for kind, values in samples.items():
        if values:
            tps, std = _spread(values)
            rows.append(Result(
                source="mlc", device=device, runtime="mlc-llm", artifact=meta.get("artifact", "unknown"),
                test=("pp" + (str(n_p) if n_p else "")) if kind == "prefill" else ("tg" + (str(n_g) if n_g else "")),
                tokens_per_s=tps, stddev=std, n_prompt=n_p if kind == "prefill" else 0,
                n_gen=n_g if kind == "decode" else 0, threads=_meta_int(meta, "threads"),
                artifact_sha256=meta.get("sha256", ""), quant=meta.get("quant", ""), date=meta["date"],
                raw={"samples": values, "meta": meta}))
    if not rows:
        raise Bad("statistics lines hold no figures (all N/A)")
    return rows


def _llmfarm_row(samples: list[float], meta: dict, raw: dict) -> list[Result]:
    if not samples:
        raise Bad("no per-message figures ('12.34 ses, 15.60 t/s' lines)")
    tps, std = _spread(samples)
    n_g = _meta_int(meta, "n_gen")
    return [Result(source="llmfarm", device=_device(meta), runtime="llama.cpp",
                   artifact=meta.get("artifact", "unknown"), test="tg" + (str(n_g) if n_g else ""),
                   tokens_per_s=tps, stddev=std, n_gen=n_g,
                   threads=_meta_int(meta, "threads"), artifact_sha256=meta.get("sha256", ""),
                   quant=meta.get("quant", ""), flags=PROMPT_TIME, date=meta["date"], raw={**raw, "meta": meta})]


def _llmfarm(lines: list[str], meta: dict) -> list[Result]:
    figures = []
    for line in lines:
        if m := LLMFARM_LINE.match(line):
            figures.append([_num(m.group(1), "seconds"), _num(m.group(2), "t/s")])
        elif line and not line.startswith("#") and ":" not in line:
            raise Bad(f"line {line[:40]!r} is neither 'key: value' nor '<seconds> ses, <t/s> t/s'")
    return _llmfarm_row([t for _, t in figures if t > 0], meta, {"messages": figures})


def _llmfarm_history(doc: list[dict], meta: dict) -> list[Result]:
    replies = [m for m in doc if m.get("sender") == "system" and str(m.get("state", "")).startswith("predicted")]
    samples = [_num(m["tok_sec"], "tok_sec") for m in replies]
    return _llmfarm_row([s for s in samples if s > 0], meta, {"tok_sec": samples})


def _ours(doc: dict, meta: dict) -> list[Result]:
    if doc.get("version") != 1:
        raise Bad(f"version {doc.get('version')!r}; this minicpm-edge reads version 1")
    rows = doc.get("rows")
    if not isinstance(rows, list):
        raise Bad("no 'rows' list")
    out = []
    for i, r in enumerate(rows, 1):
        try:
            out.append(Result(**r))
        except TypeError as e:
            raise Bad(f"row {i}: {e}") from None
    return out


PARSERS = {"llama-bench json": _llama_bench, "llama-bench jsonl": _llama_bench,
           "llama-bench csv": _llama_bench, "llama-bench md": _markdown, "MLC stats": _mlc,
           "LLMFarm": _llmfarm, "LLMFarm history": _llmfarm_history, "minicpm-edge JSON": _ours}
