"""Input preparation shared by the attention-KD backends: checks, relation-head re-split, masks and
scales, computed once so that the Triton kernels and the reference see the same `RelationInputs`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class RelationInputs:
    """Both sides re-split into relation heads, with the masks and scales the kernels take."""

    q_s: torch.Tensor  # [B, R, N_q, d_s]
    k_s: torch.Tensor  # [B, R, N_k, d_s]
    q_t: torch.Tensor  # [B, R, N_q, d_t]
    k_t: torch.Tensor  # [B, R, N_k, d_t]
    scale_s: float
    scale_t: float
    key_padding_mask: torch.Tensor | None  # [B, N_k] bool, True = padding
    row_valid: torch.Tensor  # [B, N_q] bool: query kept and at least one visible key
    causal: bool


def to_relation_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, H, N, d] -> [B, R, N, H*d/R]: concatenate the heads' channels and split them again."""
    b, h, n, d = x.shape
    if heads == h:
        return x
    return x.transpose(1, 2).reshape(b, n, heads, h * d // heads).transpose(1, 2)


def _check_inputs(q_s, k_s, q_t, k_t, key_padding_mask, query_padding_mask, relation_heads, temperature) -> int:
    names = {"q_s": q_s, "k_s": k_s, "q_t": q_t, "k_t": k_t}
    for name, x in names.items():
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"attention_kd_loss: {name} must be a [B, H, N, d] tensor, got {got}")
        if not x.is_floating_point():
            raise ValueError(f"attention_kd_loss: {name} must be floating point, got {x.dtype}")
    for side, q, k in (("student", q_s, k_s), ("teacher", q_t, k_t)):
        if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
            raise ValueError(
                f"attention_kd_loss: {side} q {tuple(q.shape)} and k {tuple(k.shape)} must agree in B, H and d"
            )
        if q.dtype != k.dtype:
            raise ValueError(f"attention_kd_loss: {side} q and k dtypes differ ({q.dtype} vs {k.dtype})")
    if q_s.shape[0] != q_t.shape[0]:
        raise ValueError(f"attention_kd_loss: batch sizes differ (student {q_s.shape[0]}, teacher {q_t.shape[0]})")
    if q_s.shape[2] != q_t.shape[2] or k_s.shape[2] != k_t.shape[2]:
        raise ValueError(
            "attention_kd_loss: student and teacher must have the same query and key lengths, got "
            f"N_q {q_s.shape[2]} vs {q_t.shape[2]}, N_k {k_s.shape[2]} vs {k_t.shape[2]}"
        )
    if len({x.device for x in names.values()}) != 1:
        raise ValueError("attention_kd_loss: q_s, k_s, q_t, k_t must be on one device")
    b, n_q, n_k = q_s.shape[0], q_s.shape[2], k_s.shape[2]
    for name, m, n in (("key_padding_mask", key_padding_mask, n_k), ("query_padding_mask", query_padding_mask, n_q)):
        if m is not None and (m.dtype != torch.bool or tuple(m.shape) != (b, n)):
            raise ValueError(
                f"attention_kd_loss: {name} must be a bool [B={b}, {n}] tensor (True = padding), "
                f"got {m.dtype} {tuple(m.shape)}"
            )
    if not temperature > 0:
        raise ValueError(f"attention_kd_loss: temperature must be > 0, got {temperature}")
    h_s, h_t = q_s.shape[1], q_t.shape[1]
    if relation_heads is None:
        if h_s != h_t:
            raise ValueError(
                f"attention_kd_loss: student has {h_s} heads and teacher {h_t}; "
                "set relation_heads to a count that divides both H*d channel widths"
            )
        return h_s
    r = int(relation_heads)
    for side, x in (("student", q_s), ("teacher", q_t)):
        width = x.shape[1] * x.shape[3]
        if r <= 0 or width % r:
            raise ValueError(
                f"attention_kd_loss: relation_heads={relation_heads} must divide the {side}'s "
                f"H*d = {x.shape[1]}*{x.shape[3]} = {width} channels"
            )
    return r


def _row_valid(key_padding_mask, query_padding_mask, causal, b, n_q, n_k, device) -> torch.Tensor:
    """[B, N_q] bool: the query is kept and sees at least one unpadded key."""
    if key_padding_mask is None:
        has_key = torch.full((b, n_q), n_k > 0, dtype=torch.bool, device=device)
    elif causal:
        # row i sees keys 0..min(i, N_k-1): it has one when the running count of valid keys there is > 0
        seen = (~key_padding_mask).cumsum(dim=1)  # [B, N_k]
        last = torch.arange(n_q, device=device).clamp(max=n_k - 1)
        has_key = seen[:, last] > 0
    else:
        has_key = (~key_padding_mask).any(dim=1, keepdim=True).expand(b, n_q)
    if query_padding_mask is not None:
        has_key = has_key & ~query_padding_mask
    return has_key


def prepare_inputs(
    q_s, k_s, q_t, k_t, *, key_padding_mask=None, query_padding_mask=None, causal=False,
    relation_heads=None, temperature=1.0,
) -> RelationInputs:
    r = _check_inputs(q_s, k_s, q_t, k_t, key_padding_mask, query_padding_mask, relation_heads, temperature)
    b, n_q, n_k = q_s.shape[0], q_s.shape[2], k_s.shape[2]
    if query_padding_mask is None and n_q == n_k:
        query_padding_mask = key_padding_mask
    q_t, k_t = q_t.detach(), k_t.detach()
    q_s, k_s, q_t, k_t = (to_relation_heads(x, r) for x in (q_s, k_s, q_t, k_t))
    return RelationInputs(
        q_s=q_s, k_s=k_s, q_t=q_t, k_t=k_t,
        scale_s=1.0 / (math.sqrt(q_s.shape[3]) * temperature),
        scale_t=1.0 / (math.sqrt(q_t.shape[3]) * temperature),
        key_padding_mask=key_padding_mask,
        row_valid=_row_valid(key_padding_mask, query_padding_mask, causal, b, n_q, n_k, q_s.device),
        causal=bool(causal),
    )
