"""Give freed memory back to the operating system after a model is released.

glibc's malloc keeps freed blocks in its arenas for reuse, so a process that loaded and dropped a model would still
be as big, to the OS and to anything measuring it, as with the model loaded. `release()` returns them (malloc_trim);
it is a no-op where the C library has no malloc_trim (macOS, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from functools import lru_cache


@lru_cache(maxsize=1)
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release(collect: bool = True) -> None:
    """Collect garbage (unless `collect` is False, e.g. inside a finaliser), then return free heap memory to the OS."""
    if collect:
        gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
