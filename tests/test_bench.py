"""bench: ingest of phone result files, the SQLite store, roofline arithmetic, measurement, report and device kits."""

import json
import os
from dataclasses import asdict
from pathlib import Path
import sqlite3
import stat
import subprocess
import sys

import gguf
import numpy as np
import pytest
from rich.console import Console
from safetensors import safe_open

from conftest import small_variant
from minicpm_edge.bench import plan, report, roofline, run
from minicpm_edge.bench.ingest import PROMPT_TIME, ingest_file
from minicpm_edge.bench.store import SCHEMA, SCHEMA_VERSION, Result, Store, default_path
from minicpm_edge.errors import UserError

QT = gguf.GGMLQuantizationType

# Two llama-bench results as its printers emit them (fields in printer order, abridged to those we read + a few)
LB = [
    {"build_commit": "8cf427ff", "build_number": 5163, "cpu_info": "ARMv8 Processor rev 0 (v8l)", "gpu_info": "",
     "backends": "CPU", "model_filename": "/data/local/tmp/minicpm-edge/minicpm-2b-Q4_0.gguf",
     "model_type": "minicpm 2B Q4_0", "model_size": 1566000000, "model_n_params": 2724880896, "n_batch": 2048,
     "n_ubatch": 512, "n_threads": 4, "cpu_mask": "0x0", "cpu_strict": False, "poll": 50, "type_k": "f16",
     "n_gpu_layers": 99, "no_kv_offload": False, "n_prompt": 512, "n_gen": 0, "n_depth": 0,
     "test_time": "2024-05-01T10:00:01Z", "avg_ns": 12345678901, "stddev_ns": 12345678, "avg_ts": 41.472,
     "stddev_ts": 0.318, "samples_ns": [12345678901, 12345678901], "samples_ts": [41.2, 41.7]},
    {"build_commit": "8cf427ff", "build_number": 5163, "cpu_info": "ARMv8 Processor rev 0 (v8l)", "gpu_info": "",
     "backends": "CPU", "model_filename": "/data/local/tmp/minicpm-edge/minicpm-2b-Q4_0.gguf",
     "model_type": "minicpm 2B Q4_0", "model_size": 1566000000, "model_n_params": 2724880896, "n_batch": 2048,
     "n_ubatch": 512, "n_threads": 4, "cpu_mask": "0x0", "cpu_strict": False, "poll": 50, "type_k": "f16",
     "n_gpu_layers": 99, "no_kv_offload": False, "n_prompt": 0, "n_gen": 128, "n_depth": 0,
     "test_time": "2024-05-01T10:00:40Z", "avg_ns": 19692307692, "stddev_ns": 92307692, "avg_ts": 6.5,
     "stddev_ts": 0.031, "samples_ns": [19692307692, 19692307692], "samples_ts": [6.48, 6.52]},
]
META = "device: samsung SM-S918B\nsoc: SM8550\ndate: 2024-05-01T10:02:00Z\nartifact: minicpm-2b-Q4_0.gguf\n" \
       "sha256: " + "ab" * 32 + "\nthreads: 4\n"


def _jsonv(v) -> str:
    return "[ " + ", ".join(map(str, v)) + " ]" if isinstance(v, list) else json.dumps(v)


def write_json(path):
    # json_printer: "[", objects with 4-space fields, "samples_*" arrays as "[ a, b ]", "]"
    objs = ["  {\n" + ",\n".join(f'    "{k}": {_jsonv(v)}' for k, v in r.items()) + "\n  }" for r in LB]
    path.write_text("[\n" + ",\n".join(objs) + "\n]\n")
    return path


def write_jsonl(path):
    # jsonl_printer: '{"k": v, ... "samples_ns": [ .. ],"samples_ts": [ .. ]}' per line
    lines = []
    for r in LB:
        head = "".join(f'"{k}": {_jsonv(v)}, ' for k, v in r.items() if not k.startswith("samples"))
        tail = f'"samples_ns": {_jsonv(r["samples_ns"])},"samples_ts": {_jsonv(r["samples_ts"])}'
        lines.append("{" + head + tail + "}")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_csv(path):
    # csv_printer: header of field names, every value double-quoted, booleans as 0/1
    keys = [k for k in LB[0] if not k.startswith("samples")]
    rows = [",".join(f'"{int(r[k]) if isinstance(r[k], bool) else r[k]}"' for k in keys) for r in LB]
    path.write_text(",".join(keys) + "\n" + "\n".join(rows) + "\n")
    return path


MD = """| model                          |       size |     params | backend    |    threads |            test |                  t/s |
| ------------------------------ | ---------: | ---------: | ---------- | ---------: | --------------: | -------------------: |
| minicpm 2B Q4_0                |   1.46 GiB |     2.72 B | CPU        |          4 |           pp512 |         41.47 ± 0.32 |
| minicpm 2B Q4_0                |   1.46 GiB |     2.72 B | CPU        |          4 |           tg128 |          6.50 ± 0.03 |
| minicpm 2B Q4_0                |   1.46 GiB |     2.72 B | CPU        |          4 |    tg128 @ d512 |          6.10 ± 0.05 |

build: 8cf427ff (5163)
"""

SWIFTUI_MD = """device: iPhone 15 Pro
date: 2024-05-02
| model | size | params | backend | test | t/s |
| --- | --- | --- | --- | --- | --- |
| minicpm 2B Q4_0 | 1.46 GiB | 2.72 B | Metal | pp 512 | 310.25 ± 4.10 |
| minicpm 2B Q4_0 | 1.46 GiB | 2.72 B | Metal | tg 128 | 17.80 ± 0.21 |
"""


@pytest.mark.parametrize("writer", [write_json, write_jsonl, write_csv])
def test_llama_bench_machine_formats_with_meta(tmp_path, writer):
    (tmp_path / "meta.txt").write_text(META)
    rows = ingest_file(writer(tmp_path / "llama-bench.out"))
    assert [r.test for r in rows] == ["pp512", "tg128"]
    pp, tg = rows
    assert (pp.n_prompt, pp.n_gen, tg.n_prompt, tg.n_gen) == (512, 0, 0, 128)
    assert pp.tokens_per_s == pytest.approx(41.472) and tg.tokens_per_s == pytest.approx(6.5)
    assert tg.stddev == pytest.approx(0.031)
    assert tg.device == "samsung SM-S918B (SM8550)" and tg.artifact == "minicpm-2b-Q4_0.gguf"
    assert tg.artifact_sha256 == "ab" * 32 and tg.quant == "Q4_0" and tg.threads == 4
    assert tg.source == "llama-bench" and tg.runtime == "llama.cpp" and tg.date == "2024-05-01T10:00:40Z"
    assert tg.raw["build_commit"] == "8cf427ff"


def test_llama_bench_without_meta_names_the_hardware(tmp_path):
    rows = ingest_file(write_jsonl(tmp_path / "r.jsonl"))
    assert rows[1].device == "ARMv8 Processor rev 0 (v8l)"
    assert rows[1].artifact == "minicpm-2b-Q4_0.gguf" and rows[1].artifact_sha256 == ""
    rows = ingest_file(tmp_path / "r.jsonl", device="Pixel 8 (Tensor G3)", artifact="x.gguf")
    assert rows[0].device == "Pixel 8 (Tensor G3)" and rows[0].artifact == "x.gguf"


def test_llama_bench_single_line_jsonl(tmp_path):
    p = tmp_path / "one.jsonl"
    p.write_text(write_jsonl(tmp_path / "two.jsonl").read_text().splitlines()[1] + "\n")
    assert [r.test for r in ingest_file(p)] == ["tg128"]


def test_llama_bench_markdown(tmp_path):
    (tmp_path / "meta.txt").write_text(META)
    p = tmp_path / "bench.md"
    p.write_text(MD)
    rows = ingest_file(p)
    assert [r.test for r in rows] == ["pp512", "tg128", "tg128@d512"]
    assert rows[1].tokens_per_s == 6.5 and rows[1].stddev == 0.03 and rows[1].threads == 4
    assert rows[2].raw["n_depth"] == 512 and rows[0].raw["build"] == "8cf427ff (5163)"
    assert rows[0].device == "samsung SM-S918B (SM8550)" and rows[0].quant == "Q4_0"


def test_llama_swiftui_bench_table_with_header(tmp_path):
    p = tmp_path / "ios.md"
    p.write_text(SWIFTUI_MD)
    rows = ingest_file(p)
    assert [(r.test, r.tokens_per_s, r.stddev) for r in rows] == [("pp512", 310.25, 4.1), ("tg128", 17.8, 0.21)]
    assert rows[1].device == "iPhone 15 Pro" and rows[1].date == "2024-05-02"
    assert rows[1].artifact == "minicpm 2B Q4_0"


def test_mlc_stats_lines(tmp_path):
    p = tmp_path / "mlc-stats.txt"
    p.write_text("device: samsung SM-S918B\nsoc: SM8550\ndate: 2024-05-01T11:00:00Z\n"
                 "artifact: MiniCPM-2B-q4f16_1-MLC\nn_gen: 256\n"
                 "# copied from MLCChat\n"
                 "prefill: 48.3 tok/s, decode: 6.4 tok/s\n"
                 "prefill: 51.0 tok/s, decode: 6.5 tok/s\n"
                 "prefill: N/A tok/s, decode: 6,6 tok/s\n"
                 "encode: 50.0 tok/s, decode: 6.5 tok/s\n")
    pp, tg = ingest_file(p)
    assert (pp.test, tg.test) == ("pp", "tg256") and tg.n_gen == 256
    assert pp.tokens_per_s == pytest.approx(50.0) and pp.raw["samples"] == [48.3, 51.0, 50.0]
    assert tg.tokens_per_s == pytest.approx(6.5) and tg.stddev == pytest.approx(np.std([6.4, 6.5, 6.6, 6.5], ddof=1))
    assert tg.source == "mlc" and tg.runtime == "mlc-llm" and tg.device == "samsung SM-S918B (SM8550)"
    assert tg.artifact == "MiniCPM-2B-q4f16_1-MLC" and tg.flags == ""


def test_mlc_verbose_stats(tmp_path):
    p = tmp_path / "bench.txt"
    p.write_text("device: Pixel 7\nStatistics:\n----------- prefill -----------\nthroughput: 120.5 tok/s\n"
                 "total tokens: 7 tok\ntotal time: 0.0581 s\n------------ decode ------------\n"
                 "throughput: 9.8 tok/s\ntotal tokens: 256 tok\ntotal time: 26.1 s\n")
    pp, tg = ingest_file(p)
    assert (pp.tokens_per_s, tg.tokens_per_s) == (120.5, 9.8) and tg.device == "Pixel 7"


def test_llmfarm_fill_in_file(tmp_path):
    p = tmp_path / "llmfarm-results.txt"
    p.write_text("# minicpm-edge: LLMFarm results\nformat: llmfarm-v1\ndevice: iPhone 15 Pro (A17 Pro)\n"
                 "artifact: minicpm-2b-Q4_0.gguf\ndate: 2024-05-01\n"
                 "12.31 ses, 17.92 t/s\n11.87 ses, 18.05 t/s\n12.02 s, 18.01 t/s\n")
    (row,) = ingest_file(p)
    assert row.source == "llmfarm" and row.runtime == "llama.cpp" and row.test == "tg"
    assert row.tokens_per_s == pytest.approx(18.01) and row.flags == PROMPT_TIME
    assert row.device == "iPhone 15 Pro (A17 Pro)" and row.raw["messages"][0] == [12.31, 17.92]


def test_llmfarm_history_json_needs_a_device(tmp_path):
    p = tmp_path / "chat.json"
    p.write_text(json.dumps([
        {"id": "1", "sender": "user", "state": "typed", "text": "hi", "tok_sec": "0.0"},
        {"id": "2", "sender": "system", "state": "predicted(totalSecond: 12.3)", "text": "...", "tok_sec": "14.5"},
        {"id": "3", "sender": "user", "state": "typed", "text": "more", "tok_sec": "0.0"},
        {"id": "4", "sender": "system", "state": "predicted(totalSecond: 10.1)", "text": "...", "tok_sec": "15.5"}]))
    with pytest.raises(UserError, match="device"):
        ingest_file(p)
    (row,) = ingest_file(p, device="iPhone 14 Pro")
    assert row.tokens_per_s == pytest.approx(15.0) and row.flags == PROMPT_TIME


def test_our_json(tmp_path):
    rec = {"source": "published", "device": "Snapdragon 8 Gen 2", "runtime": "mlc-llm", "artifact": "MiniCPM-2B",
           "test": "tg", "tokens_per_s": 6.5}
    p = tmp_path / "ours.json"
    p.write_text(json.dumps({"format": "minicpm-edge-bench", "version": 1, "rows": [rec]}))
    assert ingest_file(p) == [Result(**rec)]


MALFORMED = {
    "empty.json": ("", "empty file"),
    "binary.bin": (b"\x89PNG\r\n\x1a\n\x00\xff", "not a text file"),
    "broken.json": ('[{"avg_ts": 1.0,', "invalid JSON"),
    "broken.jsonl": (json.dumps(LB[0]) + "\n{\"avg_ts\": \n", "line 2"),
    "no_avg.json": (json.dumps([{k: v for k, v in LB[0].items() if k != "avg_ts"}]), "JSON that is neither"),
    "one_avg.json": (json.dumps([LB[0], {k: v for k, v in LB[1].items() if k != "avg_ts"}]), "result 2 has no avg_ts"),
    "neg.json": (json.dumps([{**LB[0], "avg_ts": -3}]), "tokens/s must be a positive number"),
    "word.json": (json.dumps([{**LB[0], "avg_ts": "fast"}]), "avg_ts is not a number"),
    "nan.jsonl": (json.dumps({**LB[0], "avg_ts": float("nan")}), "avg_ts is not a number"),
    "frac.json": (json.dumps([{**LB[0], "n_prompt": 51.5}]), "n_prompt must be a whole number"),
    "zero.json": (json.dumps([{**LB[0], "n_prompt": 0}]), "n_prompt = n_gen = 0"),
    "nogen.csv": ("n_prompt,avg_ts\n512,41.0\n", "has no n_gen"),
    "badtest.md": (MD.replace("tg128 @ d512", "xx999"), "unknown test 'xx999'"),
    "short.md": (MD.replace("|          4 |           tg128 |", "|           tg128 |"), "cells"),
    "nodevice.txt": ("prefill: 48.3 tok/s, decode: 6.4 tok/s\n", "no device named"),
    "allna.txt": ("device: x\nprefill: N/A tok/s, decode: N/A tok/s\n", "all N/A"),
    "nofig.txt": ("format: llmfarm-v1\ndevice: iPhone\n", "no per-message figures"),
    "garbage.txt": ("format: llmfarm-v1\ndevice: iPhone\n12.3 ses, 17 t/s\nabout 17 tokens a second\n",
                    "neither 'key: value'"),
    "unknown.txt": ("hello world\n", "not a result file minicpm-edge reads"),
    "v2.json": ('{"format": "minicpm-edge-bench", "version": 2, "rows": []}', "version 2"),
    "extra.json": ('{"format": "minicpm-edge-bench", "version": 1, "rows": [{"device": "x", "speed": 3}]}', "row 1"),
    "norows.json": ('{"format": "minicpm-edge-bench", "version": 1, "rows": []}', "no results"),
    "badsrc.json": ('{"format": "minicpm-edge-bench", "version": 1, "rows": [{"source": "rumour", "device": "x", '
                    '"runtime": "y", "artifact": "z", "test": "tg", "tokens_per_s": 3}]}', "unknown result source"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_files_give_one_line_errors(tmp_path, name):
    content, problem = MALFORMED[name]
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError) as e:
        ingest_file(p)
    msg = str(e.value)
    assert msg.startswith(str(p)) and problem in msg and "\n" not in msg


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        ingest_file(tmp_path / "nope.json")
    with pytest.raises(UserError, match="is a folder"):
        ingest_file(tmp_path)


def test_store_round_trip_and_schema(tmp_path):
    db = tmp_path / "b.sqlite"
    row = Result(source="measured", device="cpu", runtime="torch", artifact="m", test="tg8", tokens_per_s=12.5,
                 n_gen=8, stddev=None, threads=2, artifact_sha256="f" * 64, quant="bf16", flags="", date="2024-01-01",
                 bytes_per_token=123, raw={"samples": [12.0, 13.0], "nested": {"a": 1}})
    with Store(db) as s:
        assert s.add([row]) == 1 and len(s) == 1
    with Store(db) as s:
        assert s.rows() == [row]
        assert s.rows(test="tg") == [row] and s.rows(test="pp") == [] and s.rows(device="other") == []
        assert s.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    con = sqlite3.connect(db)
    con.execute("PRAGMA user_version = 99")
    con.commit()
    con.close()
    with pytest.raises(UserError, match="schema 99"):
        Store(db)
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all, just text" * 10)
    with pytest.raises(UserError, match="not a results store"):
        Store(tmp_path / "junk.sqlite")
    with Store(tmp_path / "c.sqlite") as s, pytest.raises(UserError, match="positive"):
        s.add([Result(source="measured", device="d", runtime="r", artifact="a", test="tg", tokens_per_s=0.0)])


def test_default_path_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_path() == tmp_path / "data" / "minicpm-edge" / "bench.sqlite"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_path().parts[-4:] == (".local", "share", "minicpm-edge", "bench.sqlite")


def test_ingesting_twice_adds_nothing(tmp_path):
    (tmp_path / "meta.txt").write_text(META)
    p = write_jsonl(tmp_path / "r.jsonl")
    with Store(tmp_path / "b.sqlite") as s:
        assert s.add(ingest_file(p)) == 2
        assert s.add(ingest_file(p)) == 0
        assert s.add(ingest_file(write_json(tmp_path / "same-run.json"))) == 0  # same results, other format
        later = [{**r, "test_time": r["test_time"].replace("10:", "11:", 1)} for r in LB]
        (tmp_path / "later.json").write_text(json.dumps(later))
        assert s.add(ingest_file(tmp_path / "later.json")) == 2
        assert len(s) == 4


def write_gguf(path, tied: bool):
    """token_embd F32 [100, 32], attn_q F16 [32, 32], ffn_down Q4_0 [32, 64], output_norm F32 [32] (+ output F16)."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "minicpm")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_tensor("token_embd.weight", rng.standard_normal((100, 32)).astype(np.float32))
    w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((32, 32)).astype(np.float16))
    q = gguf.quants.quantize(rng.standard_normal((32, 64)).astype(np.float32), QT.Q4_0)
    w.add_tensor("blk.0.ffn_down.weight", q, raw_dtype=QT.Q4_0)
    w.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    if not tied:
        w.add_tensor("output.weight", rng.standard_normal((100, 32)).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_roofline_gguf_bytes(tmp_path):
    # bytes: token_embd 100*32*4 = 12800 (a row 128), attn_q 32*32*2 = 2048, ffn_down 32 rows * 2 blocks * 18 = 1152,
    # output_norm 128, output 100*32*2 = 6400
    untied = roofline.bytes_per_token(write_gguf(tmp_path / "untied.gguf", tied=False))
    assert untied == {"format": "gguf", "bytes_per_token": 128 + 2048 + 1152 + 128 + 6400,
                      "weight_bytes": 12800 + 2048 + 1152 + 128 + 6400, "tied": False, "quant": "Q4_0"}
    tied = roofline.bytes_per_token(write_gguf(tmp_path / "tied.gguf", tied=True))
    assert tied["bytes_per_token"] == tied["weight_bytes"] == 12800 + 2048 + 1152 + 128 and tied["tied"]
    assert roofline.decode_bound(20.0, 16128) == pytest.approx(20e9 / 16128)
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(UserError, match="not a readable GGUF"):
        roofline.bytes_per_token(tmp_path / "bad.gguf")


def test_roofline_safetensors_folders(bundled, tmp_path):
    with safe_open(str(bundled / "model.safetensors"), "pt") as f:
        sizes = {n: f.get_slice(n).get_shape() for n in f.keys()}
        total = sum(f.get_tensor(n).numel() * f.get_tensor(n).element_size() for n in f.keys())
    tied = roofline.bytes_per_token(bundled)
    assert tied["tied"] and tied["bytes_per_token"] == tied["weight_bytes"] == total
    untied = small_variant(tmp_path / "untied", tie_word_embeddings=False)
    with safe_open(str(untied / "model.safetensors"), "pt") as f:
        emb = f.get_tensor("model.embed_tokens.weight")
        total = sum(f.get_tensor(n).numel() * f.get_tensor(n).element_size() for n in f.keys())
    r = roofline.bytes_per_token(untied)
    assert not r["tied"] and r["weight_bytes"] == total
    assert r["bytes_per_token"] == total - emb.numel() * 4 + emb.shape[1] * 4
    assert sizes["model.embed_tokens.weight"] == [4096, 256]


def test_roofline_mlc_cache(tmp_path):
    def cache(names):
        recs = [{"name": n, "shape": s, "dtype": d, "format": "raw", "nbytes": b, "byteOffset": 0}
                for n, s, d, b in names]
        (tmp_path / "tensor-cache.json").write_text(json.dumps(
            {"metadata": {}, "records": [{"dataPath": "params_shard_0.bin", "format": "raw-shard", "records": recs}]}))
    emb = [("model.embed_tokens.q_weight", [1000, 8], "uint32", 32000),
           ("model.embed_tokens.q_scale", [1000, 2], "float16", 4000)]
    rest = [("model.layers.0.mlp.down_proj.q_weight", [64, 16], "uint32", 4096),
            ("model.norm.weight", [64], "float16", 128)]
    cache(emb + rest)
    r = roofline.bytes_per_token(tmp_path)
    assert r["tied"] and r["bytes_per_token"] == 32000 + 4000 + 4096 + 128
    cache(emb + rest + [("lm_head.q_weight", [1000, 8], "uint32", 32000)])
    r = roofline.bytes_per_token(tmp_path)
    assert not r["tied"] and r["bytes_per_token"] == 32 + 4 + 4096 + 128 + 32000
    export = tmp_path / "export"  # `export --target android` keeps the weights in a <model>-MLC subfolder
    (export / "m-q4f16_0-MLC").mkdir(parents=True)
    (tmp_path / "tensor-cache.json").rename(export / "m-q4f16_0-MLC" / "tensor-cache.json")
    assert roofline.bytes_per_token(export) == r


def test_roofline_onnx_embedding_lookup(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def save(folder, tied):
        emb = numpy_helper.from_array(np.zeros((10, 4), np.float32), "emb")      # 160 bytes, a row 16
        w = numpy_helper.from_array(np.zeros((4, 4), np.float32), "w")           # 64 bytes
        nodes = [helper.make_node("Gather", ["emb", "ids"], ["x"]), helper.make_node("MatMul", ["x", "w"], ["h"])]
        if tied:
            nodes += [helper.make_node("Transpose", ["emb"], ["embT"]),
                      helper.make_node("MatMul", ["h", "embT"], ["y"])]
        out = "y" if tied else "h"
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
                                  [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], [emb, w])
        folder.mkdir()
        onnx.save(helper.make_model(graph), str(folder / "model.onnx"))
        return folder

    assert roofline.bytes_per_token(save(tmp_path / "a", tied=False))["bytes_per_token"] == 16 + 64
    assert roofline.bytes_per_token(save(tmp_path / "b", tied=True))["bytes_per_token"] == 160 + 64

    # the exporter's graph: a float16 table read by the Gather and cast to float32 for the head (folded at load, so
    # the head reads 4 bytes a weight), GroupQueryAttention's cos/sin caches read one row (position) per token
    emb = numpy_helper.from_array(np.zeros((10, 4), np.float16), "emb")          # 80 bytes, 160 as float32
    w = numpy_helper.from_array(np.zeros((4, 4), np.float32), "w")               # 64 bytes
    cos, sin = (numpy_helper.from_array(np.zeros((8, 2), np.float32), n) for n in ("cos", "sin"))  # rows of 8 bytes
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["x"]), helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("GroupQueryAttention", ["h", "", "", "pk", "pv", "sk", "t", "cos", "sin"],
                              ["a", "k", "v"], domain="com.microsoft"),
             helper.make_node("Cast", ["emb"], ["embf"], to=TensorProto.FLOAT),
             helper.make_node("Gemm", ["a", "embf"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [emb, w, cos, sin])
    (tmp_path / "c").mkdir()
    onnx.save(helper.make_model(graph), str(tmp_path / "c" / "model.onnx"))
    r = roofline.bytes_per_token(tmp_path / "c")
    assert r["bytes_per_token"] == 160 + 64 + 8 + 8 and r["tied"]


def test_config_bytes_per_token_arithmetic():
    cfg = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 300}
    # per layer q,o 64*64 each, k,v 32*64 each, mlp 3*64*96 = 30720; + embedding 300*64; at 4 bits + fp16/32
    matrices = 2 * 30720 + 300 * 64
    assert roofline.config_bytes_per_token(cfg) == matrices * 9 // 16 + 5 * 64 * 4


def test_bandwidth_table_lookup_and_extension(tmp_path):
    look = roofline.lookup_bandwidth
    assert look("samsung SM-S918B (SM8550)") == ("Snapdragon 8 Gen 2", 67.2)
    assert look("OPPO Find N3 (Snapdragon 8 Gen2)")[0] == "Snapdragon 8 Gen 2"
    assert look("Xiaomi (SM8250-AC)")[0] == "Snapdragon 870" and look("Xiaomi (SM8250)")[0] == "Snapdragon 865"
    assert look("iPhone 15 Pro Max")[0] == "Apple A17 Pro" and look("iPhone 15 Plus")[0] == "Apple A16"
    assert look("Snapdragon 888+")[0] == "Snapdragon 888" and look("Apple A13")[1] == 34.1
    assert look("Galaxy (SM8650)") is None and look("Galaxy A16") is None and look("Pixel 8") is None
    p = tmp_path / "bw.json"
    p.write_text(json.dumps({"Tensor G3": {"gbs": 68.3, "aliases": ["pixel 8"]}, "Snapdragon 8 Gen 2": 60.0}))
    table = roofline.load_bandwidths(p)
    assert look("Pixel 8 Pro", table) == ("Tensor G3", 68.3) and look("SM8550", table)[1] == 60.0
    p.write_text(json.dumps({"X": -1}))
    with pytest.raises(UserError, match="positive GB/s"):
        roofline.load_bandwidths(p)
    p.write_text("[1, 2]")
    with pytest.raises(UserError, match="JSON object"):
        roofline.load_bandwidths(p)


def test_measure_bandwidth_here():
    import torch

    threads = torch.get_num_threads()
    for n in (None, 1):
        gbs = roofline.measure_bandwidth(mib=64, repeats=3, threads=n)
        assert np.isfinite(gbs) and gbs > 0
        assert torch.get_num_threads() == threads  # torch's thread count as it was


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class FakeRunner:
    """Prefill costs 1 ms a token, each decode step 10 ms, on a fake clock: the exact rates are known."""
    name, threads, vocab_size = "fake", 3, 500

    def __init__(self, clock):
        self.clock = clock

    def logits(self, ids):
        self.clock.now += 0.001 * len(ids)
        return np.zeros((len(ids), self.vocab_size), np.float32)

    def generate(self, ids, n_new):
        self.clock.now += 0.001 * len(ids) + 0.010 * n_new
        return [5] * n_new


def test_measure_subtracts_prefill_from_decode(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(run, "perf_counter", clock)
    s = run.measure(FakeRunner(clock), n_prompt=64, n_gen=16, runs=3, bandwidth_gbs=10.0)
    assert s["prefill"]["tokens_per_s"] == pytest.approx(1000.0) and s["decode"]["tokens_per_s"] == pytest.approx(100.0)
    assert s["decode"]["stddev"] == pytest.approx(0.0, abs=1e-6) and len(s["decode"]["samples"]) == 3
    pp, tg = run.rows(s)
    assert (pp.test, tg.test, tg.n_gen, tg.threads, tg.runtime) == ("pp64", "tg16", 16, 3, "fake")


class StallingRunner(FakeRunner):
    """The first `stalls` 1-token generations take a second longer (another process took the CPU)."""

    def __init__(self, clock, stalls):
        super().__init__(clock)
        self.stalls = stalls

    def generate(self, ids, n_new):
        if n_new == 1 and self.stalls > 0:
            self.stalls -= 1
            self.clock.now += 1.0
        return super().generate(ids, n_new)


def test_measure_repeats_decode_pairs_spoilt_by_a_stall(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(run, "perf_counter", clock)
    s = run.measure(StallingRunner(clock, stalls=2), n_prompt=64, n_gen=16, runs=3, bandwidth_gbs=10.0)
    assert s["decode"]["samples"] == pytest.approx([100.0] * 3)  # two spoilt pairs were timed again
    with pytest.raises(UserError, match="only 0 of 3 decode timings were usable"):
        run.measure(StallingRunner(clock, stalls=100), n_prompt=64, n_gen=16, runs=3, bandwidth_gbs=10.0)


def test_llama_cpp_is_timed_at_openmps_default_wait_policy(monkeypatch):
    """minicpm_edge sets OMP_WAIT_POLICY=PASSIVE for torch; llama.cpp's ggml, on the same OpenMP runtime, decoded 10x
    slower that way, so its timing runs in a child without it, unless the user chose a policy themselves."""
    import minicpm_edge

    monkeypatch.setattr(minicpm_edge, "OMP_POLICY_SET_HERE", True)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    env = run.child_env()
    assert "OMP_WAIT_POLICY" not in env and env["MINICPM_EDGE_OMP_DEFAULT"] == "1"
    script = "import os, minicpm_edge; print(os.environ.get('OMP_WAIT_POLICY'), minicpm_edge.OMP_POLICY_SET_HERE)"
    child = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert child.stdout.split() == ["None", "False"], child.stderr  # the child's import leaves the default alone
    monkeypatch.setattr(minicpm_edge, "OMP_POLICY_SET_HERE", False)  # the user's own setting travels as it is
    assert run.child_env()["OMP_WAIT_POLICY"] == "PASSIVE"


def test_a_child_that_dies_gives_one_line(monkeypatch, tmp_path):
    """measure_apart: the child's own one-line error (exit 2) as it is; any other death named with its exit code."""
    def fake(returncode, stderr):
        return lambda *a, **kw: subprocess.CompletedProcess(a, returncode, "", stderr)

    monkeypatch.setattr(run.subprocess, "run", fake(2, "some warning\nm.gguf: llama.cpp cannot load this file (x)\n"))
    with pytest.raises(UserError, match=r"^m.gguf: llama.cpp cannot load this file \(x\)$"):
        run.measure_apart(tmp_path / "m.gguf", "llama.cpp", None, 64, n_prompt=8, n_gen=4, runs=1)
    monkeypatch.setattr(run.subprocess, "run", fake(-11, ""))
    with pytest.raises(UserError, match=r"failed in its child process \(exit -11\): no message"):
        run.measure_apart(tmp_path / "m.gguf", "llama.cpp", None, 64, n_prompt=8, n_gen=4, runs=1)
    monkeypatch.setattr(run.subprocess, "run", lambda *a, **kw: subprocess.CompletedProcess(a, 0, "noise\n", ""))
    with pytest.raises(UserError, match="its child process gave no result"):
        run.measure_apart(tmp_path / "m.gguf", "llama.cpp", None, 64, n_prompt=8, n_gen=4, runs=1)


def test_measure_torch_runner_on_bundled_model(bundled, tmp_path):
    from minicpm_edge.runtimes import open_runner

    runner = open_runner(bundled)  # no threads=: TorchRunner would change torch's thread count for the whole session
    s = run.measure(runner, n_prompt=32, n_gen=8, runs=2, artifact=bundled, bandwidth_gbs=20.0)
    pp, tg = rows = run.rows(s)
    assert (pp.test, pp.n_prompt, tg.test, tg.n_gen) == ("pp32", 32, "tg8", 8)
    assert all(r.tokens_per_s > 0 and r.source == "measured" and r.runtime == "torch" for r in rows)
    assert pp.threads == tg.threads == runner.threads >= 1
    assert len(tg.raw["samples"]) == 2 and s["peak_rss_bytes"] > 0
    assert s["artifact"]["bytes"] == sum(p.stat().st_size for p in bundled.rglob("*") if p.is_file())
    assert len(tg.artifact_sha256) == 64 and tg.artifact == bundled.name
    assert tg.bytes_per_token == roofline.bytes_per_token(bundled)["bytes_per_token"]
    assert s["decode_bound"] == pytest.approx(20e9 / tg.bytes_per_token)
    out = tmp_path / "run.json"
    out.write_text(json.dumps(s))
    assert ingest_file(out) == rows
    with Store(tmp_path / "b.sqlite") as st:
        assert st.add(rows) == 2 and st.add(ingest_file(out)) == 0 and st.rows(test="tg") == [tg]


def test_report_table_and_plot(tmp_path):
    (tmp_path / "meta.txt").write_text(META)
    phone = ingest_file(write_jsonl(tmp_path / "r.jsonl"), bytes_per_token=1_000_000_000)
    here = Result(source="measured", device="Test CPU", runtime="torch", artifact="tiny", test="tg8",
                  tokens_per_s=200.0, stddev=5.0, bytes_per_token=10_000_000, raw={"bandwidth_gbs": 10.0})
    items = report.entries(phone + [here])
    assert [e["source"] for e in items[:2]] == ["llama-bench", "measured"] and len(items) == 2 + 14
    s23 = items[0]
    assert s23["bandwidth"] == "Snapdragon 8 Gen 2" and s23["bound"] == pytest.approx(67.2)
    assert s23["of_bound"] == pytest.approx(6.5 / 67.2)
    assert items[1]["bound"] == pytest.approx(1000.0) and items[1]["bandwidth"] == "measured"
    pub = {e["device"]: e for e in items if e["source"] == "published"}
    assert pub["Apple A17 Pro"]["tokens_per_s"] == 18.0 and pub["Apple A17 Pro"]["flags"] == PROMPT_TIME
    assert pub["Snapdragon 835"]["tokens_per_s"] == 1.3 and pub["Snapdragon 835"]["bound"] > 1.3
    console = Console(record=True, width=250)
    console.print(report.table(items))
    text = console.export_text()
    assert "samsung SM-S918B (SM8550)" in text and "67.2" in text and "Snapdragon 8 Gen 2 67.2 GB/s" in text
    png = report.plot(items, tmp_path / "plot" / "decode.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


FAKE_ADB = r"""#!/usr/bin/env bash
[ "$1" = -s ] && shift 2
case "$1" in
  get-state) echo device ;;
  get-serialno) echo FAKE123 ;;
  push) echo "$2 -> $3" >> "$FAKE_LOG" ;;
  pull) cp "$FAKE_RESULT" "$3" ;;
  shell)
    case "$2" in
      getprop) case "$3" in
          ro.product.manufacturer) printf 'samsung\r\n' ;; ro.product.model) printf 'SM-S918B\r\n' ;;
          ro.soc.model) printf 'SM8550\r\n' ;; *) echo ;; esac ;;
      sha256sum) printf '%s  %s\r\n' "$(printf 'cd%.0s' {1..32})" "$3" ;;
      stat) exit 1 ;;
      *) echo "shell $*" >> "$FAKE_LOG" ;;
    esac ;;
esac
"""


def test_android_kit_runs_against_a_fake_phone(tmp_path):
    model = write_gguf(tmp_path / "minicpm-2b-Q4_0.gguf", tied=True)
    kit = plan.write_plan("android", tmp_path / "kit", artifact=model)
    script = kit / "bench_android.sh"
    assert script.stat().st_mode & stat.S_IXUSR and (kit / "manifest.json").is_file()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    readme = (kit / "README.md").read_text()
    assert "-o jsonl" in readme and "meta.txt" in readme and "prefill: X tok/s, decode: Y tok/s" in readme
    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / "adb").write_text(FAKE_ADB)
    (fake / "adb").chmod(0o755)
    bench = kit / "llama.cpp" / "bin" / "llama-bench"
    bench.parent.mkdir(parents=True)
    bench.write_text("#!/bin/sh\n")
    bench.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path / "adb.log"),
           "FAKE_RESULT": str(write_jsonl(tmp_path / "phone.jsonl"))}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = kit / "results" / "FAKE123" / "llama-bench" / "llama-bench.jsonl"
    log = (tmp_path / "adb.log").read_text()
    assert f"{model} -> /data/local/tmp/minicpm-edge/{model.name}" in log and "-o jsonl" in log and "-t 4" in log
    rows = ingest_file(result)
    assert rows[1].device == "samsung SM-S918B (SM8550)" and rows[1].artifact == model.name
    assert rows[1].artifact_sha256 == "cd" * 32 and rows[1].threads == 4
    done = subprocess.run(["bash", str(script), "mlc"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    stats = kit / "results" / "FAKE123" / "mlc" / "mlc-stats.txt"
    stats.write_text(stats.read_text() + "prefill: 40.1 tok/s, decode: 6.2 tok/s\n")
    pp, tg = ingest_file(stats)
    assert tg.device == "samsung SM-S918B (SM8550)" and tg.tokens_per_s == 6.2 and tg.artifact_sha256 == ""
    done = subprocess.run(["bash", str(script), "other"], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "usage" in done.stderr


def test_android_kit_without_phone_or_binary_says_why(tmp_path):
    kit = plan.write_plan("android", tmp_path / "kit")
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    done = subprocess.run(["bash", str(kit / "bench_android.sh")], env=env, capture_output=True, text=True)
    assert done.returncode == 1 and "adb not found" in done.stderr


def test_ios_kit_template_round_trip(tmp_path):
    model = write_gguf(tmp_path / "m-Q4_0.gguf", tied=True)
    kit = plan.write_plan("ios", tmp_path / "ios", artifact=model)
    readme = (kit / "README.md").read_text()
    assert "LLMFarm" in readme and "ses" in readme and "llama-bench" in readme
    template = kit / "llmfarm-results.txt"
    with pytest.raises(UserError, match="no device named|no per-message"):
        ingest_file(template)
    filled = template.read_text().replace("device:\n", "device: iPhone 15 Pro (A17 Pro)\n") + "12.3 ses, 17.9 t/s\n"
    template.write_text(filled)
    (row,) = ingest_file(template)
    assert row.artifact == model.name and len(row.artifact_sha256) == 64 and row.flags == PROMPT_TIME
    assert roofline.lookup_bandwidth(row.device)[0] == "Apple A17 Pro"


def test_plan_refuses_bad_requests(tmp_path):
    with pytest.raises(UserError, match="no device kit"):
        plan.write_plan("onnx", tmp_path / "k")
    plan.write_plan("ios", tmp_path / "k")
    with pytest.raises(UserError, match="exists"):
        plan.write_plan("ios", tmp_path / "k")
    plan.write_plan("android", tmp_path / "k", force=True)
    assert (tmp_path / "k" / "bench_android.sh").is_file()
    with pytest.raises(UserError, match="no such file"):
        plan.write_plan("android", tmp_path / "k2", artifact=tmp_path / "missing.gguf")


def test_cli_run_ingest_report_on_gguf_and_onnx(bundled_gptq, tmp_path):
    """The verbs end to end on this machine: bench run through llama.cpp and onnxruntime writes rows, its JSON
    ingests as duplicates, and bench report draws the plot."""
    from minicpm_edge.export.ios import export_ios
    from minicpm_edge.export.onnx import export_onnx

    def cli(*args):  # piped, as in a log or CI, with a narrow COLUMNS that must not wrap anything
        r = subprocess.run([sys.executable, "-m", "minicpm_edge", "bench", *map(str, args)], capture_output=True,
                           text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "40"})
        assert r.returncode == 0, r.stderr
        assert "llama_" not in r.stderr and "n_ctx" not in r.stderr, r.stderr  # llama.cpp's own log stays quiet
        return r.stdout

    db = tmp_path / "b.sqlite"
    for art in (export_ios(bundled_gptq, tmp_path / "ios"), export_onnx(bundled_gptq, tmp_path / "onnx")):
        out = cli("run", art, "--n-prompt", 64, "--n-gen", 16, "--runs", 2, "--threads", 1, "--db", db,
                  "--json", tmp_path / f"{art.name}.json")
        assert "2 new rows" in out and "decode bound" in out
        assert any(f"{db} " in line or line.endswith(str(db)) for line in out.splitlines()), out  # the path whole
    piped = json.loads(cli("run", tmp_path / "ios", "--n-prompt", 16, "--n-gen", 4, "--runs", 1, "--threads", 1,
                           "--db", tmp_path / "other.sqlite", "--json", "-"))  # JSON alone on stdout
    assert piped["format"] == "minicpm-edge-bench" and piped["decode"]["tokens_per_s"] > 0
    with Store(db) as st:
        rows = st.rows()
    assert sorted((r.runtime, r.test) for r in rows) == [("llama.cpp", "pp64"), ("llama.cpp", "tg16"),
                                                          ("onnxruntime", "pp64"), ("onnxruntime", "tg16")]
    assert all(r.tokens_per_s > 0 and r.bytes_per_token > 0 and len(r.artifact_sha256) == 64 for r in rows)
    assert f"{tmp_path / 'ios.json'}: 2 rows, 0 new" in cli("ingest", tmp_path / "ios.json", "--db", db)
    report_lines = cli("report", "--db", db, "--plot", tmp_path / "bench.png").splitlines()
    for r in [r for r in rows if r.test == "tg16"]:  # one whole line per decode row: name, prefill and decode figures
        pp = next(p for p in rows if p.runtime == r.runtime and p.test == "pp64")
        line = next(ln for ln in report_lines if r.runtime in ln and r.device in ln)
        assert f"{r.tokens_per_s:.2f}" in line and f"{pp.tokens_per_s:.2f} (pp64)" in line, line
    assert any("Huawei Nova 11 SE, HarmonyOS 4.0 (Snapdragon 778)" in ln and "1.90" in ln for ln in report_lines)
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


REAL = Path(__file__).parent / "data" / "llama-bench"  # written by llama-bench (llama.cpp 0c1e570, the version
# llama-cpp-python 0.3.36 vendors) on this project's Q4_0 GGUF: `llama-bench -p 64 -n 16 -t 1 -r 2 -o FORMAT`


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "md"])
def test_real_llama_bench_output(fmt):
    path = REAL / f"minicpm-tiny-Q4_0.{fmt}"
    rows = ingest_file(path, device="this CPU" if fmt == "md" else None)  # the markdown table names no hardware
    assert sorted((r.test, r.n_prompt, r.n_gen) for r in rows) == [("pp64", 64, 0), ("tg16", 0, 16)]
    for r in rows:
        assert (r.source, r.runtime, r.threads, r.quant) == ("llama-bench", "llama.cpp", 1, "Q4_0")
        assert r.tokens_per_s > 0 and r.stddev is not None
        assert r.device == ("this CPU" if fmt == "md" else "Intel(R) Xeon(R) Processor")
    if fmt != "md":
        assert all(r.artifact == "minicpm-tiny-gptq-w4g32-Q4_0.gguf" for r in rows)
    records = json.loads((REAL / "minicpm-tiny-Q4_0.json").read_text())
    if fmt == "json":
        assert sorted(r.tokens_per_s for r in rows) == sorted(x["avg_ts"] for x in records)
    # model_size (bytes of weights a decoded token reads) gives the roofline; markdown's "3.42 MiB" to 3 digits
    assert all(r.bytes_per_token == pytest.approx(records[0]["model_size"], rel=0.002) for r in rows)
    [e] = report.entries(rows, {"Intel(R) Xeon(R) Processor": (10.0, ()), "this CPU": (10.0, ())},
                         with_published=False)
    tg, pp = (next(r for r in rows if r.test.startswith(t)) for t in ("tg", "pp"))
    assert e["bound"] == pytest.approx(10e9 / tg.bytes_per_token) and e["of_bound"] == pytest.approx(
        tg.tokens_per_s / e["bound"])
    assert (e["prefill_test"], e["prefill_tokens_per_s"]) == ("pp64", pp.tokens_per_s)


def test_runs_in_the_same_second_are_two_rows_and_v1_stores_upgrade(tmp_path):
    (tmp_path / "meta.txt").write_text(META)
    a = ingest_file(write_jsonl(tmp_path / "r.jsonl"))
    b = [Result(**{**asdict(r), "tokens_per_s": r.tokens_per_s * 1.01}) for r in a]  # same key, another figure
    db = tmp_path / "v1.sqlite"
    con = sqlite3.connect(db)
    con.executescript(SCHEMA + "CREATE UNIQUE INDEX results_key ON results (source, device, runtime, artifact, "
                      "artifact_sha256, test, n_prompt, n_gen, threads, date); PRAGMA user_version = 1;")
    con.close()
    with Store(db) as s:
        assert s.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        assert s.add(a) == 2 and s.add(b) == 2 and s.add(a) == 0 and len(s) == 4
