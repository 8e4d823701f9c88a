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


def hf_tokenizer(path: str | Path):
    """The SentencePiece BPE model as a Hugging Face `tokenizers.Tokenizer` (what tokenizer.json holds).

    The layout of Llama's "legacy" fast tokenizer: a dummy-prefix `▁` and spaces as `▁` (no other normalisation:
    the bundled and MiniCPM tokenizers use SentencePiece's identity normaliser), BPE with byte fallback, merges
    ranked by the score of the piece they make, control pieces as special tokens, user-defined pieces (`<用户>`,
    `<AI>`) as added tokens, BOS prepended. Plain text encodes exactly as SentencePiece does; like llama.cpp, text
    right after an added token gets its own dummy prefix.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, processors

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except Exception:  # protobuf's DecodeError and friends
        raise UserError(f"{path}: not a SentencePiece model") from None
    if proto.trainer_spec.model_type != pb.TrainerSpec.BPE:
        raise UserError(f"{path}: only a SentencePiece BPE model can be written as tokenizer.json here")
    Piece = pb.ModelProto.SentencePiece
    pieces = [p.piece for p in proto.pieces]
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = []
    for i, p in enumerate(proto.pieces):
        if p.type == Piece.NORMAL:
            for k in range(1, len(p.piece)):
                a, b = p.piece[:k], p.piece[k:]
                if a in vocab and b in vocab:
                    merges.append((-p.score, i, vocab[a], (a, b)))
    t = proto.trainer_spec
    tok = HFTokenizer(models.BPE(vocab, [m[-1] for m in sorted(merges)], unk_token=pieces[t.unk_id], fuse_unk=True,
                                 byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False) for p in proto.pieces
                            if p.type == Piece.CONTROL])
    tok.add_tokens([AddedToken(p.piece, normalized=False) for p in proto.pieces if p.type == Piece.USER_DEFINED])
    bos = pieces[t.bos_id]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, t.bos_id)])
    return tok
