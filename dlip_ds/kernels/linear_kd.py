"""Logit distillation through the output projections, chunked over tokens (Liger-Kernel's
fused-linear idea): each chunk's student and teacher logits, their KL and the KL's gradient are
computed together, and the gradients for h_s, w_s and b_s are accumulated during the forward, so
at most [chunk_size, vocab] logits exist at once; autograd saves only those gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import resolve_backend
from .reference import accumulate, linear_kd_reference

BACKENDS = ("chunked", "torch")


class _ChunkedLinearKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, keep, temperature, chunk_size):
        tokens, width = h_s.shape
        idx = keep.nonzero().squeeze(1) if keep is not None else None
        if idx is not None:
            h_s, h_t = h_s.index_select(0, idx), h_t.index_select(0, idx)
        n = h_s.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(h_s) if need_h else None
        grad_w = torch.zeros_like(w_s, dtype=torch.promote_types(w_s.dtype, torch.float32)) if need_w else None
        grad_b = torch.zeros_like(b_s, dtype=torch.promote_types(b_s.dtype, torch.float32)) if need_b else None
        kl_sum = accumulate(h_s.new_zeros(()))
        for start in range(0, n, chunk_size):
            hs, ht = h_s[start : start + chunk_size], h_t[start : start + chunk_size]
            logp_s = accumulate(F.linear(hs, w_s, b_s)).div_(temperature).log_softmax(-1)
            logp_t = accumulate(F.linear(ht, w_t, b_t)).div_(temperature).log_softmax(-1)
            p_t = logp_t.exp()
            kl_sum += logp_t.sub_(logp_s).mul_(p_t).sum()
            if need_h or need_w or need_b:
                # d(T^2 KL / n) / dz_s = T^2 / n * (p_s - p_t) / T
                grad_z = logp_s.exp_().sub_(p_t).mul_(temperature / n).to(hs.dtype)
                if need_h:
                    grad_h[start : start + chunk_size] = grad_z @ w_s
                if need_w:
                    grad_w += grad_z.t() @ hs
                if need_b:
                    grad_b += grad_z.sum(0)
                del grad_z
            del logp_s, logp_t, p_t  # free this chunk's logits before the next chunk's exist
        if need_h and idx is not None:
            grad_h = torch.zeros(tokens, width, dtype=h_s.dtype, device=h_s.device).index_copy_(0, idx, grad_h)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (w_s.dtype, None if b_s is None else b_s.dtype)
        return kl_sum * (temperature**2 / max(n, 1))

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        grad_h = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
        grad_w = None if grad_w is None else (grad_w * grad_out).to(w_dtype)
        grad_b = None if grad_b is None else (grad_b * grad_out).to(b_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def linear_kd_loss(
    h_s: torch.Tensor,
    w_s: torch.Tensor,
    h_t: torch.Tensor,
    w_t: torch.Tensor,
    *,
    b_s: torch.Tensor | None = None,
    b_t: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    backend: str = "auto",
) -> torch.Tensor:
    """Mean over kept tokens of T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), z = h W^T + b.

    h: [..., D] (leading dims flattened to tokens; teacher and student may differ in D), w: [V, D],
    b: [V]; mask: bool over the leading shape, True = ignore the token. Gradients reach h_s, w_s
    and b_s; the teacher is detached. backend: "chunked" (never holds [tokens, V] logits, any
    device), "torch" (whole logits, the reference), or "auto" (chunked on every device: it is plain
    PyTorch, and on CPU too it measured faster and smaller than whole logits, benchmarks/kernels.md).
    """
    if h_s.shape[:-1] != h_t.shape[:-1]:
        raise ValueError(f"linear_kd_loss: h_s {tuple(h_s.shape)} and h_t {tuple(h_t.shape)} differ in tokens")
    for side, h, w, b in (("student", h_s, w_s, b_s), ("teacher", h_t, w_t, b_t)):
        if w.dim() != 2 or w.shape[1] != h.shape[-1]:
            raise ValueError(f"linear_kd_loss: {side} weight must be [V, {h.shape[-1]}], got {tuple(w.shape)}")
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"linear_kd_loss: {side} bias must be [{w.shape[0]}], got {tuple(b.shape)}")
    if w_s.shape[0] != w_t.shape[0]:
        raise ValueError(f"linear_kd_loss: vocabularies differ (student {w_s.shape[0]}, teacher {w_t.shape[0]})")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != h_s.shape[:-1]):
        raise ValueError(
            f"linear_kd_loss: mask must be bool {tuple(h_s.shape[:-1])} (True = ignore), "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    if not temperature > 0 or chunk_size < 1:
        raise ValueError(f"linear_kd_loss: need temperature > 0 and chunk_size >= 1, got {temperature}, {chunk_size}")
    if resolve_backend("linear_kd_loss", backend, h_s.device, BACKENDS, cpu_auto="chunked") == "torch":
        return linear_kd_reference(h_s, w_s, h_t, w_t, b_s=b_s, b_t=b_t, mask=mask, temperature=temperature)
    keep = None if mask is None else ~mask.reshape(-1)
    if not torch.is_grad_enabled():  # evaluation: skip the gradients the forward would accumulate
        h_s, w_s, b_s = h_s.detach(), w_s.detach(), None if b_s is None else b_s.detach()
    return _ChunkedLinearKD.apply(
        h_s.reshape(-1, h_s.shape[-1]), w_s, b_s,
        h_t.detach().reshape(-1, h_t.shape[-1]), w_t.detach(), None if b_t is None else b_t.detach(),
        keep, float(temperature), int(chunk_size),
    )
