"""Artifacts appear whole or not at all: built in a hidden staging folder, sealed with a manifest, renamed into place.

`manifest.json` lists every file with its size and sha256; `verify` re-checks a folder against it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import tempfile
import warnings
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
        assert isinstance(files, dict) and all(isinstance(r, dict) for r in files.values())
    except (json.JSONDecodeError, KeyError, TypeError, AssertionError, UnicodeDecodeError, RecursionError):
        raise UserError(f"{path}: malformed manifest") from None
    for rel, rec in files.items():
        p = Path(folder) / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise UserError(f"{path}: malformed manifest (file {rel!r} lies outside the artifact)")
        try:
            if not p.is_file():
                raise UserError(f"{folder}: {rel} is listed in the manifest but missing")
            if p.stat().st_size != rec.get("bytes") or sha256(p) != rec.get("sha256"):
                raise UserError(f"{folder}: {rel} does not match its manifest checksum (corrupt or modified)")
        except OSError as e:  # a name the file system refuses (too long, ...) or an unreadable file
            raise UserError(f"{folder}: {rel[:80]!r} listed in the manifest cannot be read "
                            f"({e.strerror or e})") from None
    listed = set(files) | {MANIFEST}
    extra = [p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file()]
    extra = [e for e in extra if e not in listed]
    checks = [*map(_check_gguf, sorted(Path(folder).rglob("*.gguf"))),
              *map(_check_tensor_cache, sorted(Path(folder).rglob("tensor-cache.json")))]
    return {"files": len(files), "unlisted": sorted(extra), "kind": str(manifest.get("kind")), "checks": checks}


def open_gguf(path: Path):
    """gguf-py's reader on `path`, or a UserError for a file it cannot read.

    The header is walked first with every count checked against the file size: gguf-py trusts the counts, and an
    array claiming 2^40 elements past the end of the file makes it loop, appending empty arrays, until memory runs out.
    """
    import gguf
    import numpy as np

    _check_gguf_layout(Path(path))
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):  # numpy overflow warnings on damaged offsets
            warnings.simplefilter("ignore")
            return gguf.GGUFReader(path)
    except Exception as e:  # gguf-py raises ValueError, struct.error, IndexError, KeyError... on damaged files
        raise UserError(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e)[:120]})") from None


_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType: bytes
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _check_gguf_layout(path: Path) -> None:
    """Walk the GGUF header (magic, version, key/values, tensor infos) without trusting any count or length."""
    import mmap

    def bad(why: str):
        return UserError(f"{path}: not a readable GGUF file ({why})")

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise bad("shorter than a GGUF header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data[:4] != b"GGUF":
                raise bad("no GGUF magic")
            order = "<" if struct.unpack_from("<I", data, 4)[0] in (2, 3) else ">"
            if struct.unpack_from(order + "I", data, 4)[0] not in (2, 3):
                raise bad("GGUF version is neither 2 nor 3")
            pos = 8

            def take(n: int) -> int:
                nonlocal pos
                if n < 0 or pos + n > size:
                    raise bad(f"header runs past the end of the file at byte {pos}")
                pos += n
                return pos - n

            def u32() -> int:
                return struct.unpack_from(order + "I", data, take(4))[0]

            def u64() -> int:
                return struct.unpack_from(order + "Q", data, take(8))[0]

            def string() -> None:
                take(u64())

            def value(kind: int, depth: int = 0) -> None:
                if kind in _GGUF_SCALARS:
                    take(_GGUF_SCALARS[kind])
                elif kind == _GGUF_STRING:
                    string()
                elif kind == _GGUF_ARRAY and depth < 4:
                    item, count = u32(), u64()
                    if item in _GGUF_SCALARS:
                        take(count * _GGUF_SCALARS[item])
                        return
                    if count * (8 if item == _GGUF_STRING else 12) > size - pos:  # the least each element takes
                        raise bad(f"an array of {count} elements cannot fit in the file")
                    for _ in range(count):
                        value(item, depth + 1)
                else:
                    raise bad(f"unknown value type {kind}")

            n_tensors, n_kv = u64(), u64()
            if n_kv * 13 + n_tensors * 24 > size - pos:
                raise bad(f"{n_kv} key/values and {n_tensors} tensors cannot fit in the file")
            for _ in range(n_kv):
                string()
                value(u32())
            for _ in range(n_tensors):
                string()
                dims = u32()
                if dims > 8:
                    raise bad(f"a tensor with {dims} dimensions")
                take(8 * dims + 4 + 8)


def _check_gguf(path: Path) -> str:
    """The GGUF parses, and every tensor's data lies inside the file."""
    r = open_gguf(path)
    size = path.stat().st_size
    for t in r.tensors:
        if t.data_offset + t.n_bytes > size:
            raise UserError(f"{path}: tensor {t.name} runs past the end of the file")
    try:
        version = int(r.fields["GGUF.version"].parts[-1][0])
    except (KeyError, IndexError, TypeError, ValueError):
        raise UserError(f"{path}: not a readable GGUF file (no version field)") from None
    return f"{path.name}: GGUF v{version}, {len(r.tensors)} tensors"


def _check_tensor_cache(path: Path) -> str:
    """Every MLC shard has the byte count and md5 that tensor-cache.json gives, and its records fit in it."""
    try:
        shards = json.loads(path.read_text())["records"]
        for shard in shards:
            data = (path.parent / shard["dataPath"]).read_bytes()
            if len(data) != shard["nbytes"] or hashlib.md5(data).hexdigest() != shard["md5sum"]:
                raise UserError(f"{path.parent / shard['dataPath']}: size or md5 differs from {path.name}")
            for rec in shard["records"]:
                if rec["byteOffset"] + rec["nbytes"] > len(data):
                    raise UserError(f"{path}: {rec['name']} runs past the end of {shard['dataPath']}")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, KeyError, TypeError, ValueError):
        raise UserError(f"{path}: malformed tensor cache (or a shard it names is missing)") from None
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
        reason = e.strerror or f"{e}; is the disk full?"  # a short write (numpy's tofile) carries no errno
        raise UserError(f"{out}: writing failed ({reason}); nothing was written") from None
    except BaseException:
        _remove(tmp)
        raise


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        p.unlink()
