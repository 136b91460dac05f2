"""Losses through output projections, chunked over tokens (Liger-Kernel's fused-linear idea).

`ChunkedLinearLosses` computes, chunk by chunk of tokens, the student's logits once and from them
the cross-entropy against targets (`linear_ce.py`) and/or the KL to the teacher's logits
(`linear_kd_loss` here), together with their gradients for h_s, w_s and b_s. So at most a few
[chunk_size, vocab] fp32 buffers exist at once, and autograd saves only those gradients.

Precision: logits, softmaxes and the per-chunk gradient d loss / d logits are fp32; that gradient
enters the matmuls unnormalised (|values| <= max(1, T)) and the 1/tokens factor is applied to the
fp32 products. The saved gradients stay fp32 until the backward has multiplied them by grad_out,
which carries DeepSpeed's fp16 loss scale; only then are they cast to the inputs' dtypes. (Casting
(p_s - p_t) / tokens to fp16 in the forward, before the loss scale, flushed small entries to zero
and rounded the rest coarsely: at vocabulary 30524, 1536 tokens and loss scale 2^10 the fp16
gradients of w_s were 17% off the fp32 ones, those of h_s 11%; now 0.02%, tests/test_kernels_precision.py.)
Matmul dtype (`reference.matmul_dtype`, which the references use too): the inputs' own on
accelerators (tensor cores, fp32 accumulation); fp32 on the CPU, whose fp16/bf16 GEMMs measured 4 to
70x slower than fp32 at these shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .dispatch import resolve_backend
from .reference import linear_kd_reference, matmul_dtype

BACKENDS = ("chunked", "torch")


@dataclass(frozen=True)
class ChunkOptions:
    temperature: float = 1.0  # KD: both sides' logits are divided by it; the KL is scaled by T^2
    label_smoothing: float = 0.0  # CE
    ignore_index: int = -100  # CE: targets equal to it are not scored
    chunk_size: int = 1024


def _log_softmax_(x: torch.Tensor) -> torch.Tensor:
    return x.sub_(x.logsumexp(-1, keepdim=True))


class _Grads:
    """One loss's gradients (for h over the selected tokens, w, b) in the accumulation dtype."""

    def __init__(self, rows: int, w: torch.Tensor, b: torch.Tensor | None, needs, acc: torch.dtype):
        need_h, need_w, need_b = needs
        new = lambda *shape: torch.zeros(*shape, dtype=acc, device=w.device)
        self.h = new(rows, w.shape[1]) if need_h else None
        self.w = new(*w.shape) if need_w else None
        self.b = new(w.shape[0]) if need_b and b is not None else None

    def add(self, g: torch.Tensor, rows: slice, hs: torch.Tensor, w: torch.Tensor) -> None:
        """g: [chunk, V] fp32 gradient of the loss sum in the logits of `rows`; hs, w in the matmul dtype."""
        gm = g.to(w.dtype)
        if self.h is not None:
            self.h[rows] = gm @ w
        if self.w is not None:
            self.w += gm.t() @ hs
        if self.b is not None:
            self.b += g.sum(0)

    def tensors(self, factor: float) -> tuple:
        return tuple(None if x is None else x.mul_(factor) for x in (self.h, self.w, self.b))


def _ce_chunk(z, y, valid, eps: float, grads: _Grads | None, rows, hs, w, keep_z: bool) -> torch.Tensor:
    """Sum over valid rows of the label-smoothed cross-entropy of logits z [c, V] (overwritten unless keep_z)."""
    lse = z.logsumexp(-1)
    y = torch.where(valid, y, 0)  # ignored targets read class 0 and weigh nothing
    # -log p_y = lse - z_y; the smoothing part is the mean over classes of -log p = lse - mean(z)
    loss = lse - (1 - eps) * z.gather(1, y[:, None]).squeeze(1) - eps * z.mean(-1)
    if grads is not None:  # softmax(z) - (1 - eps) onehot(y) - eps / V
        g = (z - lse[:, None] if keep_z else z.sub_(lse[:, None])).exp_().sub_(eps / z.shape[1])
        g.scatter_add_(1, y[:, None], torch.full_like(g[:, :1], eps - 1)).mul_(valid[:, None])
        grads.add(g, rows, hs, w)
    return torch.where(valid, loss, 0.0).sum()


def _kd_chunk(z, z_t, keep, temperature: float, grads: _Grads | None, rows, hs, w) -> torch.Tensor:
    """Sum over kept rows of KL(softmax(z_t / T) || softmax(z / T)) (z and z_t are overwritten)."""
    logp_s, logp_t = _log_softmax_(z.div_(temperature)), _log_softmax_(z_t.div_(temperature))
    p_t = logp_t.exp()
    kl = logp_t.sub_(logp_s).mul_(p_t).sum(-1)
    if grads is not None:  # d(T^2 KL) / dz_s = T (p_s - p_t)
        grads.add(logp_s.exp_().sub_(p_t).mul_(temperature * keep[:, None]), rows, hs, w)
    return torch.where(keep, kl, 0.0).sum()


class ChunkedLinearLosses(torch.autograd.Function):
    """(CE, KD) of the student's logits h_s w_s^T + b_s: CE against `targets` (None: off), KD against
    the teacher's h_t w_t^T + b_t (h_t None: off) on the tokens where `kd_keep` (None: all). h: [N, D]."""

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, targets, kd_keep, opts: ChunkOptions):
        ctx.set_materialize_grads(False)
        ce_on, kd_on, tokens = targets is not None, h_t is not None, h_s.shape[0]
        ce_keep = targets != opts.ignore_index if ce_on else None
        every_token = kd_on and kd_keep is None and not ce_on  # KD on all tokens: no selection, no host sync
        if kd_on and kd_keep is None:
            kd_keep = torch.ones(tokens, dtype=torch.bool, device=h_s.device)
        idx = None
        if not every_token:
            idx = (ce_keep if not kd_on else kd_keep if not ce_on else ce_keep | kd_keep).nonzero().squeeze(1)
            if idx.numel() < tokens:  # only the tokens some loss scores
                h_s = h_s.index_select(0, idx)
                h_t, targets, ce_keep, kd_keep = (None if x is None else x.index_select(0, idx)
                                                  for x in (h_t, targets, ce_keep, kd_keep))
        n = h_s.shape[0]
        n_ce, n_kd = (0 if k is None else tokens if every_token else int(k.sum()) for k in (ce_keep, kd_keep))
        acc, needs = torch.promote_types(h_s.dtype, torch.float32), ctx.needs_input_grad[:3]
        grads = [_Grads(n, w_s, b_s, needs, acc) if on and any(needs) else None for on in (ce_on, kd_on)]
        mm_s = matmul_dtype(h_s.device, h_s.dtype)
        w_mm, b_mm = w_s.to(mm_s), None if b_s is None else b_s.to(mm_s)
        if kd_on:
            mm_t = matmul_dtype(h_t.device, h_t.dtype)
            wt_mm, bt_mm = w_t.to(mm_t), None if b_t is None else b_t.to(mm_t)
        sums = [torch.zeros((), dtype=acc, device=h_s.device) for _ in range(2)]
        for start in range(0, n, opts.chunk_size):
            rows = slice(start, start + opts.chunk_size)
            hs = h_s[rows].to(mm_s)
            z = F.linear(hs, w_mm, b_mm).to(acc)  # this chunk's student logits serve both losses
            if ce_on:
                sums[0] += _ce_chunk(z, targets[rows], ce_keep[rows], opts.label_smoothing, grads[0], rows, hs, w_mm,
                                     keep_z=kd_on)
            if kd_on:
                z_t = F.linear(h_t[rows].to(mm_t), wt_mm, bt_mm).to(acc)
                sums[1] += _kd_chunk(z, z_t, kd_keep[rows], opts.temperature, grads[1], rows, hs, w_mm)
                del z_t
            del z  # free this chunk's logits before the next chunk's exist
        t2 = opts.temperature**2
        saved = [*(grads[0].tensors(1 / max(n_ce, 1)) if grads[0] else (None,) * 3),
                 *(grads[1].tensors(1 / max(n_kd, 1)) if grads[1] else (None,) * 3)]
        ctx.save_for_backward(idx if n < tokens else None, *saved)
        ctx.meta = (tokens, h_s.dtype, w_s.dtype, None if b_s is None else b_s.dtype)
        return sums[0] / max(n_ce, 1), sums[1] * (t2 / max(n_kd, 1))

    @staticmethod
    def backward(ctx, grad_ce, grad_kd):
        idx, *saved = ctx.saved_tensors
        tokens, h_dtype, w_dtype, b_dtype = ctx.meta
        out = [None, None, None]
        for grad_out, gs in ((grad_ce, saved[:3]), (grad_kd, saved[3:])):
            if grad_out is None:
                continue
            for i, g in enumerate(gs):  # fp32 gradient times grad_out (the loss scale) before any cast
                if g is not None:
                    out[i] = g * grad_out if out[i] is None else out[i].addcmul_(g, grad_out)
        grad_h, grad_w, grad_b = out
        if grad_h is not None:
            grad_h = grad_h.to(h_dtype)
            if idx is not None:
                grad_h = grad_h.new_zeros(tokens, grad_h.shape[1]).index_copy_(0, idx, grad_h)
        grad_w = None if grad_w is None else grad_w.to(w_dtype)
        grad_b = None if grad_b is None else grad_b.to(b_dtype)
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
    PyTorch, and on CPU too it measured faster and smaller than whole logits, benchmarks/README.md).
    """
    check_projection("linear_kd_loss", "student", h_s, w_s, b_s)
    check_teacher("linear_kd_loss", h_s, w_s, h_t, w_t, b_t, temperature)
    if mask is not None and (mask.dtype != torch.bool or mask.shape != h_s.shape[:-1]):
        raise ValueError(
            f"linear_kd_loss: mask must be bool {tuple(h_s.shape[:-1])} (True = ignore), "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"linear_kd_loss: need chunk_size >= 1, got {chunk_size}")
    if resolve_backend("linear_kd_loss", backend, h_s.device, BACKENDS, cpu_auto="chunked") == "torch":
        return linear_kd_reference(h_s, w_s, h_t, w_t, b_s=b_s, b_t=b_t, mask=mask, temperature=temperature)
    keep = None if mask is None else ~mask.reshape(-1)
    h_s, w_s, b_s = student_inputs(h_s, w_s, b_s)
    _, kd = ChunkedLinearLosses.apply(
        h_s, w_s, b_s, h_t.detach().reshape(-1, h_t.shape[-1]), w_t.detach(), None if b_t is None else b_t.detach(),
        None, keep, ChunkOptions(temperature=float(temperature), chunk_size=int(chunk_size)),
    )
    return kd


def check_projection(op: str, side: str, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    if w.dim() != 2 or w.shape[1] != h.shape[-1]:
        raise ValueError(f"{op}: {side} weight must be [V, {h.shape[-1]}], got {tuple(w.shape)}")
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"{op}: {side} bias must be [{w.shape[0]}], got {tuple(b.shape)}")


def check_teacher(op: str, h_s, w_s, h_t, w_t, b_t, temperature: float) -> None:
    """The teacher side of an LM distillation: the student's tokens and vocabulary, T > 0."""
    if h_s.shape[:-1] != h_t.shape[:-1]:
        raise ValueError(f"{op}: h_s {tuple(h_s.shape)} and h_t {tuple(h_t.shape)} differ in tokens")
    check_projection(op, "teacher", h_t, w_t, b_t)
    if w_s.shape[0] != w_t.shape[0]:
        raise ValueError(f"{op}: vocabularies differ (student {w_s.shape[0]}, teacher {w_t.shape[0]})")
    if not temperature > 0:
        raise ValueError(f"{op}: need temperature > 0, got {temperature}")


def student_inputs(h, w, b):
    """h flattened to [tokens, D]; all detached when gradients are off (evaluation: the forward then
    skips the gradients it would accumulate)."""
    if not torch.is_grad_enabled():
        h, w, b = h.detach(), w.detach(), None if b is None else b.detach()
    return h.reshape(-1, h.shape[-1]), w, b
