"""Representation distillation over all mapped layer pairs of a module: sum over pairs of
MSE(h_s W^T + b, h_t), averaged over kept tokens and teacher channels.

Two forms give the same value: "torch" runs one linear and one MSE per pair; "fused" stacks the
pairs and runs them in one batched matmul (torch.baddbmm) and one reduction, when all pairs share
their shapes (fewer, larger kernels; the stacks cost one copy of the hidden states).
benchmarks/kernels.py times both; "auto" picks the one that measured faster there.
"""

from __future__ import annotations

import torch

from .reference import accumulate, repr_kd_separate

BACKENDS = ("fused", "torch")
# The form "auto" uses, per device type, from benchmarks/kernels.py (benchmarks/kernels.md): on CPU the
# stacked form was no faster (0.89-1.06x over three runs) and held up to 1.5x the memory, so the
# per-pair form stays the default; CUDA follows until a GPU run of the benchmark says otherwise.
AUTO_FORM = {"cpu": "torch", "cuda": "torch"}


def _stackable(h_s, h_t, weights, biases) -> bool:
    def same(xs):
        return len({(tuple(x.shape), x.dtype) for x in xs}) == 1

    return same(h_s) and same(h_t) and same(weights) and (
        all(b is None for b in biases) or (all(b is not None for b in biases) and same(biases))
    )


def repr_kd_fused(h_s, h_t, weights, biases, *, mask=None) -> torch.Tensor:
    """All pairs in one baddbmm over [L, B*N, D] stacks."""
    hs = torch.stack(h_s).flatten(1, 2)  # [L, B*N, Ds]
    ht = torch.stack([h.detach() for h in h_t]).flatten(1, 2)  # [L, B*N, Dt]
    w = torch.stack(weights).transpose(1, 2)  # [L, Ds, Dt]
    y = torch.bmm(hs, w) if biases[0] is None else torch.baddbmm(torch.stack(biases).unsqueeze(1), hs, w)
    err = (accumulate(y) - accumulate(ht)).pow(2).sum(-1)  # [L, B*N]
    if mask is None:
        return err.sum() / (err.shape[1] * ht.shape[-1])
    keep = ~mask.reshape(1, -1)
    return torch.where(keep, err, 0.0).sum() / (keep.sum().clamp(min=1) * ht.shape[-1])


def repr_kd_loss(
    h_s: list[torch.Tensor],
    h_t: list[torch.Tensor],
    weights: list[torch.Tensor],
    biases: list[torch.Tensor | None] | None = None,
    *,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Sum over layer pairs of mean((h_s W^T + b - h_t)^2) over kept tokens and channels.

    h_s[i] [B, N, Ds], h_t[i] [B, N, Dt], weights[i] [Dt, Ds], biases[i] [Dt] (or None);
    mask [B, N] bool, True = ignore the token. The teacher is detached. backend: "fused"
    (one batched matmul when the pairs share shapes, else per pair), "torch" (per pair) or "auto".
    """
    biases = [None] * len(weights) if biases is None else list(biases)
    if not h_s or not len(h_s) == len(h_t) == len(weights) == len(biases):
        raise ValueError(
            f"repr_kd_loss: need as many (>= 1) student states, teacher states, weights and biases, got "
            f"{len(h_s)}, {len(h_t)}, {len(weights)}, {len(biases)}"
        )
    for i, (hs, ht, w, b) in enumerate(zip(h_s, h_t, weights, biases)):
        if hs.dim() != 3 or ht.shape[:-1] != hs.shape[:-1] or tuple(w.shape) != (ht.shape[-1], hs.shape[-1]):
            raise ValueError(
                f"repr_kd_loss: pair {i}: need h_s [B, N, Ds], h_t [B, N, Dt], weight [Dt, Ds]; got "
                f"{tuple(hs.shape)}, {tuple(ht.shape)}, {tuple(w.shape)}"
            )
        if b is not None and tuple(b.shape) != (ht.shape[-1],):
            raise ValueError(f"repr_kd_loss: pair {i}: bias must be [{ht.shape[-1]}], got {tuple(b.shape)}")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != h_s[0].shape[:-1]):
        raise ValueError(
            f"repr_kd_loss: mask must be bool {tuple(h_s[0].shape[:-1])} (True = ignore), "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    if backend not in (*BACKENDS, "auto"):
        raise ValueError(f"repr_kd_loss: backend must be one of {('auto', *BACKENDS)}, got {backend!r}")
    if backend == "auto":
        backend = AUTO_FORM.get(h_s[0].device.type, "torch")
    if backend == "fused" and _stackable(h_s, h_t, weights, biases):
        return repr_kd_fused(h_s, h_t, weights, biases, mask=mask)
    return repr_kd_separate(h_s, h_t, weights, biases, mask=mask)
