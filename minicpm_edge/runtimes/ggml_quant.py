"""llama.cpp's own tensor quantiser (libggml's ggml_quantize_chunk, through llama-cpp-python's shared libraries): the
peer our block grids are compared with, tensor by tensor, with or without an importance matrix."""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import numpy as np

from ..errors import UserError


def _lib():
    try:
        import llama_cpp
    except ImportError:
        raise UserError("llama.cpp's quantiser needs llama-cpp-python (pip install llama-cpp-python)") from None
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    f = lib.ggml_quantize_chunk
    f.restype = ctypes.c_size_t
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                  ctypes.c_void_p]
    return lib


def ggml_quantize(x: np.ndarray, qtype: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Rows of x [N, K] quantised by llama.cpp to `qtype` (e.g. "Q4_K"), uint8 [N, row bytes]; imatrix [K] is the
    per-column importance llama-imatrix would give (mean squared activation), or None."""
    t = gguf.GGMLQuantizationType[qtype]
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, k = x.shape
    block, nbytes = gguf.GGML_QUANT_SIZES[t]
    out = np.zeros((n, k // block * nbytes), dtype=np.uint8)
    im = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    size = _lib().ggml_quantize_chunk(int(t), x.ctypes.data, out.ctypes.data, 0, n, k,
                                      None if im is None else im.ctypes.data)
    if size != out.nbytes:
        raise AssertionError(f"ggml_quantize_chunk wrote {size} bytes, expected {out.nbytes}")
    return out
