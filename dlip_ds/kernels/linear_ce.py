"""The cross-entropy through an output projection, chunked over tokens, alone or fused with the
logit KD of `linear_kd_loss` (one pass: each chunk's student logits serve both losses).

What the student's LM loss runs on (`PretrainTask._language_model`), so that [tokens, vocab]
logits never exist whole. The chunk engine and its precision notes: `linear_kd.py`.
"""

from __future__ import annotations

import torch

from .dispatch import resolve_backend
from .linear_kd import (
    BACKENDS,
    ChunkedLinearLosses,
    ChunkOptions,
    check_projection,
    check_teacher,
    student_inputs,
)
from .reference import linear_ce_reference, linear_kd_reference


def _check(op: str, h, w, b, targets, label_smoothing: float, chunk_size: int) -> None:
    check_projection(op, "student", h, w, b)
    if targets.dtype != torch.long or targets.shape != h.shape[:-1]:
        raise ValueError(f"{op}: targets must be int64 {tuple(h.shape[:-1])}, got {targets.dtype} {tuple(targets.shape)}")
    if not 0 <= label_smoothing < 1 or chunk_size < 1:
        raise ValueError(f"{op}: need 0 <= label_smoothing < 1 and chunk_size >= 1, got {label_smoothing}, {chunk_size}")


def linear_cross_entropy(
    h: torch.Tensor,
    w: torch.Tensor,
    targets: torch.Tensor,
    *,
    b: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    chunk_size: int = 1024,
    backend: str = "auto",
) -> torch.Tensor:
    """Mean over tokens whose target is not `ignore_index` of the label-smoothed cross-entropy of
    softmax(h W^T + b) (F.cross_entropy's smoothing); 0 when no token is scored.

    h: [..., D], targets: int64 [...] (the same leading shape), w: [V, D], b: [V]. backend: "chunked"
    (at most [chunk_size, V] logits at once, any device), "torch" (whole logits) or "auto" (chunked).
    """
    _check("linear_cross_entropy", h, w, b, targets, label_smoothing, chunk_size)
    if resolve_backend("linear_cross_entropy", backend, h.device, BACKENDS, cpu_auto="chunked") == "torch":
        return linear_ce_reference(h, w, targets, b=b, label_smoothing=label_smoothing, ignore_index=ignore_index)
    h, w, b = student_inputs(h, w, b)
    opts = ChunkOptions(label_smoothing=float(label_smoothing), ignore_index=int(ignore_index), chunk_size=int(chunk_size))
    ce, _ = ChunkedLinearLosses.apply(h, w, b, None, None, None, targets.reshape(-1), None, opts)
    return ce


def linear_ce_kd_loss(
    h_s: torch.Tensor,
    w_s: torch.Tensor,
    targets: torch.Tensor,
    h_t: torch.Tensor,
    w_t: torch.Tensor,
    *,
    b_s: torch.Tensor | None = None,
    b_t: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int = 1024,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE, KD) in one chunked pass, on the tokens the CE scores (target != ignore_index):

        CE = linear_cross_entropy(h_s, w_s, targets, b=b_s, label_smoothing=..., ignore_index=...)
        KD = linear_kd_loss(h_s, w_s, h_t, w_t, b_s=b_s, b_t=b_t, mask=targets == ignore_index, temperature=...)

    Two outputs with their own gradients (each weighted by its own grad_out in the backward).
    """
    op = "linear_ce_kd_loss"
    _check(op, h_s, w_s, b_s, targets, label_smoothing, chunk_size)
    check_teacher(op, h_s, w_s, h_t, w_t, b_t, temperature)
    if resolve_backend(op, backend, h_s.device, BACKENDS, cpu_auto="chunked") == "torch":
        ce = linear_ce_reference(h_s, w_s, targets, b=b_s, label_smoothing=label_smoothing, ignore_index=ignore_index)
        kd = linear_kd_reference(h_s, w_s, h_t, w_t, b_s=b_s, b_t=b_t, mask=targets == ignore_index,
                                 temperature=temperature)
        return ce, kd
    h_s, w_s, b_s = student_inputs(h_s, w_s, b_s)
    targets = targets.reshape(-1)
    opts = ChunkOptions(temperature=float(temperature), label_smoothing=float(label_smoothing),
                        ignore_index=int(ignore_index), chunk_size=int(chunk_size))
    return ChunkedLinearLosses.apply(
        h_s, w_s, b_s, h_t.detach().reshape(-1, h_t.shape[-1]), w_t.detach(), None if b_t is None else b_t.detach(),
        targets, targets != ignore_index, opts,
    )
