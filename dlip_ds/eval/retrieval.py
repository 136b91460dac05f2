"""Image-text retrieval with BLIP's protocol.

ITC similarities rank every image against every text; the top-k candidates of each query are then
re-scored by the ITM head, and their score becomes ITM match logit + ITC similarity (BLIP's
`train_retrieval.py: evaluation`). Candidates outside the top k keep their ITC order below every
re-ranked one (BLIP gives them all -100, which only matters when k < 10). Rows are split across
ranks and the score matrices are summed with `all_reduce`, as BLIP does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

KS = (1, 5, 10)
def _ranks(scores: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """0-based rank of the best-scored ground truth of each row; ties count against the model."""
    best = scores.masked_fill(~gt, float("-inf")).amax(dim=1, keepdim=True)
    return ((scores >= best) & ~gt).sum(dim=1)


def _gt_mask(n_img: int, n_txt: int, img2txt: Sequence[Sequence[int]], txt2img: Sequence[int]) -> torch.Tensor:
    if len(img2txt) != n_img or len(txt2img) != n_txt:
        raise ValueError(
            f"score matrix is [{n_img}, {n_txt}] but img2txt has {len(img2txt)} images and txt2img {len(txt2img)} texts"
        )
    gt = torch.zeros(n_img, n_txt, dtype=torch.bool)
    for i, texts in enumerate(img2txt):
        if not len(texts):
            raise ValueError(f"image {i} has no ground-truth caption")
        gt[i, list(texts)] = True
    t2i = torch.zeros_like(gt)
    t2i[torch.as_tensor(list(txt2img)), torch.arange(n_txt)] = True
    if not torch.equal(gt, t2i):
        raise ValueError("img2txt and txt2img disagree about which caption belongs to which image")
    return gt


def recall_at_k(
    scores_i2t: torch.Tensor,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int],
    scores_t2i: torch.Tensor | None = None,
) -> dict[str, float]:
    """Recall@1/5/10 in percent, BLIP's names: `txt_r*` image->text, `img_r*` text->image.

    `scores_i2t` is [Ni, Nt]; `scores_t2i` [Nt, Ni] defaults to its transpose (the ITC-only case;
    with ITM re-ranking the two directions re-rank different candidates). An image query is a hit
    when any of its captions is within the top k.
    """
    scores_i2t = torch.as_tensor(scores_i2t).float().cpu()
    scores_t2i = scores_i2t.t() if scores_t2i is None else torch.as_tensor(scores_t2i).float().cpu()
    n_img, n_txt = scores_i2t.shape
    if scores_t2i.shape != (n_txt, n_img):
        raise ValueError(f"scores_t2i is {list(scores_t2i.shape)}, expected [{n_txt}, {n_img}]")
    gt = _gt_mask(n_img, n_txt, img2txt, txt2img)
    out: dict[str, float] = {}
    for prefix, ranks in (("txt", _ranks(scores_i2t, gt)), ("img", _ranks(scores_t2i, gt.t()))):
        for k in KS:
            out[f"{prefix}_r{k}"] = 100.0 * (ranks < k).double().mean().item()
        out[f"{prefix}_r_mean"] = sum(out[f"{prefix}_r{k}"] for k in KS) / len(KS)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def dist_info(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world size): the given ones, else torch.distributed's, else (0, 1)."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_eval_set(model, eval_set, tokenizer, *, batch_size: int = 64, max_length: int = 35,
                    device: torch.device | None = None, progress: bool = True) -> dict[str, torch.Tensor]:
    """Unimodal features of every image and caption: ITC features, image token embeddings, text ids.

    Captions are tokenised with [CLS] first (the text encoder); `itm_ids` swaps it for [ENC].
    """
    from dlip_ds.data import eval_transform

    device = device or model_device(model)
    transform = eval_transform(model.cfg.vision)
    image_feat, image_embeds = [], []
    n_batches = -(-len(eval_set.image_ids) // batch_size)
    for pixels in tqdm(eval_set.image_batches(batch_size, transform), total=n_batches, desc="images",
                       disable=not progress, leave=False):
        out = model.encode_image(pixels.to(device))
        image_feat.append(out.feat.float())
        image_embeds.append(out.embeds)
    tok = tokenizer(list(eval_set.captions), padding="longest", truncation=True, max_length=max_length,
                    return_tensors="pt")
    ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
    text_feat = []
    for s in tqdm(range(0, len(ids), batch_size), desc="texts", disable=not progress, leave=False):
        text_feat.append(model.encode_text(ids[s:s + batch_size], mask[s:s + batch_size]).feat.float())
    itm_ids = ids.clone()
    itm_ids[:, 0] = tokenizer.enc_token_id
    return {
        "image_feat": torch.cat(image_feat), "image_embeds": torch.cat(image_embeds),
        "text_feat": torch.cat(text_feat), "itm_ids": itm_ids, "attention_mask": mask,
    }


@torch.no_grad()
def _itm_match_logits(model, feats: dict, img_idx: torch.Tensor, txt_idx: torch.Tensor, batch_size: int,
                      progress: bool = False) -> torch.Tensor:
    """ITM "match" logits of (image, text) pairs, `batch_size` pairs per forward pass."""
    out = []
    for s in tqdm(range(0, len(img_idx), batch_size), desc="ITM re-rank", unit="batch", disable=not progress):
        i, t = img_idx[s:s + batch_size], txt_idx[s:s + batch_size]
        fused = model.fuse(feats["image_embeds"][i], feats["itm_ids"][t], feats["attention_mask"][t])
        out.append(fused.itm_logits[:, 1].float())
    return torch.cat(out) if out else torch.zeros(0, device=img_idx.device)


def _topk(sims: torch.Tensor, k: int, rows: range) -> tuple[torch.Tensor, torch.Tensor]:
    """ITC top-k (similarities, candidate indices) of `rows` of `sims`."""
    return sims[rows.start:rows.stop].topk(k, dim=1)


def _rescored(sims: torch.Tensor, rows: range, top_sim: torch.Tensor, top_idx: torch.Tensor,
              itm: torch.Tensor) -> torch.Tensor:
    """Scores of `rows` of `sims` (zeros elsewhere): the top-k re-scored as ITM logit (`itm`, [rows, k])
    + ITC; the rest keep their ITC order, shifted just below the lowest re-ranked score (a small
    shift keeps float32 resolution between nearly equal similarities)."""
    scores = torch.zeros_like(sims)
    if not len(rows):
        return scores
    block = sims[rows.start:rows.stop]
    reranked = itm + top_sim
    shift = reranked.amin(dim=1) - block.amax(dim=1) - 1.0
    scores[rows.start:rows.stop] = (block + shift[:, None]).scatter(1, top_idx, reranked)
    return scores


def _row_slice(n: int, rank: int, world_size: int) -> range:
    step = -(-n // world_size)
    return range(min(n, rank * step), min(n, (rank + 1) * step))


@torch.no_grad()
def retrieval_scores(model, eval_set, tokenizer, *, k: int = 256, itc_only: bool = False, batch_size: int = 64,
                     device: torch.device | None = None, rank: int | None = None, world_size: int | None = None,
                     progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores_i2t [Ni, Nt], scores_t2i [Nt, Ni]) on the CPU; every rank returns the full matrices."""
    rank, world_size = dist_info(rank, world_size)
    progress = progress and rank == 0
    was_training = model.training
    model.eval()
    try:
        feats = encode_eval_set(model, eval_set, tokenizer, batch_size=batch_size, device=device, progress=progress)
        sims = feats["image_feat"] @ feats["text_feat"].t()
        if itc_only:
            return sims.cpu(), sims.t().cpu()
        n_img, n_txt = sims.shape
        img_rows, txt_rows = _row_slice(n_img, rank, world_size), _row_slice(n_txt, rank, world_size)
        i2t_sim, i2t_idx = _topk(sims, min(k, n_txt), img_rows)
        t2i_sim, t2i_idx = _topk(sims.t(), min(k, n_img), txt_rows)
        # Each (image, text) pair through ITM once: a good model's image->text and text->image
        # candidates are largely the same pairs.
        dev = sims.device
        img_idx = torch.cat([torch.arange(img_rows.start, img_rows.stop, device=dev).repeat_interleave(i2t_idx.shape[1]),
                             t2i_idx.reshape(-1)])
        txt_idx = torch.cat([i2t_idx.reshape(-1),
                             torch.arange(txt_rows.start, txt_rows.stop, device=dev).repeat_interleave(t2i_idx.shape[1])])
        pairs, where = torch.unique(img_idx * n_txt + txt_idx, return_inverse=True)
        logits = _itm_match_logits(model, feats, pairs // n_txt, pairs % n_txt, batch_size,
                                   progress and len(pairs) > 0)[where]
        i2t = _rescored(sims, img_rows, i2t_sim, i2t_idx, logits[:i2t_idx.numel()].view_as(i2t_idx))
        t2i = _rescored(sims.t().contiguous(), txt_rows, t2i_sim, t2i_idx, logits[i2t_idx.numel():].view_as(t2i_idx))
    finally:
        model.train(was_training)
    if world_size > 1:
        dist.all_reduce(i2t)
        dist.all_reduce(t2i)
    return i2t.cpu(), t2i.cpu()


def evaluate_retrieval(model, eval_set, tokenizer, *, k: int = 256, itc_only: bool = False, batch_size: int = 64,
                       device: torch.device | None = None, rank: int | None = None, world_size: int | None = None,
                       progress: bool = True) -> dict[str, float]:
    """BLIP's retrieval metrics of `model` on `eval_set` (an `dlip_ds.data.EvalSet`), in percent."""
    i2t, t2i = retrieval_scores(model, eval_set, tokenizer, k=k, itc_only=itc_only, batch_size=batch_size,
                                device=device, rank=rank, world_size=world_size, progress=progress)
    return recall_at_k(i2t, eval_set.img2txt, eval_set.txt2img, t2i)
