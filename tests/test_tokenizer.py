import pytest
from sentencepiece import sentencepiece_model_pb2 as pb

from minicpm_edge.model import Tokenizer
from minicpm_edge.model.tokenizer import AI, USER

SAMPLES = ["Hello, world!", "你好，世界。今天天气很好。", "def f(x):\n    return x ** 2\n", "emoji 🚀🎉 and ☃",
           "two  spaces\n\nand newlines\tand tabs", "数字 12345 and 3.14159", "混合 mixed 文本 text"]


@pytest.fixture(scope="module")
def tok(bundled):
    return Tokenizer(bundled / "tokenizer.model")


def test_special_ids_and_chat_pieces(tok):
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    for piece in (USER, AI):
        assert tok.sp.PieceToId(piece) > 2 and tok.sp.IdToPiece(tok.sp.PieceToId(piece)) == piece
    ids = tok.chat_prompt("你好")
    assert ids[0] == 1
    assert tok.sp.PieceToId(USER) in ids and ids[-1] == tok.sp.PieceToId(AI)


def test_trained_like_llama(tok):
    """Identity normaliser, whitespace kept, dummy prefix, byte fallback: what llama.cpp reproduces."""
    m = pb.ModelProto()
    m.ParseFromString(tok.path.read_bytes())
    assert m.trainer_spec.model_type == pb.TrainerSpec.BPE
    assert m.trainer_spec.byte_fallback
    assert m.normalizer_spec.name == "identity"
    assert not m.normalizer_spec.remove_extra_whitespaces and m.normalizer_spec.add_dummy_prefix
    assert sum(p.type == pb.ModelProto.SentencePiece.BYTE for p in m.pieces) == 256


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_exact(tok, text):
    assert tok.decode(tok.encode(text, bos=False)) == text


def test_chinese_is_not_all_bytes(tok):
    ids = tok.encode("你好，世界。今天天气很好。", bos=False)
    pieces = [tok.sp.IdToPiece(i) for i in ids]
    assert sum(not p.startswith("<0x") for p in pieces) >= len(pieces) // 2
