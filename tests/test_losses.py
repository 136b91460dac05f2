"""Pretraining losses against naive re-computations (explicit loops and formulas)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import free_port, naive_ce_rows, naive_lm, naive_softmax

from dlip_ds.losses.pretrain import (
    FeatureQueue,
    gather_features,
    itc_loss,
    itc_targets,
    itm_loss,
    lm_loss,
    sample_hard_negatives,
    soft_targets,
)


def _features(b: int, e: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(b, e, generator=g), dim=-1),
            F.normalize(torch.randn(b, e, generator=g), dim=-1))


def test_itc_one_hot_matches_naive():
    img, txt = _features(6, 8, 0)
    temp = 0.07
    sim_i2t, sim_t2i = img @ txt.T / temp, txt @ img.T / temp
    targets = itc_targets(None, None, num_keys=6, offset=0, batch_size=6)
    expected_targets = [[1.0 if i == j else 0.0 for j in range(6)] for i in range(6)]
    assert targets.tolist() == expected_targets
    got = itc_loss(sim_i2t, sim_t2i, targets)
    t = torch.tensor(expected_targets)
    naive = (naive_ce_rows(sim_i2t, t) + naive_ce_rows(sim_t2i, t)) / 2
    assert abs(got.item() - naive) < 1e-5


def test_itc_targets_with_image_ids_and_offset():
    # keys gathered from two ranks of 3; this rank is rank 1 (offset 3)
    ids_all = torch.tensor([5, 7, 5, 7, 9, 5])
    local = ids_all[3:]
    t = itc_targets(local, ids_all, num_keys=6, offset=3, batch_size=3)
    for i in range(3):
        positives = [j for j in range(6) if int(ids_all[j]) == int(local[i])]
        for j in range(6):
            assert abs(t[i, j].item() - (1 / len(positives) if j in positives else 0.0)) < 1e-7
    one_hot = itc_targets(None, None, num_keys=6, offset=3, batch_size=3)
    assert [row.index(1.0) for row in one_hot.tolist()] == [3, 4, 5]


def test_itc_soft_targets_match_naive():
    img, txt = _features(5, 4, 1)
    t_img, t_txt = _features(5, 4, 2)
    temp, t_temp, alpha = 0.05, 0.1, 0.4
    ids = torch.tensor([0, 1, 0, 2, 3])
    hard = itc_targets(ids, ids, 5, 0, 5)
    ref_i2t = t_img @ t_txt.T / t_temp
    ref_t2i = t_txt @ t_img.T / t_temp
    tgt_i2t = soft_targets(ref_i2t, hard, alpha)
    tgt_t2i = soft_targets(ref_t2i, hard, alpha)
    got = itc_loss(img @ txt.T / temp, txt @ img.T / temp, tgt_i2t, tgt_t2i)

    def naive_targets(ref):
        out = []
        for i in range(5):
            p = naive_softmax([float(v) for v in ref[i]])
            n_pos = sum(int(ids[j]) == int(ids[i]) for j in range(5))
            out.append([alpha * p[j] + (1 - alpha) * (1 / n_pos if int(ids[j]) == int(ids[i]) else 0) for j in range(5)])
        return torch.tensor(out, dtype=torch.float64)

    naive = (naive_ce_rows(img @ txt.T / temp, naive_targets(ref_i2t))
             + naive_ce_rows(txt @ img.T / temp, naive_targets(ref_t2i))) / 2
    assert abs(got.item() - naive) < 1e-5
    assert torch.allclose(tgt_i2t.sum(1), torch.ones(5))


def test_hard_negatives_never_positive_and_deterministic():
    b = 6
    ids = torch.tensor([0, 1, 1, 2, 3, 3])
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        sim_i2t = torch.randn(b, b, generator=g) * 10
        sim_i2t.diagonal().add_(50.0)  # the positive dominates the softmax: it must still never be drawn
        sim_t2i = sim_i2t.T.contiguous()
        plan = sample_hard_negatives(sim_i2t, sim_t2i, generator=torch.Generator().manual_seed(seed))
        assert plan.image_index[:b].tolist() == list(range(b)) == plan.text_index[:b].tolist()
        assert plan.text_index[b:2 * b].tolist() == list(range(b))  # negative image per text
        assert plan.image_index[2 * b:].tolist() == list(range(b))  # negative text per image
        assert plan.itm_labels.tolist() == [1] * b + [0] * (2 * b)
        assert (plan.image_index[b:] != plan.text_index[b:]).all()
        with_ids = sample_hard_negatives(sim_i2t, sim_t2i, image_ids=ids, generator=torch.Generator().manual_seed(seed))
        neg = with_ids.image_index[b:], with_ids.text_index[b:]
        assert (ids[neg[0]] != ids[neg[1]]).all()
        again = sample_hard_negatives(sim_i2t, sim_t2i, image_ids=ids, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(again.image_index, with_ids.image_index)
        assert torch.equal(again.text_index, with_ids.text_index)


def test_hard_negatives_follow_the_similarities():
    # text 0 is far more similar to image 3 than to any other non-positive image
    b = 5
    sim = torch.zeros(b, b)
    sim[0, 3] = 8.0
    g = torch.Generator().manual_seed(0)
    picks = [int(sample_hard_negatives(sim.T.contiguous(), sim, generator=g).image_index[b]) for _ in range(200)]
    assert picks.count(3) > 190


def test_hard_negatives_fallback_and_errors():
    sim = torch.zeros(3, 3)
    ids = torch.tensor([4, 4, 4])  # one image, three captions: only the positive itself is excluded
    plan = sample_hard_negatives(sim, sim, image_ids=ids, generator=torch.Generator().manual_seed(0))
    assert (plan.image_index[3:] != plan.text_index[3:]).all()
    with pytest.raises(ValueError, match="batch_size >= 2"):
        sample_hard_negatives(torch.zeros(1, 1), torch.zeros(1, 1))


def test_itm_loss_matches_naive():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 2, generator=g)
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0])
    naive = 0.0
    for i in range(9):
        p = naive_softmax([float(v) for v in logits[i]])
        naive -= math.log(p[int(labels[i])])
    assert abs(itm_loss(logits, labels).item() - naive / 9) < 1e-6


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_lm_loss_matches_naive(smoothing):
    g = torch.Generator().manual_seed(4)
    b, length, v = 2, 6, 7
    logits = torch.randn(b, length, v, generator=g)
    labels = torch.randint(0, v, (b, length), generator=g)
    labels[0, :2] = -100  # prompt
    labels[1, 4:] = -100  # padding
    assert abs(lm_loss(logits, labels, smoothing).item() - naive_lm(logits, labels, smoothing)) < 1e-5
    empty = lm_loss(logits.requires_grad_(), torch.full((b, length), -100), smoothing)
    assert empty.item() == 0.0
    empty.backward()


def test_feature_queue_fifo():
    q = FeatureQueue(dim=2, size=5)
    assert q.keys()[0].shape == (0, 2)
    for step in range(4):  # 4 pushes of 2 rows: wraps around once
        feats = torch.full((2, 2), float(step))
        q.push(feats, -feats, torch.tensor([step, step]))
    img, txt, ids = q.keys()
    assert img.shape == (5, 2) and torch.equal(txt, -img)
    # the 5 newest rows survive: steps 1 (one row), 2, 2, 3, 3
    assert sorted(ids.tolist()) == [1, 2, 2, 3, 3]
    assert sorted(img[:, 0].tolist()) == [1.0, 2.0, 2.0, 3.0, 3.0]
    state = q.state_dict()
    assert {"image_feat", "text_feat", "image_ids", "ptr", "filled"} <= set(state)


def _encoders(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images, texts = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    w_img, w_txt = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    return images, texts, w_img.requires_grad_(), w_txt.requires_grad_()


def _itc_on(images, texts, w_img, w_txt, rank: int):
    """ITC of local queries against gathered keys (the pretraining task's form) with linear encoders."""
    img, txt = F.normalize(images @ w_img, dim=-1), F.normalize(texts @ w_txt, dim=-1)
    img_all, txt_all = gather_features(img), gather_features(txt)
    targets = itc_targets(None, None, img_all.shape[0], rank * img.shape[0], img.shape[0])
    return itc_loss(img @ txt_all.T / 0.1, txt @ img_all.T / 0.1, targets)


def _gather_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x = torch.arange(6, dtype=torch.float32).view(3, 2).add(10 * rank).requires_grad_()
        gathered = gather_features(x)
        weights = torch.arange(gathered.numel(), dtype=torch.float32).view_as(gathered) + 100 * rank
        (gathered * weights).sum().backward()
        # ITC on half the batch per rank, gradients averaged over ranks as DDP/DeepSpeed do
        images, texts, w_img, w_txt = _encoders()
        rows = slice(3 * rank, 3 * rank + 3)
        loss = _itc_on(images[rows], texts[rows], w_img, w_txt, rank)
        loss.backward()
        grads = [w_img.grad, w_txt.grad]
        for g in grads:
            dist.all_reduce(g)
            g /= world
        torch.save({"gathered": gathered.detach(), "grad": x.grad, "itc_grads": grads, "itc_loss": loss.detach()},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gather_features_two_ranks(tmp_path):
    mp.spawn(_gather_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    expected = torch.cat([torch.arange(6, dtype=torch.float32).view(3, 2) + 10 * r for r in range(2)])
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    # one process, the whole batch: the reference for the 2-rank ITC loss and gradients
    images, texts, w_img, w_txt = _encoders()
    full = _itc_on(images, texts, w_img, w_txt, 0)
    full.backward()
    for rank, res in enumerate(results):
        assert torch.equal(res["gathered"], expected)
        # rank r's slice receives what every rank's loss sum(gathered * w_rank) sends it
        base = torch.arange(12, dtype=torch.float32).view(6, 2)[3 * rank:3 * rank + 3]
        assert torch.equal(res["grad"], 2 * base + 100)
        assert torch.allclose(res["itc_grads"][0], w_img.grad, atol=1e-6)
        assert torch.allclose(res["itc_grads"][1], w_txt.grad, atol=1e-6)
    assert abs((results[0]["itc_loss"] + results[1]["itc_loss"]).item() / 2 - full.item()) < 1e-6
    single = torch.ones(2, 2, requires_grad=True)
    assert gather_features(single) is single
