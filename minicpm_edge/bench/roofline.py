"""Decode speed upper bound: every weight is read once per decoded token, so tok/s <= bandwidth / bytes per token.

Bytes per token count every weight tensor, except that an input embedding read by row lookup costs one row; a tied
embedding (also the LM head) is read whole. KV-cache reads are left out (they grow with the context), so the
bound is for short contexts. Bandwidths are theoretical peaks (data rate x bus width) of the phone's DRAM.
"""

from __future__ import annotations

import json
import re
import struct
import time
from pathlib import Path

import numpy as np

from ..errors import UserError

# name: (GB/s, aliases). Peak = transfers/s x 8 bytes (64-bit LPDDR bus, 4 x 16-bit channels) unless noted.
# Qualcomm: memory type and clock from Qualcomm's launch announcements / product briefs as reported by
# phoneworld.com.pk and wccftech.com (8 Gen 2: "LPDDR5X up to 4200 MHz") and nanoreview.net SoC pages (which list
# memory type, frequency, bus and max bandwidth, e.g. Snapdragon 888: 51.2 GB/s). Apple does not publish memory
# specs: type and data rate for A13-A17 Pro from nanoreview.net SoC pages and teardown reports (LPDDR4X-4266
# on A13/A14, LPDDR5-6400 on A16/A17 Pro).
BANDWIDTHS: dict[str, tuple[float, tuple[str, ...]]] = {
    "Snapdragon 8 Gen 2": (67.2, ("8 gen 2", "sm8550", "kalama")),           # LPDDR5X 4200 MHz = 8400 MT/s
    "Snapdragon 8 Gen 1": (51.2, ("8 gen 1", "sm8450", "taro")),             # LPDDR5 3200 MHz = 6400 MT/s
    "Snapdragon 888": (51.2, ("888", "sm8350", "lahaina")),                 # LPDDR5 3200 MHz (888+ the same)
    "Snapdragon 870": (44.0, ("870", "sm8250-ac")),                         # LPDDR5 2750 MHz = 5500 MT/s
    "Snapdragon 865": (44.0, ("865", "sm8250", "kona")),                    # LPDDR5 2750 MHz (LPDDR4X phones: 34.1)
    "Snapdragon 855": (34.1, ("855", "sm8150", "msmnile")),                 # LPDDR4X 2133 MHz = 4266 MT/s
    "Snapdragon 845": (29.9, ("845", "sdm845")),                            # LPDDR4X 1866 MHz = 3732 MT/s
    "Snapdragon 778": (51.2, ("778", "sm7325", "yupik")),                   # LPDDR5 3200 MHz max (LPDDR4X: 34.1)
    "Snapdragon 835": (29.9, ("835", "msm8998")),                           # LPDDR4X 1866 MHz
    "Apple A17 Pro": (51.2, ("a17 pro", "iphone 15 pro")),                  # LPDDR5-6400
    "Apple A16": (51.2, ("apple a16", "a16 bionic", "iphone 14 pro", "iphone 15")),  # LPDDR5-6400
    "Apple A14": (34.1, ("apple a14", "a14 bionic", "iphone 12")),          # LPDDR4X-4266
    "Apple A13": (34.1, ("apple a13", "a13 bionic", "iphone 11")),          # LPDDR4X-4266
}


def load_bandwidths(path: Path | None = None) -> dict[str, tuple[float, tuple[str, ...]]]:
    """The built-in table extended by a JSON file: {"name": GB/s} or {"name": {"gbs": x, "aliases": [...]}}.

    A name is matched in device descriptions like its aliases; overriding a built-in name keeps its aliases.
    """
    table = dict(BANDWIDTHS)
    if path is None:
        return table
    try:
        extra = json.loads(Path(path).read_text())
        assert isinstance(extra, dict)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, AssertionError):
        raise UserError(f"{path}: not a JSON object of device bandwidths") from None
    for name, v in extra.items():
        gbs, aliases = (v.get("gbs"), v.get("aliases", [])) if isinstance(v, dict) else (v, [])
        if isinstance(gbs, bool) or not isinstance(gbs, (int, float)) or gbs <= 0 or not isinstance(aliases, list):
            raise UserError(f"{path}: {name!r} needs a positive GB/s number (and an optional list of aliases)")
        table[name] = (float(gbs), tuple(str(a) for a in aliases) + table.get(name, (0, ()))[1])
    return table


def _pattern(alias: str) -> re.Pattern:
    """Alias words with any spacing ("8 gen 2" ~ "8Gen2"), not inside a longer number or word ("865" !~ "SM8650")."""
    alias = alias.strip().lower()
    before = r"(?<![0-9a-z])" if alias[:1].isalpha() else r"(?<!\d)"
    return re.compile(before + r"[\s_-]*".join(map(re.escape, re.split(r"[\s_-]+", alias))) + r"(?!\d)")


def lookup_bandwidth(device: str, table: dict | None = None) -> tuple[str, float] | None:
    """(table name, GB/s) for a device description ("SM-S918B (SM8550)", "iPhone 15 Pro"); longest alias wins."""
    table = table or BANDWIDTHS
    text = device.lower()
    candidates = [(name.lower(), name) for name in table] + [(a.lower(), n) for n, (_, al) in table.items() for a in al]
    for alias, name in sorted(candidates, key=lambda c: -len(c[0])):
        if _pattern(alias).search(text):
            return name, table[name][0]
    return None


def measure_bandwidth(mib: int = 512, repeats: int = 5, threads: int | None = None) -> float:
    """This machine's memory read bandwidth in GB/s, what decode is bound by: median over `repeats` sums of a `mib` MiB
    float32 buffer (well past the caches) on `threads` threads (default: torch's count, all cores). The one-thread
    copy (read + write) measured before gave 26-27 GB/s on a 2-core AMD EPYC VM where two threads' sums read 30-52
    (moving with the VM's neighbours) and llama.cpp's 2B decode pulled 33: a bound decode exceeded."""
    import torch

    x = torch.ones(mib << 18)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        x.sum()  # fault the pages in before timing
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            x.sum()
            times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(before)
    return x.numel() * 4 / float(np.median(times)) / 1e9


def decode_bound(bandwidth_gbs: float, bytes_per_token: int) -> float:
    """Upper bound on decode tokens/s."""
    return bandwidth_gbs * 1e9 / bytes_per_token


def config_bytes_per_token(cfg: dict, bits: int = 4, group_size: int = 32, scale_bytes: int = 2) -> int:
    """Estimate from a HF config: all matrices (tied embedding included) at `bits` + a scale per group; fp32 norms."""
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    d = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * d
    per_layer = h * h * 2 + 2 * kv * h + 3 * h * inter
    matrix = layers * per_layer + cfg["vocab_size"] * h
    per_weight = bits / 8 + scale_bytes / group_size
    norms = (2 * layers + 1) * h * 4
    return round(matrix * per_weight) + norms


def bytes_per_token(path: Path) -> dict:
    """{"format", "bytes_per_token", "weight_bytes", "tied", "quant"} for a GGUF file, ONNX/MLC folder or checkpoint."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return _gguf(path)
    if path.is_dir():
        if (path / "model.onnx").is_file():
            return _onnx(path)
        for name in ("tensor-cache.json", "ndarray-cache.json"):  # the weights folder, or an export holding one
            caches = [path / name] if (path / name).is_file() else sorted(path.glob(f"*/{name}"))
            if len(caches) == 1:
                return _mlc(caches[0].parent, caches[0])
        if sorted(path.glob("*.safetensors")):
            return _safetensors(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _gguf(ggufs[0])
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    raise UserError(f"{path}: not a GGUF file, ONNX or MLC export folder, or safetensors checkpoint")


def _summary(fmt: str, tensors: dict[str, tuple[int, int]], embedding: str | None, tied: bool, quant: str) -> dict:
    """tensors: name -> (bytes, rows). An untied embedding costs one row per token."""
    total = sum(b for b, _ in tensors.values())
    per_token = total
    if embedding in tensors and not tied:
        b, rows = tensors[embedding]
        per_token -= b - b // max(rows, 1)
    return {"format": fmt, "bytes_per_token": per_token, "weight_bytes": total, "tied": tied, "quant": quant}


def _gguf(path: Path) -> dict:
    import gguf

    from ..artifact import open_gguf

    reader = open_gguf(path)
    try:
        tensors = {t.name: (int(t.n_bytes), int(t.shape[1]) if len(t.shape) > 1 else 1) for t in reader.tensors}
        ftype = int(reader.fields["general.file_type"].parts[-1][0]) if "general.file_type" in reader.fields else None
    except (IndexError, TypeError, ValueError, OverflowError):
        raise UserError(f"{path}: not a readable GGUF file (malformed tensor info or file type)") from None
    quant = ""
    if ftype is not None:
        try:
            quant = gguf.LlamaFileType(ftype).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            quant = f"file_type {ftype}"
    return _summary("gguf", tensors, "token_embd.weight", "output.weight" not in tensors, quant)


def _safetensors(path: Path) -> dict:
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        try:
            with open(f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                size = f.stat().st_size
                if n > min(size - 8, 100 << 20):  # safetensors caps headers at 100 MB
                    raise ValueError("header length past the end of the file")
                header = json.loads(fh.read(n))
            for name, rec in header.items():
                if name != "__metadata__":
                    start, end = rec["data_offsets"]
                    shape = rec["shape"]
                    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (start, end, *shape)) \
                            or not 0 <= start <= end <= size - 8 - n:
                        raise ValueError(f"{name}: offsets or shape out of range")
                    tensors[name] = (end - start, shape[0] if shape else 1)
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError, KeyError,
                TypeError, AttributeError):
            raise UserError(f"{f}: not a readable safetensors file") from None
    cfg = {}
    if (path / "config.json").is_file():
        from ..model.config import read_config_json

        cfg = read_config_json(path)
    q = cfg.get("quantization_config") or {}
    q = q if isinstance(q, dict) else {}
    quant = str(cfg.get("torch_dtype") or "")
    if q:
        quant = f"{q.get('quant_method', 'quant')} w{q.get('bits')} g{q.get('group_size')}"
    tied = "lm_head.weight" not in tensors and not any(n.startswith("lm_head.") for n in tensors)
    return _summary("safetensors", tensors, "model.embed_tokens.weight", tied, quant)


def _mlc(path: Path, cache: Path) -> dict:
    try:
        records = [r for shard in json.loads(cache.read_text())["records"] for r in shard["records"]]
        tensors = {r["name"]: (int(r["nbytes"]), int(r["shape"][0]) if r["shape"] else 1) for r in records}
    except (OSError, json.JSONDecodeError, RecursionError, KeyError, TypeError, ValueError):
        raise UserError(f"{cache}: not an MLC tensor cache") from None
    tied = not any(n.startswith("lm_head") for n in tensors)
    quant = ""
    if (path / "mlc-chat-config.json").is_file():
        try:
            quant = str(json.loads((path / "mlc-chat-config.json").read_text()).get("quantization", ""))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            raise UserError(f"{path / 'mlc-chat-config.json'}: not a JSON object") from None
    out = _summary("mlc", tensors, None, tied, quant)
    if not tied:  # a quantised embedding is two tensors (codes, scales), each read one row at a time
        emb = [n for n in tensors if n.startswith("model.embed_tokens")]
        out["bytes_per_token"] -= sum(tensors[n][0] - tensors[n][0] // max(tensors[n][1], 1) for n in emb)
    return out


def _onnx(path: Path) -> dict:
    import onnx

    try:
        model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise UserError(f"{path / 'model.onnx'}: not a readable ONNX model ({type(e).__name__})") from None
    graph = model.graph
    tensors = {}
    for t in graph.initializer:
        n = int(np.prod(t.dims)) if len(t.dims) else 1
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except (KeyError, ValueError, TypeError):
            raise UserError(f"{path / 'model.onnx'}: initializer {t.name} has an unknown data type") from None
        tensors[t.name] = (n * itemsize, t.dims[0] if t.dims else 1)
    # a Reshape of an initializer (the quantised table's codes as GatherBlockQuantized reads them) stands for it
    reshaped = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Reshape" and n.input[0] in tensors}
    users: dict[str, list] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if not (node.op_type == "Reshape" and i == 0 and node.output[0] in reshaped):
                users.setdefault(reshaped.get(name, name), []).append((node.op_type, i))
    # an initializer used only as the data input of Gather nodes (or the codes and scales of GatherBlockQuantized) is
    # an embedding lookup, and GroupQueryAttention's cos/sin caches are read at the token's position: one row a token
    gathers = {("Gather", 0), ("GatherBlockQuantized", 0)}
    rows = {*gathers, ("GatherBlockQuantized", 2), ("GroupQueryAttention", 7), ("GroupQueryAttention", 8)}
    lookups = [n for n in tensors if users.get(n) and all(u in rows for u in users[n])]
    out = _summary("onnx", tensors, None, False, "")
    out["bytes_per_token"] -= sum(tensors[n][0] - tensors[n][0] // max(tensors[n][1], 1) for n in lookups)
    # a float16 table that the graph casts to float32 (the head; onnxruntime folds the Cast at load) is read as float32
    half = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}
    cast = [n for n in half if any(u[0] in ("Cast", "Slice") for u in users.get(n, []))]
    out["bytes_per_token"] += sum(tensors[n][0] for n in cast)
    out["tied"] = not any(gathers & set(users[n]) for n in lookups)
    bits = {a.i for node in graph.node if node.op_type == "MatMulNBits" for a in node.attribute if a.name == "bits"}
    out["quant"] = f"MatMulNBits w{'/'.join(map(str, sorted(bits)))}" if bits else "float"
    return out
