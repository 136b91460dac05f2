"""Attention-map distillation: KL(teacher attention || student attention), MiniLM(v2) style.

For each side, with relation heads R (default: the heads count), the H*d channels of q and k are
re-split into R heads of width d_r = H*d/R and

    A = softmax(q k^T / (sqrt(d_r) * T) + mask)          (T = temperature, same on both sides)

    loss = 1/|rows| * sum over valid rows (b, r, i) of sum_j A_t[b,r,i,j] * (log A_t - log A_s)

No T^2 factor is applied (unlike `linear_kd_loss`): the loss is the KL of the tempered maps.
A row is valid when its query is not padding and at least one key is visible to it; other rows
contribute nothing. The mask removes padded keys and, when `causal`, keys j > i (top-left
aligned, as `scaled_dot_product_attention(is_causal=True)`). The teacher is detached.
"""

from __future__ import annotations

import torch

from .dispatch import resolve_backend
from .reference import attention_kd_reference
from .relation import prepare_inputs

BACKENDS = ("triton", "torch")


def attention_kd_loss(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    query_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    relation_heads: int | None = None,
    temperature: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Mean KL(teacher attention || student attention) over (batch, relation head, valid query row).

    q, k: [B, H, N, d] before the 1/sqrt(d) scaling (teacher and student may differ in H and d).
    Masks are bool, True = padding. Returns an fp32 scalar; gradients reach q_s and k_s only.
    backend: "triton" (fused, O(B*R*N) extra memory), "torch" (materialised maps), or "auto"
    (triton on CUDA tensors, torch elsewhere).
    """
    inputs = prepare_inputs(
        q_s, k_s, q_t, k_t, key_padding_mask=key_padding_mask, query_padding_mask=query_padding_mask,
        causal=causal, relation_heads=relation_heads, temperature=temperature,
    )
    if resolve_backend("attention_kd_loss", backend, q_s.device, BACKENDS) == "triton":
        from .attention_kd_triton import attention_kd_triton

        return attention_kd_triton(inputs)
    return attention_kd_reference(inputs)
