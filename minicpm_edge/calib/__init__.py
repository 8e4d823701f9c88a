"""Calibration and evaluation text: the bundled bilingual set, .txt/.jsonl files, named HF datasets; token batches."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from ..errors import UserError
from ..model.tokenizer import AI, USER

CALIB_DIR = Path(__file__).resolve().parents[2] / "calib_data"
HELDOUT_DIR = CALIB_DIR / "heldout"
DOC_SEPARATOR = "<|doc|>"  # used by files whose documents contain blank lines (code)
NAMED = ("wikitext2", "c4")


def render_messages(messages: list[dict]) -> str:
    """A conversation in MiniCPM's chat format: `<用户>{user}<AI>{assistant}` per turn."""
    return "".join((USER if m["role"] == "user" else AI) + m["content"] for m in messages)


def read_txt(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if DOC_SEPARATOR in (line.strip() for line in lines):
        chunks, cur = [], []
        for line in lines:
            if line.strip() == DOC_SEPARATOR:
                chunks.append("\n".join(cur))
                cur = []
            else:
                cur.append(line)
        chunks.append("\n".join(cur))
    else:
        chunks = text.split("\n\n")
    return [c.strip("\n") for c in chunks if c.strip()]


def read_jsonl(path: Path) -> list[str]:
    docs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if "messages" in rec:
                docs.append(render_messages(rec["messages"]))
            elif isinstance(rec.get("text"), str):
                docs.append(rec["text"])
            else:
                raise KeyError("expected a 'text' or 'messages' field")
        except (json.JSONDecodeError, RecursionError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{path}:{n}: bad calibration record ({e})") from None
    return docs


def read_dir(path: Path) -> list[str]:
    files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".jsonl") and p.is_file())
    if not files:
        raise UserError(f"{path}: no .txt or .jsonl files")
    return [doc for f in files for doc in read_file(f)]


def read_file(path: Path) -> list[str]:
    try:
        return read_jsonl(path) if path.suffix == ".jsonl" else read_txt(path)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None


def load_documents(source: str | Path | None = None) -> list[str]:
    """Documents from the bundled set (None), a .txt/.jsonl file, a folder of them, or a named HF dataset."""
    if source is None:
        return read_dir(CALIB_DIR)
    if str(source) in NAMED:
        return _hf_dataset(str(source))
    path = Path(source)
    if path.is_dir():
        return read_dir(path)
    if not path.is_file():
        raise UserError(f"{source}: no such file (give a .txt or .jsonl file, a folder, or one of {', '.join(NAMED)})")
    return read_file(path)


def heldout_documents() -> list[str]:
    """Bundled evaluation text, written on topics the calibration set avoids."""
    return read_dir(HELDOUT_DIR)


def _hf_dataset(name: str) -> list[str]:
    try:
        import datasets  # noqa: F401  (optional)
    except ImportError:
        raise UserError(f"calibration set {name!r} needs the `datasets` package (pip install datasets) and network access") from None
    try:
        if name == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="train")
            return ["\n\n".join(ds["text"])]
        ds = datasets.load_dataset("allenai/c4", data_files="en/c4-train.00000-of-01024.json.gz", split="train")
        return list(ds["text"][:20000])
    except Exception as e:  # offline, hub errors
        raise UserError(f"cannot load {name!r} from the Hugging Face hub ({str(e).splitlines()[0][:160]})") from None


def token_stream(tokenizer, docs: list[str]) -> list[int]:
    """Each document BOS-prefixed, concatenated."""
    return [i for d in docs for i in tokenizer.encode(d, bos=True)]


def calibration_batches(tokenizer, docs: list[str], nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """`nsamples` non-overlapping windows of `seqlen` tokens, from the documents shuffled with `seed`."""
    if nsamples <= 0 or seqlen <= 1:
        raise UserError(f"need nsamples >= 1 and seqlen >= 2 (got {nsamples} x {seqlen})")
    docs = list(docs)
    random.Random(seed).shuffle(docs)
    ids = token_stream(tokenizer, docs)
    need = nsamples * seqlen
    if len(ids) < need:
        raise UserError(f"calibration text too short: {len(ids)} tokens for {nsamples} x {seqlen} = {need}; "
                        "give more text or lower --nsamples/--seqlen")
    return torch.tensor(ids[:need], dtype=torch.long).view(nsamples, seqlen)
