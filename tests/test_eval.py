"""Evaluation: recall against hand-computed and naive references, captioning metrics against pycocoevalcap."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch

from dlip_ds.eval import captioning
from dlip_ds.eval.retrieval import recall_at_k

# ----------------------------------------------------------------------------- recall


IMG2TXT = [[0, 1], [2], [3, 4]]
TXT2IMG = [0, 0, 1, 2, 2]


def test_recall_hand_computed():
    scores = torch.tensor([
        # texts: 0     1     2     3     4
        [0.1, 0.9, 0.8, 0.2, 0.3],  # image 0: its caption 1 is first          -> rank 0
        [0.5, 0.4, 0.3, 0.9, 0.8],  # image 1: caption 2 behind 0, 1, 3, 4     -> rank 4
        [0.9, 0.1, 0.2, 0.3, 0.4],  # image 2: best own caption (4) behind 0    -> rank 1
    ])
    # text -> image, column by column: t0 -> [0.1, .5, .9] rank 2; t1 -> rank 0; t2 -> [.8, .3, .2] rank 1;
    # t3 -> [.2, .9, .3] rank 1; t4 -> [.3, .8, .4] rank 1
    m = recall_at_k(scores, IMG2TXT, TXT2IMG)
    assert m["txt_r1"] == pytest.approx(100 / 3)
    assert m["txt_r5"] == pytest.approx(100.0) and m["txt_r10"] == pytest.approx(100.0)
    assert m["img_r1"] == pytest.approx(20.0)
    assert m["img_r5"] == pytest.approx(100.0)
    assert m["txt_r_mean"] == pytest.approx((100 / 3 + 200) / 3)
    assert m["r_mean"] == pytest.approx((m["txt_r_mean"] + m["img_r_mean"]) / 2)


def test_recall_uses_separate_t2i_matrix():
    i2t = torch.eye(3)
    t2i = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # texts 0 and 1 swapped
    m = recall_at_k(i2t, [[0], [1], [2]], [0, 1, 2], t2i)
    assert m["txt_r1"] == pytest.approx(100.0)
    assert m["img_r1"] == pytest.approx(100 / 3)


def test_recall_ties_count_against_the_model():
    m = recall_at_k(torch.zeros(3, 5), IMG2TXT, TXT2IMG)
    # image 0 ties with 3 other texts -> rank 3; images 1, 2 rank 4 and 3; every text ties 2 others -> rank 2
    assert m["txt_r1"] == 0.0 and m["txt_r5"] == pytest.approx(100.0)
    assert m["img_r1"] == 0.0 and m["img_r5"] == pytest.approx(100.0)


def _blip_itm_eval(scores_i2t, scores_t2i, txt2img, img2txt):
    """A direct transcription of the ranking in BLIP's `itm_eval` (argsort), the reference."""
    out = {}
    ranks = []
    for i, row in enumerate(scores_i2t):
        inds = np.argsort(row)[::-1]
        ranks.append(min(np.where(inds == t)[0][0] for t in img2txt[i]))
    ranks = np.array(ranks)
    for k in (1, 5, 10):
        out[f"txt_r{k}"] = 100.0 * (ranks < k).mean()
    ranks = np.array([np.where(np.argsort(row)[::-1] == txt2img[t])[0][0] for t, row in enumerate(scores_t2i)])
    for k in (1, 5, 10):
        out[f"img_r{k}"] = 100.0 * (ranks < k).mean()
    return out


def test_recall_matches_blip_reference_on_random_scores():
    g = torch.Generator().manual_seed(0)
    n_img, per = 40, 3
    txt2img = [i for i in range(n_img) for _ in range(per)]
    img2txt = [list(range(i * per, (i + 1) * per)) for i in range(n_img)]
    i2t = torch.randn(n_img, n_img * per, generator=g) + 2.0 * torch.tensor(
        [[float(txt2img[t] == i) for t in range(n_img * per)] for i in range(n_img)])
    t2i = i2t.t() + 0.5 * torch.randn(n_img * per, n_img, generator=g)
    ref = _blip_itm_eval(i2t.numpy(), t2i.numpy(), txt2img, img2txt)
    got = recall_at_k(i2t, img2txt, txt2img, t2i)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value), key
    assert 0 < got["txt_r1"] < 100 and 0 < got["img_r1"] < 100  # a non-degenerate check


def test_recall_rejects_inconsistent_ground_truth():
    with pytest.raises(ValueError, match="img2txt has 2 images"):
        recall_at_k(torch.zeros(3, 5), IMG2TXT[:2], TXT2IMG)
    with pytest.raises(ValueError, match="disagree"):
        recall_at_k(torch.zeros(3, 5), IMG2TXT, [0, 1, 1, 2, 2])


# ----------------------------------------------------------------------------- captioning metrics

PREDICTIONS = {
    0: "a man riding a horse on a beach.",
    1: "two dogs play with a red ball",
    2: "A plate of food, with broccoli!",
}
REFERENCES = {
    0: ["A man rides a horse along the beach.", "a person on a horse near the sea", "man riding horse"],
    1: ["Two dogs playing with a ball.", "two puppies chase a red ball on grass"],
    2: ["a plate with broccoli and rice", "food on a white plate, with vegetables", "a dish of broccoli"],
}


def _pycocoevalcap_direct(gts, res, meteor: bool):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    out = {f"bleu{i + 1}": 100 * b for i, b in enumerate(Bleu(4).compute_score(gts, res, verbose=0)[0])}
    out["rouge_l"] = 100 * Rouge().compute_score(gts, res)[0]
    out["cider"] = 100 * Cider().compute_score(gts, res)[0]
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        out["meteor"] = 100 * Meteor().compute_score(gts, res)[0]
    return out


@pytest.mark.skipif(shutil.which("java") is None, reason="needs java for the PTB tokenizer and METEOR")
def test_caption_metrics_equal_pycocoevalcap_with_java():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in REFERENCES.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in PREDICTIONS.items()})
    ref = _pycocoevalcap_direct(gts, res, meteor=True)
    got = captioning.caption_metrics(PREDICTIONS, REFERENCES)
    assert set(got) == set(ref)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value), key
    assert 0 < got["cider"] and 0 < got["meteor"] < 100


def test_caption_metrics_without_java(monkeypatch, caplog):
    _no_java(monkeypatch)
    assert not captioning.java_available()
    gts = captioning.simple_tokenize(REFERENCES)
    res = captioning.simple_tokenize({k: [v] for k, v in PREDICTIONS.items()})
    assert res[2] == ["a plate of food with broccoli"]
    ref = _pycocoevalcap_direct(gts, res, meteor=False)
    with caplog.at_level(logging.WARNING):
        got = captioning.caption_metrics(PREDICTIONS, REFERENCES)
    assert "java not found" in caplog.text and "METEOR" in caplog.text
    assert "meteor" not in got
    assert set(got) == set(ref)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value), key


def _no_java(monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **kw: None if name == "java" else real_which(name, *a, **kw))


def test_caption_metrics_perfect_prediction_scores_highest(monkeypatch):
    _no_java(monkeypatch)  # the Java tools take seconds to start; this checks the scorers' direction only
    refs = {0: ["a red car on the road"], 1: ["a cat on a sofa"]}
    perfect = captioning.caption_metrics({0: "a red car on the road", 1: "a cat on a sofa"}, refs)
    wrong = captioning.caption_metrics({0: "a cat on a sofa", 1: "a red car on the road"}, refs)
    assert perfect["bleu4"] == pytest.approx(100.0, abs=1e-3)
    assert perfect["cider"] > wrong["cider"] and perfect["rouge_l"] > wrong["rouge_l"]
