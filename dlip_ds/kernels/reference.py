"""PyTorch references: they materialise attention maps and whole logits, and are the oracles for
the fused kernels. They run anywhere and are differentiable by autograd (gradcheck-able in fp64).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .relation import RelationInputs


def accumulate(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 (the accumulation dtype); fp32 and fp64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def matmul_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the output-projection matmuls run in: the inputs' own on accelerators (tensor cores,
    fp32 accumulation); fp32 on the CPU, whose fp16/bf16 GEMMs measured 4 to 70x slower than fp32
    at vocabulary-sized shapes (and round their outputs)."""
    return torch.promote_types(dtype, torch.float32) if device.type == "cpu" else dtype


def project(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """Logits h w^T + b in the accumulation dtype, the matmul in `matmul_dtype`."""
    mm = matmul_dtype(h.device, h.dtype)
    return accumulate(F.linear(h.to(mm), w.to(mm), None if b is None else b.to(mm)))


def attention_kd_reference(x: RelationInputs) -> torch.Tensor:
    """The attention KD loss of `attention_kd.py`, with both [B, R, N_q, N_k] maps in memory."""
    n_q, n_k = x.q_s.shape[2], x.k_s.shape[2]
    hidden = torch.zeros(x.q_s.shape[0], 1, n_q, n_k, dtype=torch.bool, device=x.q_s.device)
    if x.key_padding_mask is not None:
        hidden = hidden | x.key_padding_mask[:, None, None, :]
    if x.causal:
        hidden = hidden | torch.ones(n_q, n_k, dtype=torch.bool, device=hidden.device).triu(1)
    # rows without a visible key get an unmasked (finite) softmax and are weighted out below
    hidden = hidden & x.row_valid[:, None, :, None]

    def log_attention(q, k, scale):
        scores = torch.matmul(accumulate(q), accumulate(k).transpose(-1, -2)) * scale
        return torch.log_softmax(scores.masked_fill(hidden, float("-inf")), dim=-1)

    logp_s = log_attention(x.q_s, x.k_s, x.scale_s)
    logp_t = log_attention(x.q_t, x.k_t, x.scale_t)
    p_t = logp_t.exp()
    # hidden keys have p_t = 0; where() keeps 0 * (-inf - -inf) out of the sum
    kl = torch.where(hidden, 0.0, p_t * (logp_t - logp_s)).sum(-1)  # [B, R, N_q]
    kl = torch.where(x.row_valid[:, None, :], kl, 0.0)
    rows = x.row_valid.sum() * x.q_s.shape[1]
    return kl.sum() / rows.clamp(min=1)


def linear_kd_reference(
    h_s: torch.Tensor, w_s: torch.Tensor, h_t: torch.Tensor, w_t: torch.Tensor, *,
    b_s: torch.Tensor | None = None, b_t: torch.Tensor | None = None,
    mask: torch.Tensor | None = None, temperature: float = 1.0,
) -> torch.Tensor:
    """Mean over kept tokens of T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), with whole logits."""
    z_s = project(h_s, w_s, b_s).flatten(0, -2)
    z_t = project(h_t.detach(), w_t.detach(), None if b_t is None else b_t.detach()).flatten(0, -2)
    logp_s = torch.log_softmax(z_s / temperature, dim=-1)
    logp_t = torch.log_softmax(z_t / temperature, dim=-1)
    kl = (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    keep = torch.ones_like(kl, dtype=torch.bool) if mask is None else ~mask.reshape(-1)
    return temperature**2 * torch.where(keep, kl, 0.0).sum() / keep.sum().clamp(min=1)


def linear_ce_reference(
    h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, *, b: torch.Tensor | None = None,
    label_smoothing: float = 0.0, ignore_index: int = -100,
) -> torch.Tensor:
    """Mean over scored tokens (target != ignore_index) of the label-smoothed cross-entropy, whole logits."""
    z = project(h, w, b).flatten(0, -2)
    total = F.cross_entropy(z, targets.reshape(-1), reduction="sum", ignore_index=ignore_index,
                            label_smoothing=label_smoothing)
    return total / (targets != ignore_index).sum().clamp(min=1)


def repr_kd_separate(
    h_s: list[torch.Tensor], h_t: list[torch.Tensor], weights: list[torch.Tensor],
    biases: list[torch.Tensor | None], *, mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over layer pairs of the masked MSE between h_s W^T + b and h_t, one pair at a time."""
    total = 0.0
    for hs, ht, w, b in zip(h_s, h_t, weights, biases):
        err = (accumulate(F.linear(hs, w, b)) - accumulate(ht.detach())).pow(2).sum(-1)  # [B, N]
        if mask is None:
            total = total + err.mean() / ht.shape[-1]
        else:
            keep = ~mask
            total = total + torch.where(keep, err, 0.0).sum() / (keep.sum().clamp(min=1) * ht.shape[-1])
    return total
