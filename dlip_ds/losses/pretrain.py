"""Pretraining objectives of BLIP: image-text contrastive (ITC), image-text matching (ITM), LM.

Pure tensor functions (plus the small momentum `FeatureQueue`), so the step module can run them on
the student and reuse them on the teacher's outputs. Conventions follow Salesforce BLIP
(`models/blip_pretrain.py`, `models/blip_retrieval.py`): ITC cross-entropy both ways against
(soft) targets, one hard negative per image and per text for ITM in BLIP's pair order, and a
shifted LM cross-entropy with label smoothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100


# --------------------------------------------------------------------------- distributed


def world_info() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGather(torch.autograd.Function):
    """all_gather whose backward returns each rank the summed gradient for its own slice."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        rank, world = world_info()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = slice(rank * x.shape[0], (rank + 1) * x.shape[0])
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss has a say in this rank's features
        return grad[ctx.rows]


def gather_features(x: Tensor) -> Tensor:
    """Concatenate `x` [B, ...] from every rank along dim 0, in rank order; identity when not distributed.

    The gradient flows to the local slice only, but it is the sum of what every rank's loss sends
    to it (BLIP's `all_gather_with_grad`): with the usual averaging of parameter gradients over
    ranks, ITC with local queries against gathered keys then gets exactly the single-process,
    whole-batch gradient. Every rank must pass the same shape, and run the backward.
    """
    if world_info()[1] == 1:
        return x
    return _AllGather.apply(x)


# --------------------------------------------------------------------------- ITC


def itc_targets(query_ids: Tensor | None, key_ids: Tensor | None, num_keys: int, offset: int,
                batch_size: int, device: torch.device | None = None) -> Tensor:
    """Hard ITC targets [B, num_keys], rows summing to 1.

    Without image ids: one-hot, query i's positive being key `offset + i` (its own pair among the
    gathered keys). With image ids: every key of the same image is a positive, weighted uniformly
    (BLIP retrieval's `sim_targets`), so captions of one image are not pushed apart.
    """
    if query_ids is None or key_ids is None:
        targets = torch.zeros(batch_size, num_keys, device=device)
        rows = torch.arange(batch_size, device=device)
        targets[rows, rows + offset] = 1.0
        return targets
    pos = (query_ids.view(-1, 1) == key_ids.view(1, -1)).float()
    return pos / pos.sum(dim=1, keepdim=True)


def soft_targets(reference_sim: Tensor, targets: Tensor, alpha: float) -> Tensor:
    """BLIP's distilled targets: alpha * softmax(reference similarities) + (1 - alpha) * targets.

    `reference_sim` comes from the momentum encoder or the teacher, already divided by its own
    temperature; it carries no gradient.
    """
    return alpha * F.softmax(reference_sim.detach().float(), dim=1) + (1.0 - alpha) * targets


def itc_loss(sim_i2t: Tensor, sim_t2i: Tensor, targets_i2t: Tensor, targets_t2i: Tensor | None = None) -> Tensor:
    """Mean of the image->text and text->image cross-entropies against (soft) targets.

    sim_* [B, K]: local queries against K keys, already divided by the temperature.
    """
    if targets_t2i is None:
        targets_t2i = targets_i2t
    loss_i2t = -(F.log_softmax(sim_i2t.float(), dim=1) * targets_i2t).sum(dim=1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i.float(), dim=1) * targets_t2i).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


class FeatureQueue(nn.Module):
    """FIFO queues of momentum image/text features (and image ids) for ITC, as in BLIP.

    Only the filled part is used as extra keys, so a fresh queue adds no random negatives. The
    buffers are saved with the module that owns the queue (the step module) and so resume exactly.
    """

    def __init__(self, dim: int, size: int):
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be >= 1, got {size}")
        self.size = size
        self.register_buffer("image_feat", torch.zeros(size, dim))
        self.register_buffer("text_feat", torch.zeros(size, dim))
        self.register_buffer("image_ids", torch.full((size,), IGNORE_INDEX, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def keys(self) -> tuple[Tensor, Tensor, Tensor]:
        """The queued (image_feat [n, E], text_feat [n, E], image_ids [n]), n = filled entries."""
        n = int(self.filled)
        return self.image_feat[:n], self.text_feat[:n], self.image_ids[:n]

    @torch.no_grad()
    def push(self, image_feat: Tensor, text_feat: Tensor, image_ids: Tensor | None = None) -> None:
        """Enqueue a (globally gathered) batch, overwriting the oldest entries."""
        n = image_feat.shape[0]
        idx = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size
        if n > self.size:  # only the newest `size` entries survive
            idx, image_feat, text_feat = idx[-self.size:], image_feat[-self.size:], text_feat[-self.size:]
            image_ids = None if image_ids is None else image_ids[-self.size:]
        self.image_feat[idx] = image_feat.detach().to(self.image_feat.dtype)
        self.text_feat[idx] = text_feat.detach().to(self.text_feat.dtype)
        self.image_ids[idx] = IGNORE_INDEX if image_ids is None else image_ids.to(self.image_ids.device)
        self.ptr.copy_((self.ptr + n) % self.size)
        self.filled.copy_(torch.clamp(self.filled + n, max=self.size))


# --------------------------------------------------------------------------- ITM


@dataclass
class PairPlan:
    """The (image, text) pairs that both teacher and student fuse, in BLIP's order:
    B positives, then for each text a hard negative image, then for each image a hard negative text.
    Indices point into the local batch."""

    image_index: Tensor  # [3B] long
    text_index: Tensor  # [3B] long
    itm_labels: Tensor  # [3B] long, 1 = match

    @property
    def positives(self) -> int:
        return self.image_index.shape[0] // 3


def _negative_weights(sim: Tensor, same: Tensor) -> Tensor:
    """Sampling weights softmax(sim) over the other pairs of the local batch.

    The positive and pairs of the same image are excluded; a row whose only other pairs show the
    same image falls back to excluding the positive alone (it still needs a negative).
    BLIP's + 1e-4 keeps every allowed candidate drawable when the softmax underflows.
    """
    weights = F.softmax(sim.float(), dim=1) + 1e-4
    eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    excluded = same | eye
    starved = excluded.all(dim=1, keepdim=True)
    return weights.masked_fill(torch.where(starved, eye, excluded), 0.0)


@torch.no_grad()
def sample_hard_negatives(sim_i2t: Tensor, sim_t2i: Tensor, *, image_ids: Tensor | None = None,
                          generator: torch.Generator | None = None) -> PairPlan:
    """Draw one hard negative text per image and one hard negative image per text.

    sim_* [B, B]: similarities within the local batch (image i vs text j, text i vs image j), from
    the teacher or the student. Negatives are drawn with probability softmax(sim), the positive
    and pairs sharing its image id never drawn. Deterministic for a given `generator` state; the
    draw runs on the generator's device.
    """
    b = sim_i2t.shape[0]
    if b < 2:
        raise ValueError("ITM hard negatives need at least 2 samples per rank (data.batch_size >= 2)")
    if sim_i2t.shape != (b, b) or sim_t2i.shape != (b, b):
        raise ValueError(f"expected local [B, B] similarities, got {tuple(sim_i2t.shape)} and {tuple(sim_t2i.shape)}")
    if image_ids is None:
        same = torch.zeros(b, b, dtype=torch.bool, device=sim_i2t.device)
    else:
        image_ids = image_ids.to(sim_i2t.device)
        same = image_ids.view(-1, 1) == image_ids.view(1, -1)
    device = generator.device if generator is not None else sim_i2t.device
    w_t2i = _negative_weights(sim_t2i, same).to(device)  # row = text, over images
    w_i2t = _negative_weights(sim_i2t, same).to(device)  # row = image, over texts
    neg_image = torch.multinomial(w_t2i, 1, generator=generator).view(-1).to(sim_i2t.device)
    neg_text = torch.multinomial(w_i2t, 1, generator=generator).view(-1).to(sim_i2t.device)
    ar = torch.arange(b, device=sim_i2t.device)
    return PairPlan(
        image_index=torch.cat([ar, neg_image, ar]),
        text_index=torch.cat([ar, ar, neg_text]),
        itm_labels=torch.cat([torch.ones(b, dtype=torch.long, device=ar.device),
                              torch.zeros(2 * b, dtype=torch.long, device=ar.device)]),
    )


def itm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """2-way cross-entropy over the planned pairs (logits [3B, 2])."""
    return F.cross_entropy(logits.float(), labels)


# --------------------------------------------------------------------------- LM


def lm_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.1) -> Tensor:
    """Causal LM cross-entropy: position j predicts label j + 1; -100 labels (padding, prompt) ignored.

    logits [B, L, V], labels [B, L] aligned with the inputs (the data loader's `lm_labels`).
    Mean over the predicted tokens; 0 (with a graph) when there are none.
    """
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum",
                            ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)  # no host sync, no 0/0
