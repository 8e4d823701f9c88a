"""llama.cpp through llama-cpp-python: the runtime LLMFarm and llama-bench use on the phone."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..memory import release
from . import check_ids

GGML_LOG_LEVEL_ERROR = 4  # ggml.h's enum (NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5); llama-cpp-python's
# own log callback still maps the older enum (ERROR 3), so llama.cpp's warnings reached stderr with verbose=False
_errors: list[str] = []  # llama.cpp's recent error lines, for the one-line message when a load fails
_log_callback = None  # kept referenced: llama.cpp calls it for as long as the process lives


def _quiet_llama_log() -> None:
    """Route llama.cpp's log away from the terminal; error lines are kept for our own one-line message."""
    global _log_callback
    if _log_callback is not None:
        return
    import ctypes

    import llama_cpp

    @llama_cpp.llama_log_callback
    def callback(level, text, user_data):
        if level == GGML_LOG_LEVEL_ERROR:
            _errors.append(text.decode("utf-8", "replace").strip())
            del _errors[:-4]

    _log_callback = callback
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


class LlamaCppRunner:
    name = "llama.cpp"

    def __init__(self, path: Path, threads: int | None = None, n_ctx: int = 2048, n_batch: int = 512):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise UserError("the llama.cpp runtime needs llama-cpp-python (pip install llama-cpp-python)") from None
        if not Path(path).is_file():
            raise UserError(f"{path}: no such GGUF file")
        self.threads = threads or os.cpu_count() or 1
        _quiet_llama_log()
        _errors.clear()
        try:
            self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_batch, n_ctx), n_threads=self.threads,
                             n_threads_batch=self.threads, logits_all=True, verbose=False)
        except (ValueError, RuntimeError) as e:
            why = "; ".join([str(e).splitlines()[0]] + [x for x in _errors if x][-2:])
            raise UserError(f"{path}: llama.cpp cannot load this file ({why[:240]})") from None
        self.vocab_size = self.llm.n_vocab()
        self.n_ctx = n_ctx

    def _eval(self, ids) -> None:
        ids = check_ids(ids, self.vocab_size, "the GGUF")  # llama.cpp aborts the process on an unknown id
        if len(ids) > self.n_ctx:
            raise UserError(f"{len(ids)} tokens exceed the llama.cpp context of {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(ids)

    def logits(self, ids) -> np.ndarray:
        self._eval(ids)
        return np.array(self.llm.scores[:len(ids)], dtype=np.float32)

    def generate(self, ids, n_new: int) -> list[int]:
        self._eval(ids)
        out = []
        for _ in range(n_new):
            nxt = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(nxt)
            self.llm.eval([nxt])
        return out

    def close(self) -> None:
        """Free the model and context now rather than when the runner is dropped."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            getattr(llm, "close", lambda: None)()
            del llm
            release()

    def tokenize(self, text: str, bos: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=bos, special=False)
