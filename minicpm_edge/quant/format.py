"""The quantised checkpoint: the hand-off between the quantiser and every exporter.

`QuantizedLinear` is the in-memory record of a GPTQ v1 checkpoint (codes, scales, true zero points, g_idx, grid);
`to_gptq` / `from_gptq` map it to and from the AutoGPTQ / GPTQModel / transformers tensors (FORMATS.md section 1), so
checkpoints made by other tools load into the same representation.

`GGMLLinear` is the record of a `--format q4_k_m / q3_k_m` checkpoint (quant_method "ggml"): llama.cpp's two-level
scales have no GPTQ v1 form, so each Linear is stored as the GGML blocks llama.cpp reads (`<prefix>.ggml`, uint8
[N, row bytes], kquant.pack), its type named in quantization_config.tensor_types. The GGUF export copies the bytes;
targets that cannot hold them refuse (`require_gptq`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from .grid import QuantSpec, make_g_idx, pack_qweight, pack_qzeros, unpack_qweight, unpack_qzeros
from .kquant import MIXES, TYPES, dequantize_blocks, pack

SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
QUANTIZER = "minicpm-edge"


@dataclass
class QuantizedLinear:
    codes: torch.Tensor  # uint8 [N, K]
    scales: torch.Tensor  # float16 [groups, N]
    zeros: torch.Tensor  # int32 [groups, N], true zero points
    g_idx: torch.Tensor  # int32 [K], group of each input column
    bits: int
    group_size: int  # -1: per channel
    sym: bool

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.sym)

    @property
    def contiguous(self) -> bool:
        """Groups are runs of `group_size` consecutive input columns (no runtime act-order permutation)."""
        return torch.equal(self.g_idx.to(torch.int32), make_g_idx(self.shape[1], self.spec))

    def per_block(self, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scales, zeros), each [K/block, N]: one row per run of `block` input columns, each group's parameters
        repeated over its runs. Exact for contiguous groups of a multiple of `block` columns (or one per channel),
        which is how group 64 / 128 / -1 checkpoints map onto formats with fixed blocks of 32."""
        k = self.shape[1]
        glen = self.spec.group_len(k)
        if not self.contiguous or glen % block or k % block:
            raise ValueError(f"groups of {glen} columns (contiguous: {self.contiguous}) are no whole runs of {block}")
        reps = glen // block
        return self.scales.repeat_interleave(reps, 0), self.zeros.repeat_interleave(reps, 0)

    def dequantize(self) -> torch.Tensor:
        g = self.g_idx.long()
        return self.scales.float()[g].t() * (self.codes.float() - self.zeros.float()[g].t())

    @classmethod
    def from_result(cls, r, spec: QuantSpec) -> "QuantizedLinear":
        return cls(r.codes, r.scales.half(), r.zeros, r.g_idx, spec.bits, spec.group_size, spec.sym)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The checkpoint tensors of this Linear, by suffix."""
        return self.to_gptq()

    def to_gptq(self) -> dict[str, torch.Tensor]:
        return {"qweight": pack_qweight(self.codes, self.bits), "qzeros": pack_qzeros(self.zeros, self.bits),
                "scales": self.scales.half().contiguous(), "g_idx": self.g_idx.to(torch.int32).contiguous()}

    @classmethod
    def from_gptq(cls, t: dict[str, torch.Tensor], bits: int, group_size: int, sym: bool, v2: bool = False,
                  name: str = "") -> "QuantizedLinear":
        qweight, qzeros, scales = t["qweight"], t["qzeros"], t["scales"]
        for key in ("qweight", "qzeros", "g_idx"):
            if key in t and (t[key].is_floating_point() or t[key].is_complex() or t[key].dtype == torch.bool):
                raise UserError(f"{name}: {key} is {str(t[key].dtype).replace('torch.', '')}; GPTQ stores it as int32")
        if qweight.dim() != 2 or qzeros.dim() != 2 or scales.dim() != 2:
            raise UserError(f"{name}: qweight, qzeros and scales must be matrices (got {qweight.dim()}, "
                            f"{qzeros.dim()} and {scales.dim()} dimensions)")
        k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
        g_idx = t.get("g_idx")
        if g_idx is None:
            g_idx = make_g_idx(k, QuantSpec(bits, group_size, sym))
        groups = scales.shape[0]
        if scales.shape[1] != n or qzeros.shape != (groups, n * bits // 32) or g_idx.shape != (k,):
            raise UserError(f"{name}: inconsistent GPTQ tensor shapes (qweight {list(qweight.shape)}, "
                            f"qzeros {list(qzeros.shape)}, scales {list(scales.shape)}, g_idx {list(g_idx.shape)})")
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
            raise UserError(f"{name}: g_idx refers to groups outside 0..{groups - 1}")
        zeros = unpack_qzeros(qzeros, bits, n)
        if v2:  # GPTQModel's internal format stores the true zero
            zeros = (zeros - 1) & ((1 << bits) - 1)
        return cls(unpack_qweight(qweight, bits, k), scales.half(), zeros, g_idx.to(torch.int32), bits, group_size, sym)


@dataclass
class GGMLLinear:
    """One Linear as llama.cpp blocks of type `type` (kquant.TYPES): uint8 [N, K / block * bytes per block]."""

    type: str
    blocks: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        t = TYPES[self.type]
        return self.blocks.shape[0], self.blocks.shape[1] // t.nbytes * t.block

    def dequantize(self) -> torch.Tensor:
        return dequantize_blocks(self.blocks, self.type, self.shape[1])

    @classmethod
    def from_result(cls, r) -> "GGMLLinear":
        return cls(r.grid.type.name, torch.from_numpy(pack(r.grid, r.codes)))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {GGML_SUFFIX: self.blocks.contiguous()}

    @classmethod
    def read(cls, t: torch.Tensor, qtype: str, k: int, name: str = "") -> "GGMLLinear":
        bt = TYPES[qtype]
        if t.dtype != torch.uint8 or t.dim() != 2 or k % bt.block or t.shape[1] != k // bt.block * bt.nbytes:
            raise UserError(f"{name}.{GGML_SUFFIX}: expected uint8 [N, {k // bt.block * bt.nbytes}] ({qtype} blocks of "
                            f"{k} inputs), got {str(t.dtype).replace('torch.', '')} {list(t.shape)}")
        return cls(qtype, t)


GGML_SUFFIX = "ggml"


def require_gptq(quant: dict | None, where, target: str) -> None:
    """Refuse, with the reason, a GGML-block checkpoint for a target that stores GPTQ v1 groups only."""
    if quant and quant["kind"] == "ggml":
        raise UserError(f"{where}: a {quant['format']} checkpoint holds llama.cpp's two-level block scales, which "
                        f"{target} cannot store exactly; export it with --target ios (GGUF), or quantise with --format "
                        "q4_0 (or the default GPTQ w4 g32) for this target")


def parse_quant_config(cfg: dict, source: str) -> dict:
    """Normalise a GPTQ quantization_config / quantize_config.json (or the "ggml" one of a --format q4_k_m record)."""
    method = cfg.get("quant_method", "gptq")
    if method == "ggml":
        return _parse_ggml_config(cfg, source)
    if method != "gptq":
        raise UserError(f"{source}: quant_method {method!r} is not supported; only GPTQ checkpoints are")
    fmt = cfg.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise UserError(f"{source}: checkpoint_format {fmt!r} is not supported (gptq or gptq_v2)")
    if "bits" not in cfg:
        raise UserError(f"{source}: quantization config lacks 'bits'")
    values = {"bits": cfg["bits"], "group_size": cfg.get("group_size", -1)}
    for key, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v).is_integer():
            raise UserError(f"{source}: quantization config {key} must be a whole number, got {v!r}")
    sym = cfg.get("sym", True)
    if not isinstance(sym, bool):
        raise UserError(f"{source}: quantization config sym must be true or false, got {sym!r}")
    spec = QuantSpec(int(values["bits"]), int(values["group_size"]), sym)
    return {"kind": "gptq", "spec": spec, "v2": fmt == "gptq_v2", "desc_act": bool(cfg.get("desc_act", False)),
            "raw": cfg}


def _parse_ggml_config(cfg: dict, source: str) -> dict:
    fmt, types = cfg.get("format"), cfg.get("tensor_types")
    if fmt not in MIXES:
        raise UserError(f"{source}: ggml format {fmt!r} is not supported ({', '.join(MIXES)})")
    if not isinstance(types, dict) or not all(isinstance(v, str) and v in TYPES for v in types.values()):
        raise UserError(f"{source}: tensor_types must map each Linear to one of {', '.join(TYPES)}")
    return {"kind": "ggml", "format": fmt, "types": types, "spec": None, "v2": False,
            "desc_act": bool(cfg.get("desc_act", False)), "raw": cfg}


def ggml_quantization_config(fmt: str, types: dict[str, str], damp: float, method: str, act_order: bool) -> dict:
    from .. import __version__
    return {"quant_method": "ggml", "format": fmt, "tensor_types": types, "desc_act": act_order, "damp_percent": damp,
            "static_groups": True, "true_sequential": True,
            "meta": {"quantizer": [f"{QUANTIZER}:{__version__}"], "method": method}}


def quantization_config(spec: QuantSpec, damp: float, method: str, act_order: bool, static_groups: bool,
                        true_sequential: bool = True, group_aware: bool = False) -> dict:
    from .. import __version__
    return {"quant_method": "gptq", "bits": spec.bits, "group_size": spec.group_size, "desc_act": act_order,
            "sym": spec.sym, "damp_percent": damp, "static_groups": static_groups, "act_group_aware": group_aware,
            "true_sequential": true_sequential, "checkpoint_format": "gptq",
            "meta": {"quantizer": [f"{QUANTIZER}:{__version__}"], "method": method}}


def read_quant_config(model_dir: Path, config: dict) -> dict | None:
    """The checkpoint's GPTQ settings, from config.json or quantize_config.json; None for a plain checkpoint."""
    if isinstance(config.get("quantization_config"), dict):
        return parse_quant_config(config["quantization_config"], f"{model_dir}/config.json")
    path = Path(model_dir) / "quantize_config.json"
    if path.is_file():
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise UserError(f"{path}: not valid JSON ({str(e)[:160]})") from None
        if not isinstance(cfg, dict):
            raise UserError(f"{path}: expected a JSON object")
        return parse_quant_config(cfg, str(path))
    return None
