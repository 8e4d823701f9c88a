"""SentencePiece tokenizer (what MiniCPM ships) and MiniCPM's chat format."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from ..errors import UserError

USER, AI = "<用户>", "<AI>"
CHAT_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ '<用户>' + message['content'] }}"
                 "{% else %}{{ '<AI>' + message['content'] }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<AI>' }}{% endif %}")


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: tokenizer.model not found")
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise UserError(f"{path}: not a SentencePiece model ({str(e).splitlines()[0][:160]})") from None
        self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.sp.EncodeAsIds(text)
        return [self.bos_id, *ids] if bos and self.bos_id >= 0 else ids

    def decode(self, ids) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])

    def chat_prompt(self, prompt: str) -> list[int]:
        """BOS, then `<用户>{prompt}<AI>`: the prompt MiniCPM's chat models expect."""
        return self.encode(f"{USER}{prompt}{AI}")

    def render_messages(self, messages: list[dict]) -> str:
        parts = []
        for m in messages:
            parts.append((USER if m["role"] == "user" else AI) + m["content"])
        return "".join(parts)

    def check_vocab(self, vocab_size: int) -> None:
        if self.vocab_size > vocab_size:
            raise UserError(f"{self.path}: tokenizer has {self.vocab_size} pieces but the model's vocab_size is {vocab_size}")
