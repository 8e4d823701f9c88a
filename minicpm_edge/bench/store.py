"""Benchmark results in one SQLite file: one row per measurement, whatever produced it.

Rows come from `bench run` (source "measured"), from phone result files (llama-bench, mlc, llmfarm) and from
published figures. A unique index over the natural key (source, device, runtime, artifact, sha256, test, token
counts, threads, date, tokens/s) makes ingesting the same file twice a no-op; `date` is the source's own timestamp
(llama-bench's test_time, the time of our run, the `date:` line of a kit file), which has one-second resolution, so
the figure itself is part of the key: two runs started in the same second are two rows.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import UserError

SCHEMA_VERSION = 2
SOURCES = ("measured", "llama-bench", "mlc", "llmfarm", "published")
KEY = ("source", "device", "runtime", "artifact", "artifact_sha256", "test", "n_prompt", "n_gen", "threads", "date",
       "tokens_per_s")

SCHEMA = """
CREATE TABLE results (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    device TEXT NOT NULL,
    runtime TEXT NOT NULL,
    artifact TEXT NOT NULL,
    artifact_sha256 TEXT NOT NULL DEFAULT '',
    quant TEXT NOT NULL DEFAULT '',
    test TEXT NOT NULL,
    n_prompt INTEGER NOT NULL DEFAULT 0,
    n_gen INTEGER NOT NULL DEFAULT 0,
    tokens_per_s REAL NOT NULL,
    stddev REAL,
    threads INTEGER NOT NULL DEFAULT 0,
    flags TEXT NOT NULL DEFAULT '',
    date TEXT NOT NULL DEFAULT '',
    bytes_per_token INTEGER NOT NULL DEFAULT 0,
    raw TEXT NOT NULL DEFAULT '{}'
);
"""
INDEX = f"CREATE UNIQUE INDEX results_key ON results ({', '.join(KEY)});"


@dataclass
class Result:
    """One measurement. test: pp<N> (prompt), tg<N> (decode), pp<N>+tg<M>; a bare pp/tg when the count is unknown.

    threads 0 and empty strings mean "not known"; flags is a comma-separated list (e.g. "includes prompt time").
    """

    source: str
    device: str
    runtime: str
    artifact: str
    test: str
    tokens_per_s: float
    n_prompt: int = 0
    n_gen: int = 0
    stddev: float | None = None
    threads: int = 0
    artifact_sha256: str = ""
    quant: str = ""
    flags: str = ""
    date: str = ""
    bytes_per_token: int = 0
    raw: dict = field(default_factory=dict)

    def check(self) -> Result:
        for name in ("source", "device", "runtime", "artifact", "test", "artifact_sha256", "quant", "flags", "date"):
            v = getattr(self, name)
            if not isinstance(v, str) or not _encodable(v):
                raise UserError(f"result field {name} must be text, not {v!r}")
        if self.source not in SOURCES:
            raise UserError(f"unknown result source {self.source!r}; expected one of {', '.join(SOURCES)}")
        if not self.device or not self.runtime or not self.artifact or not self.test:
            raise UserError(f"result for test {self.test!r} lacks a device, runtime or artifact name")
        tps = self.tokens_per_s
        if not _number(tps) or tps <= 0:
            raise UserError(f"{self.test} on {self.device}: tokens/s must be a positive number, not {tps!r}")
        for name in ("n_prompt", "n_gen", "threads", "bytes_per_token"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63:  # SQLite's INTEGER
                raise UserError(f"{self.test} on {self.device}: {name} must be a whole number >= 0, not {v!r}")
        if self.stddev is not None and not _number(self.stddev):
            raise UserError(f"{self.test} on {self.device}: stddev must be a number >= 0 or null, not {self.stddev!r}")
        if not isinstance(self.raw, dict):
            raise UserError(f"{self.test} on {self.device}: raw must be a JSON object, not {self.raw!r:.60}")
        try:
            json.dumps(self.raw, sort_keys=True)  # as the store writes it
        except (TypeError, ValueError, RecursionError) as e:
            raise UserError(f"{self.test} on {self.device}: raw cannot be stored as JSON ({e})") from None
        bw = self.raw.get("bandwidth_gbs")  # the report's roofline for measured rows
        if bw is not None and not _number(bw):
            raise UserError(f"{self.test} on {self.device}: raw bandwidth_gbs must be a number, not {bw!r}")
        return self

    @property
    def is_decode(self) -> bool:
        return self.test.startswith("tg")


def _number(x) -> bool:
    """A finite number >= 0 (bool excluded)."""
    try:
        return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) and x >= 0
    except OverflowError:  # an int too large for a float
        return False


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")  # lone surrogates (from JSON escapes) cannot be stored
        return True
    except UnicodeEncodeError:
        return False


def default_path() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "minicpm-edge" / "bench.sqlite"


class Store:
    """`with Store(path) as s: s.add(rows); s.rows()`; path None means default_path()."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else default_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path)
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                with self.db:
                    self.db.executescript(SCHEMA + INDEX + f"PRAGMA user_version = {SCHEMA_VERSION};")
            elif version == 1:  # its key lacked tokens_per_s; every v1 row is unique under the wider key too
                with self.db:
                    self.db.executescript(f"DROP INDEX results_key; {INDEX} PRAGMA user_version = {SCHEMA_VERSION};")
            elif version > SCHEMA_VERSION:
                raise UserError(f"{self.path}: results store has schema {version}; this minicpm-edge reads "
                                f"up to {SCHEMA_VERSION} (upgrade minicpm-edge)")
        except sqlite3.DatabaseError as e:
            raise UserError(f"{self.path}: not a results store ({e})") from None
        except OSError as e:
            raise UserError(f"{self.path}: cannot open the results store ({e.strerror or e})") from None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.db.close()

    def add(self, rows) -> int:
        """Insert rows (Result objects); returns how many were new (duplicates by natural key are skipped)."""
        names = [f.name for f in fields(Result)]
        sql = f"INSERT OR IGNORE INTO results ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
        new = 0
        with self.db:
            for r in rows:
                values = [json.dumps(v, sort_keys=True) if n == "raw" else v for n, v in asdict(r.check()).items()]
                new += self.db.execute(sql, values).rowcount
        return new

    def rows(self, device: str | None = None, source: str | None = None, test: str | None = None) -> list[Result]:
        """Stored rows, oldest first; device/source match exactly, test matches as a prefix ("tg" = all decode)."""
        where, args = [], []
        for col, val in (("device", device), ("source", source)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        if test is not None:
            where.append("test LIKE ? ESCAPE '\\'")
            args.append(test.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
        names = [f.name for f in fields(Result)]
        sql = f"SELECT {', '.join(names)} FROM results" + (f" WHERE {' AND '.join(where)}" if where else "")
        out = []
        try:
            for values in self.db.execute(sql + " ORDER BY date, id", args):
                rec = dict(zip(names, values))
                try:
                    rec["raw"] = json.loads(rec["raw"])
                    out.append(Result(**rec).check())
                except (TypeError, ValueError, RecursionError, UserError) as e:
                    raise UserError(f"{self.path}: a stored row is malformed ({str(e)[:160]})") from None
        except sqlite3.DatabaseError as e:
            raise UserError(f"{self.path}: not a results store ({e})") from None
        return out

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
