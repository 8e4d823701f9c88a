"""llama.cpp through llama-cpp-python: the runtime LLMFarm and llama-bench use on the phone."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..memory import release
from . import check_ids


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
        try:
            self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_threads=self.threads,
                             n_threads_batch=self.threads, logits_all=True, verbose=False)
        except (ValueError, RuntimeError) as e:
            raise UserError(f"{path}: llama.cpp cannot load this file ({str(e).splitlines()[0][:160]})") from None
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
