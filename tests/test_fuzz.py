"""Fuzzing of the parsers that read untrusted files: every outcome is a success or a UserError, never a crash.

Valid seed files are mutated (bit flips, truncation, inserted, deleted and overwritten bytes, JSON-level edits of
headers and documents) and fed to:
- `checkpoint`: Checkpoint (safetensors header and config.json) with its tensor reads, inspect's summary and
  roofline's own safetensors header reader, on a plain and a GPTQ checkpoint;
- `gguf`: artifact verification's GGUF check and roofline's GGUF reader (both through gguf-py);
- `bench`: bench ingest of every result format, the rows stored and reported;
- `manifest`: `inspect --verify` of an artifact with a mutated manifest.json or MLC tensor-cache.json.

The budget is FUZZ_SECONDS in all (default 20, split evenly between the targets), with FUZZ_SEED (default 0).
An input must be handled within STEP_SECONDS and within MEMORY_HEADROOM of extra address space, else it fails too.
Input number i of a target is the same on every run (its RNG is seeded with seed, target and i), so a longer budget
tries the same inputs and then more. A failing input is saved with its traceback under FUZZ_FAILURES (default
$TMPDIR/minicpm-edge-fuzz-failures/seed<S>-<target>-<i>); the assertion message names it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import resource
import shutil
import signal
import struct
import tempfile
import time
import traceback
from pathlib import Path

import gguf
import numpy as np
import psutil
import pytest

from conftest import TINY, quantized, random_state, small_variant, write_checkpoint
from minicpm_edge.errors import UserError

BUDGET = float(os.environ.get("FUZZ_SECONDS", "20"))
SEED = int(os.environ.get("FUZZ_SEED", "0"))
TARGETS = ("checkpoint", "gguf", "bench", "manifest")
INTERESTING_INTS = [0, 1, -1, 7, 8, 255, 2**15, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**30,
                    -10**30]
INTERESTING = INTERESTING_INTS + [0.0, -0.0, 1e-300, 1e308, -1e308, float("inf"), float("nan"), True, False, None,
                                  "", "x", "F16", "I32", "BF16", "model.norm.weight", "\ud800", "é" * 3, "9" * 400,
                                  "12,5", "N/A", [], [0], [1, 2], [[1]], {}, {"a": 1}, "[" * 50]


# -- mutators -----------------------------------------------------------------------------------------------------
def mutate_bytes(data: bytes, rng: random.Random, hot: int) -> bytes:
    """One to three byte-level edits; positions favour the first `hot` bytes (headers, where parsing happens)."""
    b = bytearray(data)

    def pos(extra: int = 0) -> int:
        n = len(b) + extra
        if n <= 0:
            return 0
        return rng.randrange(min(n, hot)) if rng.random() < 0.75 else rng.randrange(n)

    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(("flip", "flip", "truncate", "insert", "delete", "overwrite", "duplicate"))
        if kind == "flip" and b:
            for _ in range(rng.randint(1, 8)):
                i = pos()
                b[i] ^= 1 << rng.randrange(8)
        elif kind == "truncate":
            del b[pos(1):]
        elif kind == "insert":
            i = pos(1)
            b[i:i] = rng.choice([bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))), b"[" * 3000,
                                 b"\x00" * 64, b"\xff" * 8, b'"', b"\n", b","])
        elif kind == "delete" and b:
            i = pos()
            del b[i:i + rng.randint(1, 64)]
        elif kind == "overwrite" and b:
            i = pos()
            v = rng.choice(INTERESTING_INTS) % 2**64
            b[i:i + 8] = struct.pack("<Q", v)[: rng.choice((1, 2, 4, 8))]
        elif kind == "duplicate" and b:
            i, j = sorted(pos() for _ in range(2))
            k = pos(1)
            b[k:k] = b[i:j + 1]
    return bytes(b)


def interesting(rng: random.Random):
    return copy.deepcopy(rng.choice(INTERESTING + [rng.randint(-2**40, 2**40), rng.uniform(-1e6, 1e6)]))


def mutate_json(doc, rng: random.Random):
    """A copy of a JSON document with one to three random edits: a value replaced, a key removed or added."""
    doc = copy.deepcopy(doc)
    for _ in range(rng.randint(1, 3)):
        nodes = []  # (container, key) of every value

        def walk(x, depth=0):
            if depth > 20:
                return
            if isinstance(x, dict):
                for k in list(x):
                    nodes.append((x, k))
                    walk(x[k], depth + 1)
            elif isinstance(x, list):
                for i in range(len(x)):
                    nodes.append((x, i))
                    walk(x[i], depth + 1)
        walk(doc)
        if not nodes:
            return interesting(rng)
        container, key = rng.choice(nodes)
        kind = rng.random()
        if kind < 0.6:
            container[key] = interesting(rng)
        elif kind < 0.8:
            del container[key]
        elif isinstance(container, dict):
            container[rng.choice(["extra", "__metadata__", "dtype", "shape", "data_offsets", "files", "records"])] = \
                interesting(rng)
        else:
            container.insert(key, interesting(rng))
    return doc


def dumps(doc, rng: random.Random) -> str:
    return json.dumps(doc, indent=rng.choice((None, 1)), ensure_ascii=rng.random() < 0.5)


def mutate_safetensors(data: bytes, rng: random.Random) -> bytes:
    """Byte edits, or a JSON edit of the header re-encoded with a correct (or, at times, the old) length."""
    n = struct.unpack("<Q", data[:8])[0]
    if rng.random() < 0.5:
        return mutate_bytes(data, rng, hot=8 + n)
    header = dumps(mutate_json(json.loads(data[8:8 + n]), rng), rng).encode("utf-8", "surrogatepass")
    length = len(header) if rng.random() < 0.9 else n
    return struct.pack("<Q", length) + header + data[8 + n:]


def mutate_text(text: str, rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        try:
            return dumps(mutate_json(json.loads(text), rng), rng).encode("utf-8", "surrogatepass")
        except json.JSONDecodeError:  # not JSON: edit lines instead
            lines = text.splitlines()
            if lines:
                i = rng.randrange(len(lines))
                lines[i] = rng.choice([lines[i] * 2, lines[i][: len(lines[i]) // 2], "", str(rng.choice(INTERESTING)),
                                       lines[i].replace("1", rng.choice(["", "-", "1e999", "x", "9" * 40]))])
            return "\n".join(lines).encode("utf-8", "surrogatepass")
    return mutate_bytes(text.encode(), rng, hot=len(text))


# -- seeds ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz-seeds")
    plain = write_checkpoint(base / "plain", TINY, random_state(TINY, seed=3))
    gptq = quantized(small_variant(base / "variant", num_hidden_layers=1), base / "gptq", method="rtn",
                     nsamples=4, seqlen=32)
    (gptq / "tokenizer.model").unlink()  # not parsed here; keeps the copies small
    seed_gguf = _small_gguf(base / "seed.gguf")
    return {"checkpoints": [plain, gptq], "gguf": seed_gguf, "gguf_header": gguf.GGUFReader(seed_gguf).data_offset,
            "bench": _bench_files(base), "artifact": _artifact(base / "artifact")}


def _small_gguf(path: Path) -> Path:
    """A GGUF with every kind of field and a few tensors (F32, F16, Q4_0), as our writer lays it out."""
    w = gguf.GGUFWriter(path, "minicpm")
    w.add_name("fuzz")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_rope_freq_base(10000.0)
    w.add_token_list(["<unk>", "<s>", "</s>", "a", "b"])
    w.add_token_scores([0.0, 0.0, 0.0, -1.0, -2.0])
    w.add_token_types([2, 3, 3, 1, 1])
    w.add_add_bos_token(True)
    w.add_chat_template("{{ messages }}")
    w.add_tensor("token_embd.weight", np.arange(5 * 32, dtype=np.float32).reshape(5, 32) / 100)
    w.add_tensor("output_norm.weight", np.ones(32, dtype=np.float16))
    w.add_tensor("blk.0.attn_q.weight", np.zeros((32, 18), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _bench_files(base: Path) -> list[tuple[str, str]]:
    """(file name, text) of one valid file per result format bench ingest reads."""
    from minicpm_edge.bench.ingest import OURS
    from test_bench import LB, MD, META, SWIFTUI_MD, write_csv, write_json, write_jsonl

    files = [(name, writer(base / name).read_text()) for name, writer in
             (("lb.json", write_json), ("lb.jsonl", write_jsonl), ("lb.csv", write_csv))]
    files += [("lb.md", MD), ("ios.md", SWIFTUI_MD), ("meta.txt", META),
              ("mlc.txt", "device: Pixel 8\nn_gen: 128\nprefill: 48.3 tok/s, decode: 6.4 tok/s\n"
                          "prefill: N/A tok/s, decode: 6,6 tok/s\n"),
              ("mlc-verbose.txt", "device: Pixel 7\n----------- prefill -----------\nthroughput: 120.5 tok/s\n"
                                  "------------ decode ------------\nthroughput: 9.8 tok/s\n"),
              ("llmfarm.txt", "format: llmfarm-v1\ndevice: iPhone 15 Pro (A17 Pro)\ndate: 2024-05-01\n"
                              "12.31 ses, 17.92 t/s\n11.87 ses, 18.05 t/s\n"),
              ("history.json", json.dumps([
                  {"sender": "user", "state": "typed", "tok_sec": "0.0"},
                  {"sender": "system", "state": "predicted(totalSecond: 3)", "tok_sec": "14.5"}])),
              ("ours.json", json.dumps({"format": OURS, "version": 1, "rows": [
                  {"source": "measured", "device": "cpu", "runtime": "torch", "artifact": "a", "test": "tg128",
                   "tokens_per_s": 12.5, "n_gen": 128, "stddev": 0.2, "threads": 2, "bytes_per_token": 1000,
                   "raw": {"bandwidth_gbs": 20.0, "samples": [12.4, 12.6]}}, dict(LB[0], tokens_per_s=1)]}))]
    return files


def _artifact(folder: Path) -> Path:
    """A sealed artifact holding an MLC model folder (two shards, md5s) and a small GGUF."""
    from minicpm_edge.artifact import write_manifest
    from minicpm_edge.export.mlc import TensorCache

    mlc = folder / "model-MLC"
    mlc.mkdir(parents=True)
    cache = TensorCache(mlc, cap=4096)
    for i, shape in enumerate([(40, 16), (8,), (30, 20)]):
        cache.add(f"t{i}", np.arange(np.prod(shape), dtype=np.float16).reshape(shape))
    cache.finish(1000)
    shutil.copy(_small_gguf(folder / "tmp.gguf"), folder / "model.gguf")
    (folder / "tmp.gguf").unlink()
    write_manifest(folder, "android")
    return folder


# -- one fuzz target per parser ----------------------------------------------------------------------------------
def _checkpoint_case(seeds, rng, work: Path):
    src = rng.choice(seeds["checkpoints"])
    d = work / "ckpt"
    shutil.copytree(src, d)
    if rng.random() < 0.8:
        f = d / "model.safetensors"
        f.write_bytes(mutate_safetensors(f.read_bytes(), rng))
    else:
        f = d / "config.json"
        f.write_bytes(mutate_text(f.read_text(), rng))

    from minicpm_edge.bench.roofline import bytes_per_token
    from minicpm_edge.inspect import summarize
    from minicpm_edge.model import Checkpoint, load_model

    def load():
        with Checkpoint(d) as ckpt:
            load_model(ckpt)
            ckpt.lm_head()
    # roofline reads safetensors headers itself: it must not trust what Checkpoint would refuse
    return d, [lambda: bytes_per_token(d), lambda: summarize(d), load]


def _gguf_case(seeds, rng, work: Path):
    f = work / "model.gguf"
    data = seeds["gguf"].read_bytes()
    f.write_bytes(mutate_bytes(data, rng, hot=seeds["gguf_header"]))
    from minicpm_edge.artifact import _check_gguf
    from minicpm_edge.bench.roofline import bytes_per_token

    return f, [lambda: _check_gguf(f), lambda: bytes_per_token(f)]


def _bench_case(seeds, rng, work: Path):
    name, text = rng.choice(seeds["bench"])
    f = work / name
    f.write_bytes(mutate_text(text, rng))
    if rng.random() < 0.3 and name != "meta.txt":
        meta = next(t for n, t in seeds["bench"] if n == "meta.txt")
        (work / "meta.txt").write_bytes(mutate_text(meta, rng) if rng.random() < 0.5 else meta.encode())
    device = rng.choice([None, "Pixel 8"])

    def run():
        from minicpm_edge.bench import report
        from minicpm_edge.bench.ingest import ingest_file
        from minicpm_edge.bench.store import Store

        rows = ingest_file(f, device=device)
        with Store(work / "bench.sqlite") as store:
            store.add(rows)
            report.table(report.entries(store.rows()))
    return f, [run]


def _manifest_case(seeds, rng, work: Path):
    d = work / "artifact"
    shutil.copytree(seeds["artifact"], d)
    target = rng.choice([d / "manifest.json", d / "model-MLC" / "tensor-cache.json"])
    target.write_bytes(mutate_text(target.read_text(), rng))
    if target.name == "tensor-cache.json":  # re-seal, so that the tensor cache itself is what gets checked
        from minicpm_edge.artifact import write_manifest

        (d / "model-MLC" / "ndarray-cache.json").write_bytes(target.read_bytes())
        write_manifest(d, "android")

    from minicpm_edge.artifact import verify

    return d, [lambda: verify(d)]


CASES = {"checkpoint": _checkpoint_case, "gguf": _gguf_case, "bench": _bench_case, "manifest": _manifest_case}


class Hang(BaseException):
    """An input that took longer than STEP_SECONDS (raised from SIGALRM)."""


STEP_SECONDS = 20
# outside pytest's tmp folders, which later sessions delete
FAILURES = Path(os.environ.get("FUZZ_FAILURES", Path(tempfile.gettempdir()) / "minicpm-edge-fuzz-failures"))
MEMORY_HEADROOM = 4 << 30  # a parser that trusts a length and allocates for it gets a MemoryError, not the machine


@contextlib.contextmanager
def guarded():
    """Address space limited to what the process uses now plus MEMORY_HEADROOM; SIGALRM raises Hang."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = psutil.Process().memory_info().vms + MEMORY_HEADROOM
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))

    def hang(signum, frame):
        raise Hang(f"no result after {STEP_SECONDS}s")
    previous = signal.signal(signal.SIGALRM, hang)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.mark.filterwarnings("error")  # a warning would be a second line on the command line's stderr
@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_parsers_fail_only_with_user_errors(seeds, tmp_path, target):
    with guarded():
        _fuzz(seeds, tmp_path, target)


def _fuzz(seeds, tmp_path: Path, target: str) -> None:
    deadline = time.monotonic() + BUDGET / len(TARGETS)
    tried, refused, failures = 0, 0, []
    while time.monotonic() < deadline or tried == 0:
        rng = random.Random(f"{SEED}-{target}-{tried}")
        work = tmp_path / "case"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        path, steps = CASES[target](seeds, rng, work)
        outcomes = []
        for step in steps:
            signal.alarm(STEP_SECONDS)
            try:
                step()
                outcomes.append("ok")
            except UserError as e:
                outcomes.append("refused" if str(e).strip() else "empty message")
            except (Exception, Hang):  # anything else is a crash (or a hang): keep the input
                outcomes.append(traceback.format_exc())
            finally:
                signal.alarm(0)
        crashes = [o for o in outcomes if o not in ("ok", "refused")]
        if crashes:
            keep = FAILURES / f"seed{SEED}-{target}-{tried}"
            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(work, keep)
            (keep / "traceback.txt").write_text("\n\n".join(crashes))
            failures.append(f"input {tried} ({keep}): {crashes[0].strip().splitlines()[-1]}")
        refused += "refused" in outcomes
        tried += 1
    print(f"fuzz {target}: {tried} inputs in {BUDGET / len(TARGETS):.1f}s (seed {SEED}), {refused} refused with a "
          f"UserError by at least one parser, {len(failures)} crashed")
    assert not failures, f"{len(failures)} of {tried} inputs crashed:\n" + "\n".join(failures[:10])
