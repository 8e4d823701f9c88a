import json
import subprocess
import sys

import pytest

from minicpm_edge import __version__


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "minicpm_edge", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_help_lists_verbs():
    r = cli("--help")
    assert r.returncode == 0
    for verb in ("quantize", "eval", "export", "bench", "inspect"):
        assert verb in r.stdout


def test_version():
    r = cli("--version")
    assert r.returncode == 0 and __version__ in r.stdout


def test_fixed_surface_is_declared():
    """The option names later issues fill in exist now."""
    q = cli("quantize", "--help").stdout
    for opt in ("--bits", "--group-size", "--sym", "--asym", "--method", "--calib", "--nsamples", "--seqlen", "--damp",
                "--device", "--out", "--resume", "--force"):
        assert opt in q, opt
    e = cli("eval", "--help").stdout
    for opt in ("--ref", "--quant", "--data", "--ctx", "--method", "--runtime", "--max-drift", "--json", "--plot"):
        assert opt in e, opt
    x = cli("export", "--help").stdout
    assert "--target" in x and "--out" in x
    b = cli("bench", "--help").stdout
    for sub in ("run", "plan", "ingest", "report"):
        assert sub in b
    assert "--verify" in cli("inspect", "--help").stdout


@pytest.mark.parametrize("target, expect", [("ios", "Q4_0.gguf"), ("android", "tensor-cache.json"),
                                            ("harmony", "tensor-cache.json"), ("onnx", "model.onnx")])
def test_export_every_target_then_verify(bundled_gptq, tmp_path, target, expect):
    out = tmp_path / target
    r = cli("export", bundled_gptq, "--target", target, "--out", out)
    assert r.returncode == 0, r.stderr
    assert any(p.name.endswith(expect) for p in out.rglob("*")) and (out / "manifest.json").is_file()
    v = cli("inspect", "--verify", out)
    assert v.returncode == 0 and "match manifest.json" in v.stdout, v.stderr
    again = cli("export", bundled_gptq, "--target", target, "--out", out)
    assert again.returncode == 2 and "--force" in again.stderr
    check_inspect_artifact(out, target, bundled_gptq)


def check_inspect_artifact(out, target, source):
    """`inspect` on an exported folder: its files as on disk, and per model file what a runtime reads, tied to the
    source checkpoint's own counts."""
    r = cli("inspect", out)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{target} artifact at {out}") and "export.json" in r.stdout
    s = json.loads(cli("inspect", out, "--json").stdout)
    files = {p.relative_to(out).as_posix(): p.stat().st_size for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert s["kind"] == target and s["files"] == files and s["bytes"] == sum(files.values())
    assert s["export"] == json.loads((out / "export.json").read_text())
    ckpt = json.loads(cli("inspect", source, "--json").stdout)
    layers = ckpt["config"]["num_hidden_layers"]
    (m,) = s["models"]
    if target == "ios":  # every weight of the checkpoint in the GGUF (tied: one table), each Linear as Q4_0
        assert m["format"] == "gguf" and m["parameters"] == ckpt["parameters"] and m["types"]["Q4_0"] == 7 * layers
        assert m["layers"] == layers and m["vocab"] == ckpt["config"]["vocab_size"] and m["chat_template"]
        assert 4.5 <= m["bits_per_weight"] < 8 * files[m["file"]] / m["parameters"]  # tensor data, not the header
    elif target == "onnx":  # fused q|k|v and gate|up: four MatMulNBits and one GroupQueryAttention a layer
        assert m["format"] == "onnx" and m["ops"]["MatMulNBits"] == 4 * layers
        assert m["ops"]["GroupQueryAttention"] == layers and m["opsets"]["com.microsoft"] == 1
    else:
        shards = sum(v for k, v in files.items() if k.rsplit("/", 1)[-1].startswith("params_shard_"))
        assert m["format"] == "mlc" and m["bytes"] == shards and m["quantization"] == s["export"]["layout"]
        assert m["dtypes"]["uint32"] > 0 and m["context"] == s["export"]["context_window_size"]


def test_verify_catches_a_flipped_byte(bundled_gptq, tmp_path):
    out = tmp_path / "ios"
    assert cli("export", bundled_gptq, "--target", "ios", "--out", out).returncode == 0
    f = next(out.glob("*.gguf"))
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    r = cli("inspect", "--verify", out)
    assert r.returncode == 2 and "does not match its manifest checksum" in r.stderr and "Traceback" not in r.stderr


def test_inspect_bundled_model(bundled):
    r = cli("inspect")
    assert r.returncode == 0, r.stderr
    assert "MiniCPMForCausalLM" in r.stdout and "GQA" in r.stdout and "tied embeddings: True" in r.stdout
    s = json.loads(cli("inspect", bundled, "--json").stdout)
    assert s["config"]["num_key_value_heads"] < s["config"]["num_attention_heads"]
    assert s["muP"]["embedding_scale"] == 12


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "no config.json"),
    (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
    (lambda d: (d / "config.json").write_text('{"architectures": ["MiniCPMMoEForCausalLM"]}'), "unsupported architecture"),
])
def test_inspect_bad_input_is_one_line(tmp_path, setup, message):
    d = tmp_path / "bad"
    d.mkdir()
    setup(d)
    r = cli("inspect", d)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_inspect_a_gguf_file(bundled_gptq, tmp_path):
    out = tmp_path / "ios"
    assert cli("export", bundled_gptq, "--target", "ios", "--out", out).returncode == 0
    f = next(out.glob("*.gguf"))
    s = json.loads(cli("inspect", f, "--json").stdout)
    assert s["kind"] == "gguf" and s["bytes"] == f.stat().st_size and s["models"][0]["architecture"] == "minicpm"
    assert cli("inspect", f).stdout.startswith("gguf artifact at")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(f.read_bytes()[:100])
    r = cli("inspect", bad)
    assert r.returncode == 2 and "not a readable GGUF file" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_inspect_malformed_manifest_is_one_line(tmp_path):
    d = tmp_path / "art"
    d.mkdir()
    (d / "manifest.json").write_text('{"kind": "ios", "files": 3}')
    r = cli("inspect", d)
    assert r.returncode == 2 and "malformed manifest" in r.stderr and "Traceback" not in r.stderr


def test_closed_stdout_is_no_traceback():
    """`minicpm-edge inspect | head -1`: the reader goes away before the output is written."""
    import os

    read, write = os.pipe()
    os.close(read)
    try:
        r = subprocess.run([sys.executable, "-m", "minicpm_edge", "inspect"], stdout=write, stderr=subprocess.PIPE,
                           text=True)
    finally:
        os.close(write)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr


def test_inspect_missing_dir(tmp_path):
    r = cli("inspect", tmp_path / "nope")
    assert r.returncode == 2 and "not a directory" in r.stderr


@pytest.mark.parametrize("args, message", [
    (("quantize", "--bitz", "3"), "No such option: --bitz"),
    (("quantize", "--bits", "x"), "Invalid value for '--bits'"),
    (("export",), "Missing argument"),
    (("export", "ckpt", "--target", "watch"), "Invalid value for '--target'"),
])
def test_usage_errors_are_one_line(args, message):
    r = cli(*args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert "--help" in lines[0]


def test_help_keeps_option_names_whole_at_any_width():
    import os

    for columns in ("40", "300"):
        r = subprocess.run([sys.executable, "-m", "minicpm_edge", "quantize", "--help"], capture_output=True, text=True,
                           env={**os.environ, "COLUMNS": columns})
        assert r.returncode == 0
        for opt in ("--group-size", "--nsamples", "--static-groups", "--compute"):
            assert opt in r.stdout, (columns, opt)


@pytest.mark.parametrize("args, message", [
    (("--format", "q4_k_m", "--bits", "3"), "--format q4_k_m sets the grid itself"),
    (("--format", "q4_0", "--asym"), "--format q4_0 sets the grid itself"),
    (("--format", "q2_k"), "--format q2_k: choose q4_0, q4_1, q4_k_m, q3_k_m"),
])
def test_quantize_format_refusals_are_one_line(tmp_path, args, message):
    r = cli("quantize", *args, "--out", tmp_path / "q")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "q").exists()
