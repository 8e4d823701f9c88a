"""Bad input, for every verb: a one-line `error: ...`, exit status 2, no traceback, and nothing half-written.

Each case builds its broken input in tmp_path from a few shared checkpoints, runs the command line and checks that
- the exit status is non-zero and stderr is exactly one line, starting with `error:` and naming the problem;
- no traceback was printed;
- nothing appeared at --out (or an existing --out is unchanged), and no staging folder `.NAME.*.partial`, quantiser
  work area `.NAME.work` or `.NAME.old` was left beside it.

The command line runs in this process (`minicpm_edge.cli.run`, the console entry point, with stdout and stderr
captured), which keeps the cases fast; RELIABILITY_SUBPROCESS=1 runs every case through `python -m minicpm_edge`
instead. The full-disk cases always run in a subprocess, since they lower the file size limit (RLIMIT_FSIZE) so
that writes fail part-way, as on a full disk.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import quantized, small_variant
from minicpm_edge.artifact import write_manifest

SUBPROCESS = os.environ.get("RELIABILITY_SUBPROCESS") == "1"
FAST = ["--nsamples", "4", "--seqlen", "32"]

# Read-only disk, simulated: creating a folder under RO_ROOT fails with EROFS, as on a read-only mount (the tests
# run as root, for whom permission bits do not stop writes). Executed in this process or ahead of the CLI.
READONLY = """
import errno as _errno, os as _os
_mkdir = _os.mkdir
def _ro_mkdir(path, *a, **k):
    if _os.path.abspath(path).startswith(RO_ROOT):
        raise OSError(_errno.EROFS, _os.strerror(_errno.EROFS), str(path))
    return _mkdir(path, *a, **k)
_os.mkdir = _ro_mkdir
"""


def run_cli(*args, readonly: Path | None = None, fsize: int | None = None) -> subprocess.CompletedProcess:
    args = [str(a) for a in args]
    if SUBPROCESS or fsize is not None:
        code = (f"RO_ROOT = {str(readonly)!r}\n" + READONLY if readonly else "") + \
            "import sys\nfrom minicpm_edge.cli import run\nsys.argv[0] = 'minicpm-edge'\nrun()\n"

        def limit():
            if fsize is not None:  # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, preexec_fn=limit,
                              timeout=300)
    from minicpm_edge import cli

    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_mkdir, code = sys.argv, os.mkdir, 0
    try:
        sys.argv = ["minicpm-edge", *args]
        if readonly:
            exec(READONLY, {"RO_ROOT": str(readonly)})
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.run()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # what the interpreter would print, and its exit status
                traceback.print_exc(file=sys.stderr)
                code = 1
    finally:
        sys.argv, os.mkdir = saved_argv, saved_mkdir
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


# -- shared inputs (built once per session) -----------------------------------------------------------------------
@pytest.fixture(scope="session")
def variant(tmp_path_factory):
    """A random small MiniCPM (hidden 128, 2 layers) with the bundled tokenizer."""
    return small_variant(tmp_path_factory.mktemp("rel") / "variant")


@pytest.fixture(scope="session")
def gptq3(variant, tmp_path_factory):
    return quantized(variant, tmp_path_factory.mktemp("rel") / "w3", method="rtn", bits=3, nsamples=4, seqlen=32)


@pytest.fixture(scope="session")
def gptq_asym(variant, tmp_path_factory):
    return quantized(variant, tmp_path_factory.mktemp("rel") / "asym", method="rtn", sym=False, nsamples=4, seqlen=32)


@pytest.fixture(scope="session")
def exports(bundled_gptq, tmp_path_factory):
    """The bundled GPTQ model exported for iOS (GGUF) and Android (MLC), to break copies of."""
    from minicpm_edge.export.ios import export_ios
    from minicpm_edge.export.mlc import export_mlc

    base = tmp_path_factory.mktemp("rel-exports")
    return {"ios": export_ios(bundled_gptq, base / "ios"), "android": export_mlc(bundled_gptq, base / "android")}


class Inputs:
    """What a case gets: fresh copies of the shared inputs in its own tmp_path."""

    def __init__(self, request, tmp: Path):
        self.request, self.tmp = request, tmp

    def copy(self, fixture: str, sub: str | None = None, name: str | None = None) -> Path:
        src = self.request.getfixturevalue(fixture)
        src = src[sub] if sub else src
        dst = self.tmp / (name or f"{fixture}-{sub}" if sub else name or fixture)
        shutil.copytree(src, dst)
        return dst

    def out(self, name: str = "out") -> Path:
        (self.tmp / "outputs").mkdir(exist_ok=True)
        return self.tmp / "outputs" / name

    def file(self, name: str, content: str | bytes) -> Path:
        p = self.tmp / name
        p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)
        return p


def edit_config(d: Path, **changes) -> Path:
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        cfg.pop(k) if v is ... else cfg.__setitem__(k, v)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def edit_tensors(d: Path, fn) -> Path:
    f = d / "model.safetensors"
    state = load_file(str(f))
    fn(state)
    save_file(state, str(f), metadata={"format": "pt"})
    return d


def edit_header(f: Path, fn) -> Path:
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    fn(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    return f


def set_tensor(name: str, value):
    return lambda s: s.__setitem__(name, value(s[name]) if callable(value) else value)


def poison(name: str, value=float("nan")):
    def fn(s):
        s[name] = s[name].clone()
        s[name].view(-1)[0] = value
    return fn


# -- the cases: (args, --out to check or None[, a path that must be left unchanged]) -------------------------------
CASES = []


def case(name: str, message: str, **kw):
    def register(fn):
        CASES.append(pytest.param(fn, message, kw, id=name))
        return fn
    return register


# corrupt or truncated safetensors
@case("safetensors-header-length-past-end", "corrupt or unreadable safetensors file")
def _(t):
    d = t.copy("variant")
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 10)
    f.write_bytes(bytes(data))
    return ["inspect", d], None


@case("safetensors-header-not-json", "invalid JSON in header")
def _(t):
    d = t.copy("variant")
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:12] = b'{"x\x01'
    f.write_bytes(bytes(data))
    return ["quantize", d, *FAST, "--out", t.out()], t.out()


@case("safetensors-offsets-past-end", "corrupt or unreadable safetensors file")
def _(t):
    d = t.copy("bundled_gptq")

    def grow(h):
        rec = h["model.norm.weight"]
        rec["data_offsets"][1] += 1 << 20
    edit_header(d / "model.safetensors", grow)
    return ["export", d, "--target", "ios", "--out", t.out()], t.out()


@case("eval-quant-missing", "no such file or directory")
def _(t):
    return ["eval", "--ref", t.request.getfixturevalue("variant"), "--quant", t.tmp / "nothing-here"], None


@case("eval-json-unwritable", "cannot write")
def _(t):
    v = t.request.getfixturevalue("variant")
    return ["eval", "--ref", v, "--quant", v, "--chunks", "1", "--ctx", "64", "--json", t.file("a-file", "x") / "r.json"], None


@case("safetensors-truncated", "corrupt or unreadable safetensors file")
def _(t):
    d = t.copy("variant")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size * 2 // 3])
    return ["eval", "--ref", t.request.getfixturevalue("variant"), "--quant", d, "--chunks", "1", "--ctx", "64"], None


@case("safetensors-empty-file", "header too small")
def _(t):
    d = t.copy("variant")
    (d / "model.safetensors").write_bytes(b"")
    return ["bench", "run", d, "--db", t.tmp / "db.sqlite", "--runs", "1"], None


@case("shard-index-names-missing-shard", "shard model-00002-of-00002.safetensors is missing")
def _(t):
    d = t.copy("variant")
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                        "model.norm.weight": "model-00002-of-00002.safetensors"}}))
    (d / "model-00001-of-00002.safetensors").write_bytes(b"")
    return ["inspect", d], None


@case("shard-index-malformed", "malformed index")
def _(t):
    d = t.copy("variant")
    (d / "model.safetensors.index.json").write_text('{"weight_map": ["model.safetensors"]}')
    return ["quantize", d, *FAST, "--out", t.out()], t.out()


# config.json: missing, malformed, contradictory, unsupported
@case("config-missing", "no config.json")
def _(t):
    d = t.copy("bundled_gptq")
    (d / "config.json").unlink()
    return ["export", d, "--target", "onnx", "--out", t.out()], t.out()


@case("config-not-json", "not valid JSON")
def _(t):
    d = t.copy("variant")
    (d / "config.json").write_text('{"hidden_size": 128,')
    return ["quantize", d, *FAST, "--out", t.out()], t.out()


@case("config-missing-key", "missing required key(s) hidden_size")
def _(t):
    return ["inspect", edit_config(t.copy("variant"), hidden_size=...)], None


@case("config-heads-contradict-hidden-size", "hidden_size 128 is not a multiple of num_attention_heads 3")
def _(t):
    return ["quantize", edit_config(t.copy("variant"), num_attention_heads=3, num_key_value_heads=3), *FAST,
            "--out", t.out()], t.out()


@case("config-vocab-contradicts-embedding", "model.embed_tokens.weight has shape [4096, 256] but config.json "
      "implies [5000, 256]")
def _(t):
    return ["export", edit_config(t.copy("bundled_gptq"), vocab_size=5000), "--target", "android",
            "--out", t.out()], t.out()


@case("config-value-wrong-type", "rms_norm_eps must be a number")
def _(t):
    return ["quantize", edit_config(t.copy("variant"), rms_norm_eps="1e-5?"), *FAST, "--out", t.out()], t.out()


@case("config-more-layers-than-weights", "config.json has 3 layers but the checkpoint lacks model.layers.2")
def _(t):
    return ["eval", "--ref", edit_config(t.copy("variant"), num_hidden_layers=3), "--quant",
            t.request.getfixturevalue("variant"), "--chunks", "1", "--ctx", "64"], None


@case("layer-1-shape-contradicts-config", "model.layers.1.input_layernorm.weight has shape [64]")
def _(t):
    d = edit_tensors(t.copy("variant"), set_tensor("model.layers.1.input_layernorm.weight", torch.ones(64)))
    return ["quantize", d, *FAST, "--out", t.out()], t.out()


@case("quantize-device-unknown", "--device 'mps': choose cpu or cuda")
def _(t):
    return ["quantize", t.request.getfixturevalue("variant"), *FAST, "--device", "mps", "--out", t.out()], t.out()


@case("unsupported-architecture", "unsupported architecture MiniCPMSALAForCausalLM")
def _(t):
    d = edit_config(t.copy("variant"), architectures=["MiniCPMSALAForCausalLM"], model_type="minicpm_sala")
    return ["quantize", d, *FAST, "--out", t.out()], t.out()


@case("unsupported-mixture-of-experts", "mixture-of-experts models (MiniCPM-MoE-8x2B) are not supported")
def _(t):
    return ["export", edit_config(t.copy("bundled_gptq"), num_experts=8), "--target", "ios", "--out", t.out()], t.out()


@case("gptq-config-bits-not-a-number", "quantization config bits must be a whole number")
def _(t):
    d = t.copy("bundled_gptq")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["bits"] = "four"
    (d / "config.json").write_text(json.dumps(cfg))
    return ["export", d, "--target", "onnx", "--out", t.out()], t.out()


@case("gptq-qzeros-shape-inconsistent", "inconsistent GPTQ tensor shapes")
def _(t):
    name = "model.layers.2.mlp.up_proj.qzeros"
    d = edit_tensors(t.copy("bundled_gptq"), set_tensor(name, lambda z: z[:, :3].contiguous()))
    return ["export", d, "--target", "android", "--out", t.out()], t.out()


@case("gptq-qweight-stored-as-float", "qweight is float32; GPTQ stores it as int32")
def _(t):
    name = "model.layers.0.self_attn.q_proj.qweight"
    d = edit_tensors(t.copy("bundled_gptq"), set_tensor(name, lambda w: w.float()))
    return ["export", d, "--target", "ios", "--out", t.out()], t.out()


# NaN / Inf
@case("nan-weight-in-layer-1-quantize", "tensor model.layers.1.mlp.up_proj.weight contains NaN or Inf")
def _(t):
    d = edit_tensors(t.copy("variant"), poison("model.layers.1.mlp.up_proj.weight"))
    return ["quantize", d, *FAST, "--out", t.out()], t.out()  # fails after layer 0 is done: its work area goes too


@case("inf-in-calibration-activations", "calibration activations contain NaN or Inf")
def _(t):
    d = edit_tensors(t.copy("variant"), set_tensor("model.embed_tokens.weight", lambda e: e * 1e38))
    return ["quantize", d, *FAST, "--out", t.out()], t.out()


@case("nan-in-last-layer-mid-export-keeps-old-out", "model.layers.3.post_attention_layernorm.weight contains NaN")
def _(t):
    d = edit_tensors(t.copy("bundled_gptq"), poison("model.layers.3.post_attention_layernorm.weight"))
    out = t.out()
    out.mkdir(parents=True)
    (out / "previous.txt").write_text("an earlier export")
    return ["export", d, "--target", "onnx", "--out", out, "--force"], out, out  # replaced only on success


@case("nan-scales-mid-export", "model.layers.2.mlp.up_proj.scales contains NaN or Inf")
def _(t):
    d = edit_tensors(t.copy("bundled_gptq"), poison("model.layers.2.mlp.up_proj.scales"))
    return ["export", d, "--target", "harmony", "--out", t.out()], t.out()


# grids the quantiser or a target cannot hold
@case("group-size-does-not-divide-input", "group size 32 does not divide the input dimension 144")
def _(t):
    d = small_variant(t.tmp / "h144", hidden_size=144, num_attention_heads=4, num_key_value_heads=4)
    return ["quantize", d, *FAST, "--out", t.out()], t.out()


@case("bits-unsupported-by-quantizer", "--bits 5 is not supported")
def _(t):
    return ["quantize", t.copy("variant"), "--bits", "5", *FAST, "--out", t.out()], t.out()


@case("bits-gguf-cannot-store", "GPTQ 3-bit has no exact GGUF form")
def _(t):
    return ["export", t.copy("gptq3"), "--target", "ios", "--out", t.out()], t.out()


@case("bits-matmulnbits-cannot-store", "3-bit weights have no MatMulNBits kernel")
def _(t):
    return ["export", t.copy("gptq3"), "--target", "onnx", "--out", t.out()], t.out()


@case("bits-mlc-cannot-store", "GPTQ 3-bit has no exact q4f16 form")
def _(t):
    return ["export", t.copy("gptq3"), "--target", "harmony", "--out", t.out()], t.out()


@case("asymmetric-codes-for-mlc", "asymmetric GPTQ has no exact q4f16 form")
def _(t):
    return ["export", t.copy("gptq_asym"), "--target", "android", "--out", t.out()], t.out()


# tokenizer
@case("tokenizer-missing-quantize", "no tokenizer.model")
def _(t):
    d = t.copy("variant")
    (d / "tokenizer.model").unlink()
    return ["quantize", d, *FAST, "--out", t.out()], t.out()


@case("tokenizer-missing-export", "no tokenizer.model or tokenizer.json; GGUF files carry their tokenizer")
def _(t):
    d = t.copy("bundled_gptq")
    (d / "tokenizer.model").unlink()
    return ["export", d, "--target", "ios", "--out", t.out()], t.out()


@case("tokenizer-corrupt", "not a SentencePiece model")
def _(t):
    d = t.copy("variant")
    (d / "tokenizer.model").write_bytes(b"not a protobuf " * 50)
    return ["quantize", d, *FAST, "--out", t.out()], t.out()


@case("tokenizer-larger-than-vocab", "tokenizer has 4096 pieces but the model's vocab_size is 2000")
def _(t):
    return ["quantize", small_variant(t.tmp / "v2000", vocab_size=2000), *FAST, "--out", t.out()], t.out()


@case("tokenizer-smaller-than-vocab-gguf", "4096 pieces but vocab_size is 4160")
def _(t):
    return ["export", small_variant(t.tmp / "v4160", vocab_size=4160), "--target", "ios", "--out", t.out()], t.out()


@case("tokenizer-does-not-match-model-eval", "tokenizer has 4096 pieces but the model's vocab_size is 2000")
def _(t):
    d = small_variant(t.tmp / "v2000", vocab_size=2000)  # the bundled tokenizer's ids reach 4095
    return ["eval", "--ref", d, "--quant", d, "--chunks", "1", "--ctx", "64"], None


# calibration text
@case("calibration-text-too-short", "calibration text too short")
def _(t):
    calib = t.file("short.txt", "A few words of calibration text.\n")
    return ["quantize", t.copy("variant"), "--calib", calib, *FAST, "--out", t.out()], t.out()


@case("calibration-text-not-utf8", "not UTF-8 text")
def _(t):
    calib = t.file("latin1.txt", "caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 100)
    return ["quantize", t.copy("variant"), "--calib", calib, *FAST, "--out", t.out()], t.out()


# output directory and disk
@case("out-exists-quantize", "exists; add --force to replace it")
def _(t):
    out = t.out()
    out.mkdir(parents=True)
    (out / "mine.txt").write_text("keep me")
    return ["quantize", t.copy("variant"), *FAST, "--out", out], out, out


@case("out-exists-export", "exists; add --force to replace it")
def _(t):
    out = t.out()
    out.mkdir(parents=True)
    (out / "mine.txt").write_text("keep me")
    return ["export", t.copy("bundled_gptq"), "--target", "ios", "--out", out], out, out


@case("read-only-disk-export", "cannot write here (Read-only file system)", readonly=True)
def _(t):
    return ["export", t.copy("bundled_gptq"), "--target", "android", "--out", t.out()], t.out()


@case("read-only-disk-quantize", "writing failed (Read-only file system)", readonly=True)
def _(t):
    return ["quantize", t.copy("variant"), *FAST, "--out", t.out()], t.out()


@case("full-disk-mid-export", "; nothing was written", fsize=1 << 20)
def _(t):
    return ["export", t.copy("bundled_gptq"), "--target", "ios", "--out", t.out()], t.out()


@case("full-disk-mid-quantize", "writing failed (", fsize=1 << 20)
def _(t):  # the layers fit; the assembled 2 MiB checkpoint does not
    return ["quantize", t.copy("variant"), *FAST, "--out", t.out()], t.out()


# bench result files
@case("bench-ingest-invalid-json", "invalid JSON")
def _(t):
    return ["bench", "ingest", t.file("r.json", '[{"avg_ts": 12.5,'), "--device", "phone", "--db", t.tmp / "db"], None


@case("bench-ingest-llama-bench-missing-field", "result 2 has no avg_ts")
def _(t):
    f = t.file("r.json", json.dumps([{"avg_ts": 9.0, "n_prompt": 0, "n_gen": 128}, {"n_prompt": 512, "n_gen": 0}]))
    return ["bench", "ingest", f, "--device", "phone", "--db", t.tmp / "db"], None


@case("bench-ingest-negative-speed", "tokens/s must be a positive number")
def _(t):
    f = t.file("r.jsonl", json.dumps({"avg_ts": -4.0, "n_prompt": 0, "n_gen": 128, "model_filename": "m.gguf"}) + "\n")
    return ["bench", "ingest", f, "--device", "phone", "--db", t.tmp / "db"], None


@case("bench-ingest-binary-file", "not a text file")
def _(t):
    return ["bench", "ingest", t.file("r.csv", bytes(range(256)) * 4), "--device", "phone", "--db", t.tmp / "db"], None


@case("bench-ingest-markdown-without-header", "no table header with 'test' and 't/s' columns")
def _(t):
    f = t.file("r.md", "| model | test | avg t/s |\n| --- | --- | --- |\n| m | tg128 | 12.0 |\n")
    return ["bench", "ingest", f, "--device", "phone", "--db", t.tmp / "db"], None


@case("bench-ingest-our-json-raw-not-object", "raw must be a JSON object")
def _(t):
    row = {"source": "measured", "device": "d", "runtime": "torch", "artifact": "a", "test": "tg128",
           "tokens_per_s": 10.0, "raw": "not an object"}
    f = t.file("r.json", json.dumps({"format": "minicpm-edge-bench", "version": 1, "rows": [row]}))
    return ["bench", "ingest", f, "--db", t.tmp / "db"], None


@case("bench-report-bandwidths-malformed", "not a JSON object of device bandwidths")
def _(t):
    return ["bench", "report", "--db", t.tmp / "db", "--bandwidths", t.file("bw.json", "[67.2]")], None


@case("bench-report-plot-unwritable", "cannot write")
def _(t):
    return ["bench", "report", "--db", t.tmp / "db", "--plot", t.file("a-file", "x") / "plot.png"], None


@case("bench-run-corrupt-gguf", "llama.cpp cannot load this file")
def _(t):
    return ["bench", "run", t.file("model.gguf", b"GGUF" + bytes(2000)), "--db", t.tmp / "db", "--runs", "1"], None


# artifacts that no longer match what was written
@case("verify-modified-file", "README.md does not match its manifest checksum")
def _(t):
    d = t.copy("exports", "ios")
    (d / "README.md").write_text("edited")
    return ["inspect", "--verify", d], None


@case("verify-missing-file", "MiniCPM.json is listed in the manifest but missing")
def _(t):
    d = t.copy("exports", "ios")
    (d / "MiniCPM.json").unlink()
    return ["inspect", "--verify", d], None


@case("verify-gguf-truncated-tail", "not a readable GGUF file")
def _(t):
    d = t.copy("exports", "ios")
    f = next(d.glob("*.gguf"))
    f.write_bytes(f.read_bytes()[:-4096])
    write_manifest(d, "ios")  # a manifest that agrees: the GGUF's own structure must catch it
    return ["inspect", "--verify", d], None


@case("verify-mlc-shard-bytes-changed", "size or md5 differs from tensor-cache.json")
def _(t):
    d = t.copy("exports", "android")
    shard = next(d.rglob("params_shard_0.bin"))
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x5A
    shard.write_bytes(bytes(data))
    write_manifest(d, "android")  # re-sealed: mlc's own md5 must catch it
    return ["inspect", "--verify", d], None


@case("verify-manifest-malformed", "malformed manifest")
def _(t):
    d = t.copy("exports", "ios")
    (d / "manifest.json").write_text('{"files": ["README.md"]}')
    return ["inspect", "--verify", d], None


@pytest.mark.parametrize("build, message, kw", CASES)
def test_bad_input_is_one_line_and_leaves_nothing(request, tmp_path, build, message, kw):
    t = Inputs(request, tmp_path)
    args, out, *keep = build(t)
    before = {p.relative_to(keep[0]): p.read_bytes() for p in keep[0].rglob("*") if p.is_file()} if keep else None
    readonly = None
    if kw.get("readonly"):
        readonly = t.out().parent
        readonly.mkdir(parents=True, exist_ok=True)
    r = run_cli(*args, readonly=readonly, fsize=kw.get("fsize"))
    lines = r.stderr.strip().splitlines()
    print(r.stderr)
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert message in lines[0], lines[0]
    if out is not None:
        if keep:
            assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
        else:
            assert not out.exists(), sorted(out.rglob("*"))
        leftovers = sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))
        assert not leftovers, leftovers  # .out.*.partial (staging), .out.work (quantiser), .out.old (replace)


def test_enough_cases():
    assert len(CASES) >= 25
