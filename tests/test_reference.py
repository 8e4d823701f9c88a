"""The bundled reference model: trained, small, better than unigram, and what every command defaults to."""

import json
import math

import torch

from minicpm_edge import calib
from minicpm_edge.model import Checkpoint, Tokenizer, load_model
from minicpm_edge.reference import CONFIG, window_ppl


def test_bundled_model_shape_and_size(bundled):
    total = sum(p.stat().st_size for p in bundled.iterdir() if p.is_file())
    assert total <= 20 * 2**20
    ck = Checkpoint(bundled)
    c = ck.config
    assert c.arch == "minicpm" and c.tie_word_embeddings and not ck.has("lm_head.weight")
    assert c.num_key_value_heads < c.num_attention_heads  # GQA
    assert c.scale_emb == 12 and c.scale_depth == 1.4 and c.dim_model_base < c.hidden_size  # non-trivial muP
    assert ck.dtype("model.layers.0.mlp.up_proj.weight") == "BF16"
    assert json.loads((bundled / "config.json").read_text()) == json.loads(json.dumps(CONFIG))
    Tokenizer(ck.tokenizer_path).check_vocab(c.vocab_size)


def test_card_reports_training_and_beats_unigram(bundled):
    card = (bundled / "MODEL_CARD.md").read_text()
    info = json.loads((bundled / "training.json").read_text())
    assert (bundled / "loss.png").stat().st_size > 5000
    assert f"{info['heldout_ppl']:.2f}" in card and f"{info['unigram_ppl']:.2f}" in card
    assert info["heldout_ppl"] < 0.5 * info["unigram_ppl"]
    assert info["losses"][-1] < info["losses"][0] - 2


def test_heldout_ppl_recomputes(bundled):
    """The card's figure comes from the shipped weights: recompute it on the first windows."""
    info = json.loads((bundled / "training.json").read_text())
    tok = Tokenizer(bundled / "tokenizer.model")
    model = load_model(Checkpoint(bundled))
    ids = calib.token_stream(tok, calib.heldout_documents())[:2048]
    ppl, n = window_ppl(model, ids, info["seqlen"])
    assert n == 2047 and math.isfinite(ppl)
    assert ppl < 0.6 * info["unigram_ppl"]


def test_generates_chat_shaped_text(bundled):
    tok = Tokenizer(bundled / "tokenizer.model")
    model = load_model(Checkpoint(bundled))
    out = model.generate(tok.chat_prompt("你好，请介绍一下你自己。"), 24, tok.eos_id)
    assert len(out) > 0 and all(0 <= i < tok.vocab_size for i in out)
    with torch.no_grad():
        logits, _ = model(torch.tensor([tok.encode("def add(a, b):\n    return a +")]))
    assert torch.isfinite(logits).all()
