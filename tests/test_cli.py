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


@pytest.mark.parametrize("args", [["eval"], ["export", ".", "--target", "ios"], ["bench", "report"]])
def test_unbuilt_verbs_say_so(args):
    r = cli(*args)
    assert r.returncode != 0 and "not built yet" in r.stderr and "Traceback" not in r.stderr


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
    (lambda d: (d / "config.json").write_text('{"architectures": ["MiniCPM3ForCausalLM"]}'), "unsupported architecture"),
])
def test_inspect_bad_input_is_one_line(tmp_path, setup, message):
    d = tmp_path / "bad"
    d.mkdir()
    setup(d)
    r = cli("inspect", d)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_inspect_missing_dir(tmp_path):
    r = cli("inspect", tmp_path / "nope")
    assert r.returncode == 2 and "not a directory" in r.stderr
