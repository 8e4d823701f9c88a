"""Hub ids (`owner/name`) as model arguments: resolved through huggingface_hub's cache, offline here (no network in
tests): a pre-filled cache under a temporary HF_HOME serves every verb; a missing one is one line that says what to do."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import small_variant
from minicpm_edge.model.hub import is_hub_id, model_name

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory):
    """HF_HOME with openbmb/tiny-test in the layout huggingface_hub writes: blobs, snapshots/<commit>, refs/main."""
    home = tmp_path_factory.mktemp("hf_home")
    src = small_variant(tmp_path_factory.mktemp("src") / "m")
    repo = home / "hub" / "models--openbmb--tiny-test"
    snap = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in src.iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return home


def cli(args, home, cwd, offline=True):
    env = {**os.environ, "HF_HOME": str(home), "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    env.pop("HF_HUB_CACHE", None)
    env["HF_HUB_OFFLINE"] = "1" if offline else "0"
    return subprocess.run([sys.executable, "-m", "minicpm_edge", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_hub_id_detection(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("openbmb/MiniCPM4-0.5B") and not is_hub_id("/abs/path") and not is_hub_id("a/b/c")
    (tmp_path / "out").mkdir()
    assert not is_hub_id("out/model")  # inside a local folder: a (missing) local path, never the hub
    snap = Path("x/models--openbmb--MiniCPM4-0.5B/snapshots") / COMMIT
    assert model_name(snap) == "MiniCPM4-0.5B" and model_name(Path("a/b/ckpt")) == "ckpt"


def test_cached_hub_id_works_offline_in_every_verb(hub_home, tmp_path):
    r = cli(["inspect", "openbmb/tiny-test", "--json"], hub_home, tmp_path)
    assert r.returncode == 0, r.stderr
    assert COMMIT in r.stdout
    r = cli(["quantize", "openbmb/tiny-test", "--nsamples", "4", "--seqlen", "64"], hub_home, tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out" / "tiny-test-gptq-w4g32"
    assert (out / "quant_report.json").is_file()
    r = cli(["eval", "--ref", "openbmb/tiny-test", "--quant", out, "--chunks", "1", "--ctx", "64", "--json",
             tmp_path / "e.json"], hub_home, tmp_path)
    assert r.returncode == 0, r.stderr
    assert COMMIT in json.loads((tmp_path / "e.json").read_text())["ref"]["path"]
    r = cli(["export", "openbmb/tiny-test", "--target", "ios", "--out", tmp_path / "ios"], hub_home, tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ios" / "tiny-test-F16.gguf").is_file()  # named after the model, not the snapshot hash


def test_uncached_hub_id_offline_is_one_line(hub_home, tmp_path):
    r = cli(["quantize", "openbmb/not-downloaded"], hub_home, tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "offline" in lines[0] and "hub cache has no copy" in lines[0]
    assert "huggingface-cli download openbmb/not-downloaded --local-dir DIR" in lines[0]
    assert "Traceback" not in r.stderr


def test_missing_local_path_inside_a_local_folder_is_not_fetched(hub_home, tmp_path):
    (tmp_path / "out").mkdir()
    r = cli(["inspect", "out/missing"], hub_home, tmp_path, offline=False)  # online mode: still no hub request
    assert r.returncode == 2 and "out/missing: not a directory" in r.stderr and "hub" not in r.stderr
