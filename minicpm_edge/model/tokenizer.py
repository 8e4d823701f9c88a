"""Tokenizers: SentencePiece `tokenizer.model` (what MiniCPM ships) or a `tokenizer.json` (the `tokenizers` library),
and MiniCPM's chat format.

A tokenizer.json is one of two kinds (`json_kind`), which decide what every export writes:
- "spm": SentencePiece-derived (Llama style): BPE with byte fallback, spaces as `▁` (a Replace normaliser or a
  Metaspace pre-tokenizer), `<0xXX>` byte pieces. llama.cpp vocab type "llama"; MLC post-processing "byte_fallback".
- "bpe": byte-level BPE (GPT-2 style): a ByteLevel pre-tokenizer (possibly after a regex Split or Digits), merges, no
  unknown token. llama.cpp vocab type "gpt2" with its merges and a `tokenizer.ggml.pre` (`llama_cpp_pre`);
  MLC post-processing "byte_level".
"""

from __future__ import annotations

import json
from pathlib import Path

import sentencepiece as spm

from ..errors import UserError

USER, AI = "<用户>", "<AI>"
CHAT_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ '<用户>' + message['content'] }}"
                 "{% else %}{{ '<AI>' + message['content'] }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<AI>' }}{% endif %}")
TOKENIZER_NAMES = ("tokenizer.model", "tokenizer.json")  # in order of preference

# llama.cpp's BPE pre-tokenizer names (src/llama-vocab.cpp) and the tokenizer.json pre_tokenizer each reproduces.
# gpt-2 (GPT2): ByteLevel's built-in GPT-2 regex. SMOLLM (also STARCODER, REFACT, CODESHELL): single digits split first, then
# the GPT-2 regex. LLAMA3 and QWEN2: a Split with their own regex, ByteLevel without one (llama.cpp spells the
# case-insensitive contractions out; same matches).
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
             r"|\s+(?!\S)|\s+")


def _byte_level(regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": regex}


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


LLAMA_CPP_PRE = {
    "gpt-2": _byte_level(True),
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _byte_level(True)]},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [_split(_LLAMA3_RE), _byte_level(False)]},
    "qwen2": {"type": "Sequence", "pretokenizers": [_split(_QWEN2_RE), _byte_level(False)]},
}


def _canonical(pre) -> object:
    """A pre_tokenizer as compared here: offsets trimming (no effect on ids) dropped, one-element Sequences unwrapped."""
    if isinstance(pre, dict):
        if pre.get("type") == "Sequence" and len(pre.get("pretokenizers") or []) == 1:
            return _canonical(pre["pretokenizers"][0])
        return {k: _canonical(v) for k, v in pre.items() if k != "trim_offsets"}
    if isinstance(pre, list):
        return [_canonical(p) for p in pre]
    return pre


def llama_cpp_pre(tok_json: dict, where: str = "tokenizer.json") -> str:
    """The llama.cpp pre-tokenizer name whose regexes split text as this byte-level tokenizer.json does.

    llama.cpp's converter identifies a pre-tokenizer by hashing the ids of a fixed text (`get_vocab_base_pre`), which
    needs a table of hashes per published model; here the pre_tokenizer itself is compared with the ones llama.cpp
    implements, so any vocabulary with a known splitter is recognised and an unknown one is refused."""
    pre = _canonical(tok_json.get("pre_tokenizer"))
    for name, known in LLAMA_CPP_PRE.items():
        if pre == _canonical(known):
            return name
    raise UserError(f"{where}: its pre-tokenizer {json.dumps(tok_json.get('pre_tokenizer'))[:200]} matches none that "
                    f"llama.cpp implements here ({', '.join(LLAMA_CPP_PRE)}); llama.cpp would split text differently")


def _types(node) -> list[str]:
    """Every component type inside a normaliser / pre-tokenizer / decoder tree."""
    if isinstance(node, dict):
        return [node.get("type", "")] + [t for v in node.values() for t in _types(v)]
    if isinstance(node, list):
        return [t for v in node for t in _types(v)]
    return []


def json_kind(tok_json: dict, where: str = "tokenizer.json") -> str:
    """"spm" (SentencePiece-derived, byte fallback, `▁` for spaces) or "bpe" (byte-level BPE); others refused."""
    model = tok_json.get("model") if isinstance(tok_json, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else None
        raise UserError(f"{where}: a {kind or 'non-BPE'} tokenizer.json is not supported; supported: BPE with byte "
                        "fallback (SentencePiece-derived, Llama style) and byte-level BPE (GPT-2 style)")
    pre = _types(tok_json.get("pre_tokenizer"))
    if "ByteLevel" in pre:
        return "bpe"
    norm = tok_json.get("normalizer")
    metaspace = "Metaspace" in pre or "▁" in json.dumps(norm, ensure_ascii=False)
    if model.get("byte_fallback") and metaspace:
        return "spm"
    raise UserError(f"{where}: a BPE tokenizer.json that is neither byte-level (ByteLevel pre-tokenizer) nor "
                    "SentencePiece-derived (byte fallback with `▁` for spaces) is not supported")


def dummy_prefix(tok_json: dict) -> bool:
    """Whether a SentencePiece-derived tokenizer.json puts `▁` before the text (SentencePiece's add_dummy_prefix): a
    Prepend("▁") normaliser (Llama's legacy layout) or a Metaspace pre-tokenizer with prepend_scheme first/always."""
    text = json.dumps([tok_json.get("normalizer"), tok_json.get("pre_tokenizer")], ensure_ascii=False)
    return '"type": "Prepend", "prepend": "▁"' in text or '"prepend_scheme": "first"' in text \
        or '"prepend_scheme": "always"' in text or ('"Metaspace"' in text and '"add_prefix_space": true' in text)


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"{path}: not a readable JSON file ({str(e).splitlines()[0][:160]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def tokenizer_config(folder: Path) -> dict:
    """tokenizer_config.json beside the tokenizer ({} when absent)."""
    path = Path(folder) / "tokenizer_config.json"
    return read_json(path) if path.is_file() else {}


def _token_text(value) -> str | None:
    """A special-token entry of tokenizer_config.json: a string or an AddedToken dict ({"content": ...})."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A checkpoint's own tokenizer: `tokenizer.model` (SentencePiece) or `tokenizer.json` (`tokenizers`)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            found = [path / n for n in TOKENIZER_NAMES if (path / n).is_file()]
            if not found:
                raise UserError(f"{path}: no tokenizer.model or tokenizer.json")
            path = found[0]
        if not path.is_file():
            raise UserError(f"{path}: tokenizer not found")
        self.path = path
        self.sp = self.hf = None
        self.chat_template = None
        if path.suffix == ".json":
            self._load_json(path)
            return
        self.kind = "sentencepiece"
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise UserError(f"{path}: not a SentencePiece model ({str(e).splitlines()[0][:160]})") from None
        self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        self.add_bos = self.bos_id >= 0

    def _load_json(self, path: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        data = read_json(path)
        self.kind = json_kind(data, str(path))
        try:
            self.hf = HFTokenizer.from_str(json.dumps(data))
        except Exception as e:  # the tokenizers library raises plain Exceptions for malformed files
            raise UserError(f"{path}: the tokenizers library cannot read it ({str(e).splitlines()[0][:160]})") from None
        cfg = tokenizer_config(path.parent)
        ids = lambda key: self.hf.token_to_id(_token_text(cfg.get(key)) or "")  # noqa: E731
        post = data.get("post_processor") or {}
        template = [s for s in (post.get("single") or []) if isinstance(s, dict)] if post.get("type") == \
            "TemplateProcessing" else []
        lead = template[0].get("SpecialToken", {}).get("id") if template and "SpecialToken" in template[0] else None
        self.bos_id = ids("bos_token")
        if self.bos_id is None and lead is not None:
            self.bos_id = self.hf.token_to_id(lead)
        declared = cfg.get("add_bos_token")
        self.add_bos = self.bos_id is not None and (bool(declared) if declared is not None else lead is not None)
        self.eos_id = ids("eos_token")
        unk = data["model"].get("unk_token")
        self.unk_id = ids("unk_token") if cfg.get("unk_token") else (self.hf.token_to_id(unk) if unk else None)
        self.bos_id, self.eos_id, self.unk_id = (-1 if i is None else i for i in (self.bos_id, self.eos_id, self.unk_id))
        template = cfg.get("chat_template")
        self.chat_template = template if isinstance(template, str) else None
        self.config = cfg
        self.json = data

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize() if self.sp else self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Token ids of `text`; with `bos`, BOS first when this tokenizer adds one (SmolLM2's, say, does not)."""
        ids = self.sp.EncodeAsIds(text) if self.sp else self.hf.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if bos and self.add_bos else ids

    def piece(self, i: int) -> str | None:
        """The text of token i (None for a negative id)."""
        if i is None or i < 0:
            return None
        return self.sp.IdToPiece(i) if self.sp else self.hf.id_to_token(i)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        return self.sp.DecodeIds(ids) if self.sp else self.hf.decode(ids, skip_special_tokens=False)

    def chat_prompt(self, prompt: str) -> list[int]:
        """The prompt a chat model expects: its own chat template where it has one, else MiniCPM's
        BOS `<用户>{prompt}<AI>`."""
        if self.chat_template is None:
            return self.encode(f"{USER}{prompt}{AI}")
        import jinja2

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        special = {k: _token_text(self.config.get(k)) or "" for k in ("bos_token", "eos_token")}
        text = env.from_string(self.chat_template).render(messages=[{"role": "user", "content": prompt}],
                                                          add_generation_prompt=True, **special)
        return self.encode(text, bos=not text.startswith(special["bos_token"] or "\0"))

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
