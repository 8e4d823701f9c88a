"""Prefill and decode tokens/s of an artifact through its own runner, on this machine.

Prefill: `runner.logits` over n_prompt tokens. Decode: `runner.generate` after a short prompt, timed twice per
run, for 1 token and for 1 + n_gen tokens; the difference is n_gen decode steps with the prompt and the first
token's cost subtracted, so the decode rate excludes prefill for any runner.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import threading
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from time import perf_counter

import numpy as np
import psutil

from ..artifact import MANIFEST, sha256
from ..errors import UserError
from . import roofline
from .ingest import OURS
from .store import Result

DECODE_PROMPT = 8


def local_device() -> str:
    """A readable name for this machine's CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Hardware", "Model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def artifact_info(path: Path) -> dict:
    """name, bytes and sha256 of a file or folder (a folder with manifest.json is identified by the manifest's hash)."""
    path = Path(path)
    if path.is_file():
        return {"name": path.name, "bytes": path.stat().st_size, "sha256": sha256(path)}
    files = sorted(p for p in path.rglob("*") if p.is_file())
    if (path / MANIFEST).is_file():
        digest = sha256(path / MANIFEST)
    else:
        h = hashlib.sha256()
        for p in files:
            h.update(f"{p.relative_to(path).as_posix()}:{sha256(p)}\n".encode())
        digest = h.hexdigest()
    return {"name": path.name, "bytes": sum(p.stat().st_size for p in files), "sha256": digest}


class PeakRSS:
    """Highest resident set size of this process while the block runs (sampled with psutil)."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.proc, self.peak = interval, psutil.Process(), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        self.peak = max(self.peak, self.proc.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakRSS:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def _stats(samples: list[float]) -> dict:
    return {"tokens_per_s": float(np.median(samples)), "stddev": float(np.std(samples, ddof=1)) if len(samples) > 1
            else None, "min": min(samples), "max": max(samples), "samples": samples}


def _timed(fn, *args) -> tuple[float, object]:
    t = perf_counter()
    out = fn(*args)
    return perf_counter() - t, out


def context_needed(n_prompt: int, n_gen: int) -> int:
    """Tokens of context the timing loop uses: the prompt, or the short decode prompt plus the generated tokens."""
    return max(n_prompt, DECODE_PROMPT + 1 + n_gen)


def measure(runner, n_prompt: int = 512, n_gen: int = 128, runs: int = 3, artifact: Path | None = None,
            bandwidth_gbs: float | None = None, seed: int = 0) -> dict:
    """Time prefill and decode `runs` times; return the summary with "rows" (store rows as dicts) in it.

    The summary is what `bench run --json` writes and `bench ingest` reads back. bandwidth_gbs None: measured here.
    """
    if n_prompt < 1 or n_gen < 1 or runs < 1:
        raise UserError("n_prompt, n_gen and runs must all be at least 1")
    rng = np.random.default_rng(seed)
    prompt = [int(i) for i in rng.integers(3, runner.vocab_size, n_prompt)]
    short = prompt[:DECODE_PROMPT]
    runner.logits(prompt[:16])  # warm-up: first-call allocations, lazy initialisation
    runner.generate(short, 2)
    prefill, decode = [], []
    with PeakRSS() as rss:
        for _ in range(runs):
            t, _ = _timed(runner.logits, prompt)
            prefill.append(n_prompt / t)
        # a decode sample is the difference of two timings; a stall in the short one makes it meaningless (<= 0),
        # so such a pair is repeated, up to `runs` extra times
        for _ in range(2 * runs):
            t1, one = _timed(runner.generate, short, 1)
            tn, many = _timed(runner.generate, short, 1 + n_gen)
            if tn > t1 and len(many) > len(one):
                decode.append((len(many) - len(one)) / (tn - t1))
            if len(decode) == runs:
                break
    if len(decode) < runs:
        raise UserError(f"only {len(decode)} of {runs} decode timings were usable (the machine stalled during the "
                        f"1-token baseline); run again on a quieter machine or with a larger --n-gen")
    info = artifact_info(artifact) if artifact is not None else {"name": runner.name, "bytes": 0, "sha256": ""}
    try:
        roof = roofline.bytes_per_token(artifact) if artifact is not None else {}
    except UserError:
        roof = {}
    bandwidth = bandwidth_gbs if bandwidth_gbs is not None else roofline.measure_bandwidth(threads=runner.threads)
    bpt = roof.get("bytes_per_token", 0)
    summary = {
        "format": OURS, "version": 1, "device": local_device(), "runtime": runner.name, "threads": runner.threads,
        "artifact": info, "quant": roof.get("quant", ""), "n_prompt": n_prompt, "n_gen": n_gen, "runs": runs,
        "prefill": _stats(prefill), "decode": _stats(decode), "decode_prompt": DECODE_PROMPT,
        "peak_rss_bytes": rss.peak, "bandwidth_gbs": bandwidth, "bytes_per_token": bpt,
        "decode_bound": roofline.decode_bound(bandwidth, bpt) if bpt else None,
        "date": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
    }
    raw = {k: summary[k] for k in ("peak_rss_bytes", "bandwidth_gbs", "decode_prompt", "runs")}
    raw["artifact_bytes"] = info["bytes"]
    rows = []
    for kind, test, n_p, n_g in (("prefill", f"pp{n_prompt}", n_prompt, 0), ("decode", f"tg{n_gen}", 0, n_gen)):
        s = summary[kind]
        rows.append(Result(source="measured", device=summary["device"], runtime=runner.name, artifact=info["name"],
                           test=test, tokens_per_s=s["tokens_per_s"], n_prompt=n_p, n_gen=n_g, stddev=s["stddev"],
                           threads=int(runner.threads or 0), artifact_sha256=info["sha256"], quant=summary["quant"],
                           date=summary["date"], bytes_per_token=bpt,
                           raw={**raw, "samples": s["samples"]}).check())
    summary["rows"] = [asdict(r) for r in rows]
    return summary


def rows(summary: dict) -> list[Result]:
    """Store rows from a measure() summary."""
    return [Result(**r) for r in summary["rows"]]


def child_env() -> dict:
    """This process's environment for a child that times llama.cpp: OpenMP's wait policy at its default, unless the
    user chose one (minicpm_edge sets PASSIVE for torch, which makes ggml's many short barriers slow)."""
    import minicpm_edge

    env = dict(os.environ)
    if minicpm_edge.OMP_POLICY_SET_HERE:
        env.pop("OMP_WAIT_POLICY", None)
        env["MINICPM_EDGE_OMP_DEFAULT"] = "1"
    return env


def measure_apart(artifact: Path, runtime: str, threads: int | None, n_ctx: int, **kw) -> dict:
    """measure() of open_runner(artifact, runtime, threads, n_ctx) in a child process with child_env(): the summary,
    or the child's one-line error as a UserError."""
    args = {"artifact": str(artifact), "runtime": runtime, "threads": threads, "n_ctx": n_ctx, **kw}
    r = subprocess.run([sys.executable, "-m", "minicpm_edge.bench.run", json.dumps(args)], capture_output=True,
                       text=True, env=child_env())
    lines = r.stderr.strip().splitlines()
    if r.returncode:
        raise UserError(lines[-1] if lines and r.returncode == 2 else f"timing {artifact} failed in its child "
                        f"process (exit {r.returncode}): {lines[-1] if lines else 'no message'}")
    try:  # the summary is the child's last line of output (a runtime may have printed before it)
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise UserError(f"timing {artifact}: its child process gave no result") from None


def _child(arg: str) -> None:
    from ..runtimes import open_runner

    a = json.loads(arg)
    artifact = Path(a.pop("artifact"))
    try:
        runner = open_runner(artifact, a.pop("runtime"), threads=a.pop("threads"), n_ctx=a.pop("n_ctx"))
        summary = measure(runner, artifact=artifact, **a)
    except UserError as e:
        sys.stderr.write(f"{e}\n")
        raise SystemExit(2) from None
    sys.stdout.write("\n" + json.dumps(summary) + "\n")


if __name__ == "__main__":
    _child(sys.argv[1])
