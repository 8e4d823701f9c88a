import json

import pytest

from minicpm_edge import calib
from minicpm_edge.errors import UserError
from minicpm_edge.model import Tokenizer


@pytest.fixture(scope="module")
def tok(bundled):
    return Tokenizer(bundled / "tokenizer.model")


def test_bundled_set_is_bilingual_and_covers_genres():
    files = {p.name for p in calib.CALIB_DIR.iterdir() if p.is_file() and p.suffix in (".txt", ".jsonl")}
    assert {"core_chat.jsonl", "core_prose_en.txt", "core_prose_zh.txt", "core_code.txt", "math_drills.txt",
            "core_translation.jsonl"} <= files
    docs = calib.load_documents(None)
    text = "".join(docs)
    han = sum("\u4e00" <= ch <= "\u9fff" for ch in text)
    latin = sum(ch.isascii() and ch.isalpha() for ch in text)
    assert han > 15000 and latin > 40000  # measured: 17,261 and 46,383
    assert sum(d.startswith("<用户>") for d in docs) > 60  # conversations in the chat format


def test_enough_for_128_samples_of_512(tok):
    batches = calib.calibration_batches(tok, calib.load_documents(None), 128, 512)
    assert batches.shape == (128, 512)
    assert len({tuple(r[:16].tolist()) for r in batches}) == 128  # distinct windows, not repeats


def test_batches_are_seeded():
    class T:  # a character tokenizer keeps this test independent of the bundled model
        def encode(self, s, bos=True):
            return [1, *map(ord, s)] if bos else list(map(ord, s))
    docs = [f"document {i} " * 20 for i in range(50)]
    a = calib.calibration_batches(T(), docs, 8, 64, seed=1)
    assert (a == calib.calibration_batches(T(), docs, 8, 64, seed=1)).all()
    assert not (a == calib.calibration_batches(T(), docs, 8, 64, seed=2)).all()


def test_heldout_does_not_overlap_calibration():
    calib_lines = {l.strip() for d in calib.load_documents(None) for l in d.splitlines() if len(l.strip()) > 20}
    held = calib.heldout_documents()
    assert sum(map(len, held)) > 8000
    held_lines = {l.strip() for d in held for l in d.splitlines() if len(l.strip()) > 20}
    assert not calib_lines & held_lines
    # no shared 40-character span either
    calib_text = "\n".join(calib.load_documents(None))
    spans = {t[i:i + 40] for t in held_lines for i in range(0, max(1, len(t) - 40), 20)}
    assert not [s for s in spans if s in calib_text]


def test_txt_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nline two\n\nsecond doc\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "plain"}) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hi"}]}) + "\n", encoding="utf-8")
    assert calib.load_documents(tmp_path / "a.txt") == ["first doc\nline two", "second doc"]
    assert calib.load_documents(tmp_path / "b.jsonl") == ["plain", "<用户>你好<AI>Hi"]
    assert len(calib.load_documents(tmp_path)) == 4
    (tmp_path / "c.txt").write_text("def f():\n\n    return 1\n<|doc|>\nx = 2\n", encoding="utf-8")
    assert calib.load_documents(tmp_path / "c.txt") == ["def f():\n\n    return 1", "x = 2"]


@pytest.mark.parametrize("content, message", [
    ('{"messages": 5}\n', "bad calibration record"),
    ("{oops\n", "bad calibration record"),
    ('{"other": 1}\n', "'text' or 'messages'"),
])
def test_bad_jsonl(tmp_path, content, message):
    f = tmp_path / "x.jsonl"
    f.write_text(content)
    with pytest.raises(UserError, match=message):
        calib.load_documents(f)


def test_too_short(tok, tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("only a few words here")
    with pytest.raises(UserError, match="calibration text too short"):
        calib.calibration_batches(tok, calib.load_documents(f), 4, 512)


def test_missing_file_and_named_dataset_offline(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        calib.load_documents(tmp_path / "nope.txt")
    with pytest.raises(UserError, match="wikitext2"):
        calib.load_documents("wikitext2")  # no `datasets` package / no network here: a clear error


def test_math_drills_reproduce():
    """math_drills.txt is what calib_data/make_math.py writes."""
    import runpy
    import shutil
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        script = Path(d) / "make_math.py"
        shutil.copy(calib.CALIB_DIR / "make_math.py", script)
        runpy.run_path(str(script), run_name="__main__")
        assert (Path(d) / "math_drills.txt").read_bytes() == (calib.CALIB_DIR / "math_drills.txt").read_bytes()
