"""Artifacts appear whole or not at all: built in a hidden staging folder, sealed with a manifest, renamed into place.

`manifest.json` lists every file with its size and sha256; `verify` re-checks a folder against it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError

MANIFEST = "manifest.json"


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, kind: str, extra: dict | None = None) -> dict:
    """Checksum every file under `folder` (the manifest itself excluded) into manifest.json."""
    from . import __version__

    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(folder).as_posix()] = {"bytes": p.stat().st_size, "sha256": sha256(p)}
    manifest = {"kind": kind, "tool": f"minicpm-edge {__version__}", "files": files, **(extra or {})}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest


def verify(folder: Path) -> dict:
    """Re-check sizes and sha256 of every file listed in `folder`/manifest.json; raise UserError on the first mismatch."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder}: no {MANIFEST}; not an artifact written by minicpm-edge")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        assert isinstance(files, dict)
    except (json.JSONDecodeError, KeyError, AssertionError, UnicodeDecodeError):
        raise UserError(f"{path}: malformed manifest") from None
    for rel, rec in files.items():
        p = Path(folder) / rel
        if not p.is_file():
            raise UserError(f"{folder}: {rel} is listed in the manifest but missing")
        if p.stat().st_size != rec.get("bytes") or sha256(p) != rec.get("sha256"):
            raise UserError(f"{folder}: {rel} does not match its manifest checksum (corrupt or modified)")
    listed = set(files) | {MANIFEST}
    extra = [p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file()]
    extra = [e for e in extra if e not in listed]
    checks = [*map(_check_gguf, sorted(Path(folder).rglob("*.gguf"))),
              *map(_check_tensor_cache, sorted(Path(folder).rglob("tensor-cache.json")))]
    return {"files": len(files), "unlisted": sorted(extra), "kind": manifest.get("kind"), "checks": checks}


def _check_gguf(path: Path) -> str:
    """The GGUF parses, and every tensor's data lies inside the file."""
    import gguf

    try:
        r = gguf.GGUFReader(path)
    except Exception as e:  # gguf-py raises ValueError, struct.error, IndexError... on damaged files
        raise UserError(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e)[:120]})") from None
    size = path.stat().st_size
    for t in r.tensors:
        if t.data_offset + t.n_bytes > size:
            raise UserError(f"{path}: tensor {t.name} runs past the end of the file")
    return f"{path.name}: GGUF v{int(r.fields['GGUF.version'].parts[-1][0])}, {len(r.tensors)} tensors"


def _check_tensor_cache(path: Path) -> str:
    """Every MLC shard has the byte count and md5 that tensor-cache.json gives, and its records fit in it."""
    try:
        shards = json.loads(path.read_text())["records"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{path}: malformed tensor cache") from None
    for shard in shards:
        data = (path.parent / shard["dataPath"]).read_bytes()
        if len(data) != shard["nbytes"] or hashlib.md5(data).hexdigest() != shard["md5sum"]:
            raise UserError(f"{path.parent / shard['dataPath']}: size or md5 differs from {path.name}")
        for rec in shard["records"]:
            if rec["byteOffset"] + rec["nbytes"] > len(data):
                raise UserError(f"{path}: {rec['name']} runs past the end of {shard['dataPath']}")
    return f"{path.parent.name}: {len(shards)} MLC shards, md5 ok"


def publish(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished folder `tmp` to `out`, replacing an existing `out` only with force."""
    old = None
    if out.exists():
        if not force:
            raise UserError(f"{out} exists; add --force to replace it")
        old = out.parent / f".{out.name}.old"
        if old.exists():
            _remove(old)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        _remove(old)


@contextlib.contextmanager
def staging(out: Path, force: bool, kind: str, manifest_extra: dict | None = None):
    """Yield an empty hidden folder beside `out`; on success seal it with a manifest and rename it to `out`.

    On any error the staging folder is removed and `out` is left as it was.
    """
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} exists; add --force to replace it")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=parent))
    except OSError as e:
        raise UserError(f"{parent}: cannot write here ({e.strerror or e})") from None
    try:
        yield tmp
        write_manifest(tmp, kind, manifest_extra)
        publish(tmp, out, force)
    except OSError as e:
        _remove(tmp)
        raise UserError(f"{out}: writing failed ({e.strerror or e}); nothing was written") from None
    except BaseException:
        _remove(tmp)
        raise


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        p.unlink()
