"""BLIP_VQA's topology (decoder.context="question"): the answer decoder's question mask, answer ranking and
greedy answers against naive loops, the conversion from a pretrained model, and the config errors."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from helpers import write_vocab

from dlip_ds.config import ConfigError, model_config_from_dict
from dlip_ds.models import vqa as vqa_mod
from dlip_ds.models.vqa import to_vqa_model

pytestmark = pytest.mark.usefixtures("one_thread")

VQA = {"decoder": {"share": False, "context": "question"}}
BOS, SEP = 1, 2  # test-tiny's [DEC] and [SEP]


@pytest.fixture
def vqa_model(tiny_model):
    """A tiny VQA model; vision (48) and text (32) widths differ, so the answer decoder's cross-attention
    must read question states (text width) and nothing passes with image-width keys."""
    def build(seed=0, **over):
        m = tiny_model(seed=seed, vision={"width": 48, "heads": 2}, **VQA, **over)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # random weights everywhere (LayerNorms too); [SEP] likelier, so answers end apart
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            m.lm_head.bias[SEP] += 1.0
        return m
    return build


def questions(b=3, n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    px = torch.randn(b, 3, 32, 32, generator=g)
    ids = torch.randint(5, 120, (b, n), generator=g)
    ids[:, 0] = 4  # stands for [ENC]
    mask = torch.ones(b, n, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return px, ids, mask  # padded positions keep random ids: attending to them would show


def question_states(m, px, ids, mask):
    return m.fuse(m.encode_image(px).embeds, ids, mask).hidden


# --------------------------------------------------------------------------- the question mask


def test_answer_decoder_ignores_question_padding(vqa_model):
    m = vqa_model()
    px, ids, mask = questions()
    ans = torch.tensor([[BOS, 9, 10, SEP]] * 3)
    with torch.no_grad():
        q = question_states(m, px, ids, mask)
        batched = m.decode(q, ans, torch.ones_like(ans), context_mask=mask).hidden
        unmasked = m.decode(q, ans, torch.ones_like(ans)).hidden
        for b in range(3):
            n = int(mask[b].sum())
            alone_q = question_states(m, px[b:b + 1], ids[b:b + 1, :n], mask[b:b + 1, :n])
            alone = m.decode(alone_q, ans[b:b + 1], torch.ones_like(ans[b:b + 1])).hidden
            assert torch.allclose(batched[b:b + 1], alone, atol=1e-5), b
    assert not torch.allclose(unmasked[2], batched[2], atol=1e-3)  # without the mask the padding is read


def test_question_decoder_reads_text_width(vqa_model):
    m = vqa_model()
    assert m.decoder.stack.layers[0].cross_attn.key.in_features == m.cfg.text.width == 32
    px, ids, mask = questions()
    with pytest.raises(ValueError, match="context of width 48, expected 32"):
        m.decode(m.encode_image(px).embeds, ids, mask)


# --------------------------------------------------------------------------- ranking and generation, naive


def answer_set():
    """Answers of 1-3 tokens, [DEC] first, [SEP] last, right-padded; several share their first token."""
    rows = [[9], [12], [17], [20], [9, 11], [13, 14], [9, 16], [17, 11], [21, 22, 23]]
    la = max(map(len, rows)) + 2
    ids = torch.zeros(len(rows), la, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r) + 2] = torch.tensor([BOS, *r, SEP])
        mask[i, :len(r) + 2] = 1
    return rows, ids, mask


def naive_score(m, q, qmask, answer, smoothing) -> float:
    """One question (unpadded) and one answer (unpadded), token by token in float64."""
    qb = q[None, :int(qmask.sum())]
    seq = torch.tensor([[BOS, *answer, SEP]])
    logp = m.lm_logits_from_hidden(m.decode(qb, seq, torch.ones_like(seq)).hidden)[0].double().log_softmax(-1)
    total = 0.0
    for t in range(seq.shape[1] - 1):
        total += (1 - smoothing) * float(logp[t, int(seq[0, t + 1])]) + smoothing * float(logp[t].mean())
    return total


def naive_rank(m, q, qmask, rows, k, smoothing):
    """Per question: the top-k answers by first-token probability after [DEC], then the best whole score."""
    best = []
    for b in range(q.shape[0]):
        start = torch.tensor([[BOS]])
        first = m.lm_logits_from_hidden(m.decode(q[b:b + 1, :int(qmask[b].sum())], start, None).hidden)[0, 0]
        p_first = first.double().softmax(-1)[[r[0] for r in rows]]
        scores = {j: naive_score(m, q[b], qmask[b], rows[j], smoothing)
                  for j in p_first.topk(min(k, len(rows))).indices.tolist()}
        ordered = sorted(scores.values(), reverse=True)
        assert len(ordered) < 2 or ordered[0] - ordered[1] > 1e-4  # no near-tie for float32 to flip
        best.append(max(scores, key=scores.get))
    return best


@pytest.fixture
def rank_model(vqa_model):
    """Answers that depend on the question: no output bias, a louder cross-attention."""
    m = vqa_model(seed=2)
    with torch.no_grad():
        m.lm_head.bias.zero_()
        for layer in m.decoder.stack.layers:
            layer.cross_attn.value.weight.mul_(4)
            layer.cross_attn.out.weight.mul_(4)
    return m


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_answer_scores_match_naive_loglikelihood(rank_model, smoothing):
    m = rank_model
    px, ids, mask = questions(b=3, seed=2)
    rows, a_ids, a_mask = answer_set()
    pick_q, pick_a = [0, 1, 2, 2, 1, 0], [0, 4, 8, 5, 7, 1]  # padded questions, answers of every length
    with torch.no_grad():
        q = question_states(m, px, ids, mask)
        got = vqa_mod.score_answers(m, q[pick_q], mask[pick_q], a_ids[pick_a], a_mask[pick_a], smoothing)
        want = [naive_score(m, q[b], mask[b], rows[j], smoothing) for b, j in zip(pick_q, pick_a)]
    assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-4)


@pytest.mark.parametrize("k,smoothing,rank_rows", [(9, 0.0, 256), (3, 0.0, 256), (2, 0.1, 256), (4, 0.0, 5)])
def test_rank_matches_naive(rank_model, monkeypatch, k, smoothing, rank_rows):
    monkeypatch.setattr(vqa_mod, "RANK_ROWS", rank_rows)  # 5: one question per decoder pass
    px, ids, mask = questions(b=4, seed=2)
    rows, a_ids, a_mask = answer_set()
    with torch.no_grad():
        got = rank_model.vqa_answer(px, ids, mask, answers=(a_ids, a_mask), k=k, smoothing=smoothing)
        want = naive_rank(rank_model, question_states(rank_model, px, ids, mask), mask, rows, k, smoothing)
    assert got == want
    assert len(set(got)) > 1  # the questions get different answers


def naive_greedy(m, q, qmask, max_length, min_length):
    out = []
    for b in range(q.shape[0]):
        n = int(qmask[b].sum())
        seq = [BOS]
        while len(seq) < max_length:
            t = torch.tensor([seq])
            logits = m.lm_logits_from_hidden(m.decode(q[b:b + 1, :n], t, torch.ones_like(t)).hidden)[0, -1]
            if len(seq) < min_length:
                logits[SEP] = -math.inf
            seq.append(int(logits.argmax()))
            if seq[-1] == SEP:
                break
        out.append([i for i in seq[1:] if i != SEP])
    return out


@pytest.mark.parametrize("min_length", [1, 4])
def test_greedy_answers_match_naive_argmax(vqa_model, min_length):
    m = vqa_model(seed=3)
    px, ids, mask = questions(b=4, seed=4)
    with torch.no_grad():
        got = m.vqa_answer(px, ids, mask, num_beams=1, max_length=8, min_length=min_length)
        want = naive_greedy(m, question_states(m, px, ids, mask), mask, 8, min_length)
    assert got == want
    assert len({len(a) for a in got}) > 1  # answers of several lengths


def test_text_answers_and_decoding(tiny_model, tmp_path):
    from dlip_ds.data.text import load_tokenizer

    tok = load_tokenizer(write_vocab(tmp_path, ["red", "blue", "square", "circle", "two", "yes", "no"]))
    bos, sep = tok.bos_token_id, tok.sep_token_id  # the config carries the tokenizer's ids: same answers either way
    m = tiny_model(seed=5, text={"bos_token_id": bos, "sep_token_id": sep}, **VQA)
    with torch.no_grad():
        m.lm_head.bias[sep] += 2.0
    px, ids, mask = questions(seed=6)
    answers = ["red", "blue square", "two", "yes", "no", "red circle"]
    enc = tok(answers, padding="longest", return_tensors="pt")
    enc.input_ids[:, 0] = bos
    with torch.no_grad():
        idx = m.vqa_answer(px, ids, mask, answers=(enc.input_ids, enc.attention_mask))
        text = m.vqa_answer(px, ids, mask, answers=answers, tokenizer=tok)
        gen_ids = m.vqa_answer(px, ids, mask, num_beams=1)
        gen_text = m.vqa_answer(px, ids, mask, num_beams=1, tokenizer=tok)
    assert all(isinstance(i, int) for i in idx) and text == [answers[i] for i in idx]
    assert all(sep not in g and bos not in g for g in gen_ids)
    assert gen_text == [tok.decode(g, skip_special_tokens=True) for g in gen_ids]


# --------------------------------------------------------------------------- conversion from a pretrained model


def test_to_vqa_model_materialises_the_shared_decoder(tiny_model):
    src = tiny_model(seed=7, momentum=True)  # share=True, widths 32 and 32
    with torch.no_grad():
        for p in src.parameters():  # LayerNorms too, so that nothing matches by its default value
            p.add_(torch.randn_like(p) * 0.05)
    dst = to_vqa_model(src)
    assert dst.cfg.decoder.context == "question" and not dst.cfg.decoder.share and not dst.cfg.momentum
    assert not hasattr(dst, "momentum")
    eq = lambda a, b: all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    stack = dst.decoder.stack
    assert eq(stack.embeddings, src.text.embeddings)
    for i, layer in enumerate(stack.layers):
        assert eq(layer.self_attn, src.decoder.self_attn[i])
        assert eq(layer.cross_attn, src.text.layers[i].cross_attn) and eq(layer.mlp, src.text.layers[i].mlp)
    for name in ("vision", "text", "lm_head", "itc", "itm_head"):
        assert eq(getattr(dst, name), getattr(src, name)), name
    # the same decoder: fed the image (its width is the text's here) it decodes as the source does
    px, ids, mask = questions()
    with torch.no_grad():
        img = src.encode_image(px).embeds
        assert torch.allclose(dst.decode(img, ids, mask).hidden, src.decode(img, ids, mask).hidden, atol=1e-6)
    again = to_vqa_model(dst)
    assert again is not dst and eq(again, dst)


def test_to_vqa_model_albef_and_other_widths(tiny_model, caplog):
    src = tiny_model(seed=8, fusion={"mode": "albef", "layers": 1})  # decoder: 2 text layers + 1 fusion layer
    dst = to_vqa_model(src)
    px, ids, mask = questions()
    with torch.no_grad():
        img = src.encode_image(px).embeds
        assert torch.allclose(dst.decode(img, ids, mask).hidden, src.decode(img, ids, mask).hidden, atol=1e-6)

    src = tiny_model(seed=9, vision={"width": 48, "heads": 2})
    with caplog.at_level(logging.WARNING, logger="dlip_ds.models.vqa"):
        dst = to_vqa_model(src)
    assert "vision.width=48 != text.width=32" in caplog.text and "cross_attn.{key,value}" in caplog.text
    layer, ref = dst.decoder.stack.layers[1], src.text.layers[1]
    assert layer.cross_attn.key.weight.shape == (32, 32)
    assert torch.equal(layer.cross_attn.query.weight, ref.cross_attn.query.weight)
    assert torch.equal(layer.mlp.fc1.weight, ref.mlp.fc1.weight)


def test_our_format_keeps_the_topology(vqa_model, tmp_path):
    import dlip_ds
    from dlip_ds.models.dlip_format import save_model

    m = vqa_model(seed=10)
    save_model(m, tmp_path)
    back = dlip_ds.load_model(tmp_path)
    assert back.cfg.decoder.context == "question"
    px, ids, mask = questions()
    with torch.no_grad():
        assert back.vqa_answer(px, ids, mask, num_beams=3) == m.vqa_answer(px, ids, mask, num_beams=3)


# --------------------------------------------------------------------------- errors


def test_config_errors(tiny_model, vqa_model):
    with pytest.raises(ConfigError, match="decoder.share=false"):
        tiny_model(decoder={"share": True, "context": "question"})
    with pytest.raises(ConfigError, match="fusion.layers > 0"):
        tiny_model(fusion={"layers": 0}, **VQA)
    with pytest.raises(ConfigError, match="decoder.context"):
        model_config_from_dict({"decoder": {"context": "answer"}})
    with pytest.raises(ConfigError, match="has none"):
        to_vqa_model(tiny_model(decoder={"enabled": False}))
    px, ids, mask = questions()
    with pytest.raises(ConfigError, match="to_vqa_model"):
        tiny_model().vqa_answer(px, ids, mask)
    m = vqa_model()
    with pytest.raises(ConfigError, match="use vqa_answer"):
        m.generate(px, prompt="")
    with pytest.raises(ConfigError, match="use vqa_answer"):
        m.lm_logits(px, ids, mask)
    with pytest.raises(ValueError, match="need a tokenizer"):
        m.vqa_answer(px, ids, mask, answers=["yes", "no"])
    _, a_ids, a_mask = answer_set()
    with pytest.raises(ValueError, match=r"must start with \[DEC\]"):
        m.vqa_answer(px, ids, mask, answers=(a_ids[:, 1:], a_mask[:, 1:]))
    with pytest.raises(ValueError, match="num_beams must be >= 1"):
        m.vqa_answer(px, ids, mask, num_beams=0)
