"""Our own forward on a checkpoint directory (plain or GPTQ, dequantised to fp32)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..model import Checkpoint, load_model


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
        out, _ = self.model(torch.tensor([list(ids)], dtype=torch.long))
        return out[0].float().numpy()

    def generate(self, ids, n_new: int) -> list[int]:
        return self.model.generate(list(ids), n_new)
