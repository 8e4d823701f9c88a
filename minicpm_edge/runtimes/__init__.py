"""Runtimes that execute an artifact: our torch forward, llama.cpp (GGUF), onnxruntime (ONNX).

Every runner has the same small interface, used by `eval` and `bench`:
- `logits(ids) -> np.ndarray [T, vocab] float32`: a fresh pass over `ids` from position 0 (no state kept);
- `generate(ids, n_new) -> list[int]`: greedy decoding of n_new tokens after `ids`, with the runtime's KV cache;
- `name`, `threads`, `vocab_size`;
- `close()`: free the model now and return its memory to the OS (dropping the runner does the same).
`open_runner(path, runtime=None)` picks the runtime from the artifact: a GGUF file, an ONNX folder or a checkpoint directory.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError

RUNTIMES = ("torch", "llama.cpp", "onnxruntime")


def check_ids(ids, vocab_size: int, name: str) -> list[int]:
    """ids as a list of ints, refused when one lies outside the model's vocabulary (a tokenizer for another model)."""
    ids = [int(i) for i in ids]
    if not isinstance(vocab_size, int):  # a symbolic logits dimension: nothing to check against
        return ids
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise UserError(f"token id {bad} is outside {name}'s vocabulary of {vocab_size}; the tokenizer does not "
                        "match the model")
    return ids


def detect(path: Path) -> str:
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return "llama.cpp"
    if path.is_dir():
        if (path / "model.onnx").is_file():
            return "onnxruntime"
        if (path / "config.json").is_file():
            return "torch"
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "llama.cpp"
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    raise UserError(f"{path}: not a checkpoint directory, GGUF file or ONNX export folder")


def resolve(path: Path, runtime: str | None = None) -> tuple[Path, str]:
    """The artifact's path (a hub name resolved) and the runtime that runs it (`runtime`, or from the artifact)."""
    from ..model.hub import resolve_model

    path = resolve_model(path)
    runtime = runtime or detect(path)
    if runtime not in RUNTIMES:
        raise UserError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    return path, runtime


def open_runner(path: Path, runtime: str | None = None, threads: int | None = None, n_ctx: int = 2048):
    path, runtime = resolve(path, runtime)
    if runtime == "torch":
        from .torch import TorchRunner

        return TorchRunner(path, threads=threads)
    if runtime == "llama.cpp":
        from .llamacpp import LlamaCppRunner

        if path.is_dir():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) != 1:
                raise UserError(f"{path}: expected exactly one .gguf file, found {len(ggufs)}")
            path = ggufs[0]
        return LlamaCppRunner(path, threads=threads, n_ctx=n_ctx)
    from .onnxrt import OnnxRunner

    return OnnxRunner(path, threads=threads)
