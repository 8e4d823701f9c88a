"""Our own forward on a checkpoint directory (plain or GPTQ, dequantised to fp32)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..memory import release
from ..model import Checkpoint, load_model
from . import check_ids


class TorchRunner:
    name = "torch"

    def __init__(self, path: Path, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        with Checkpoint(path) as ckpt:
            self.config = ckpt.config
            self.model = load_model(ckpt)
        self.vocab_size = self.config.vocab_size

    @torch.no_grad()
    def logits(self, ids) -> np.ndarray:
        out, _ = self.model(torch.tensor([check_ids(ids, self.vocab_size, "the model")], dtype=torch.long))
        return out[0].float().numpy()

    def generate(self, ids, n_new: int) -> list[int]:
        return self.model.generate(check_ids(ids, self.vocab_size, "the model"), n_new)

    def close(self) -> None:
        """Free the model's weights now and return their memory to the OS (also done when the runner is dropped)."""
        if self.__dict__.pop("model", None) is not None:
            release(collect=False)

    def __del__(self):
        try:
            self.close()
        except Exception:  # at interpreter exit the modules it needs may be gone; the OS reclaims the memory anyway
            pass
