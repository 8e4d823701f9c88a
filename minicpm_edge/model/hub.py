"""Model arguments that name a Hugging Face hub repository (`openbmb/MiniCPM4-0.5B`) instead of a local folder.

`resolve_model` is called wherever a model path is opened (Checkpoint, the runtimes, eval), so every verb takes a hub
id. A path that exists, or whose first component is a local folder, is always local. Otherwise an `owner/name` string
is fetched with `huggingface_hub.snapshot_download` into its cache (its own progress bars), or, offline
(HF_HUB_OFFLINE=1), taken from that cache; when that is not possible the error says why and how to pass a folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import UserError

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
# what the toolchain reads from a checkpoint (no training states, no other formats)
PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]
BIN_PATTERNS = ["pytorch_model*.bin"]


def is_hub_id(model: str | Path) -> bool:
    """An `owner/name` that is not a local path (nor inside a local folder called `owner`)."""
    s = str(model)
    return bool(HUB_ID.fullmatch(s)) and not Path(s).exists() and not Path(s.split("/")[0]).exists()


def model_name(path: Path) -> str:
    """The model's name: a hub snapshot (`models--owner--name/snapshots/<hash>`) is called `name`."""
    path = Path(path)
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.split("--")[-1]
    return path.resolve().name if path.name in ("", ".", "..") else path.name


def resolve_model(model: str | Path) -> Path:
    """A local folder or file for `model`: the path itself, or the hub snapshot an `owner/name` id names."""
    if not is_hub_id(model):
        return Path(model)
    repo = str(model)
    how = (f"download it where a network is available (huggingface-cli download {repo} --local-dir DIR) and pass "
           "the folder DIR")
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise UserError(f"{repo}: no such folder, and huggingface_hub (needed to fetch hub ids) is not installed; "
                        "pip install huggingface_hub, or pass a local folder") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    not_found = tuple(getattr(errors, n) for n in ("RepositoryNotFoundError", "RevisionNotFoundError",
                                                   "EntryNotFoundError") if hasattr(errors, n))
    not_cached = tuple(getattr(errors, n) for n in ("LocalEntryNotFoundError", "OfflineModeIsEnabled")
                       if hasattr(errors, n))
    try:
        patterns = PATTERNS
        if not offline:
            files = huggingface_hub.list_repo_files(repo)
            if not any(f.endswith(".safetensors") for f in files):
                patterns = PATTERNS + BIN_PATTERNS
        else:
            patterns = PATTERNS + BIN_PATTERNS  # whatever the cache holds
        folder = Path(huggingface_hub.snapshot_download(repo, allow_patterns=patterns, local_files_only=offline))
    except not_cached + not_found as e:  # LocalEntryNotFoundError is an EntryNotFoundError: offline first
        if offline or isinstance(e, not_cached):
            raise UserError(f"{repo}: not a local folder; offline (HF_HUB_OFFLINE) and the hub cache has no copy of "
                            f"it; {how}") from None
        raise UserError(f"{repo}: not a local folder, and the Hugging Face hub has no model of that name (or it "
                        "is gated); pass a local checkpoint folder") from None
    except (OSError, ValueError) as e:  # connection errors, HTTP errors, invalid ids
        first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UserError(f"{repo}: not a local folder, and the Hugging Face hub cannot be reached ({first}); "
                        f"{how}") from None
    if not (folder / "config.json").is_file():
        raise UserError(f"{repo}: the hub snapshot at {folder} has no config.json (not a model checkpoint); "
                        "pass a local checkpoint folder")
    return folder
