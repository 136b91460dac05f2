"""Fused distillation loss kernels: Triton on CUDA, a PyTorch reference everywhere else.

- `attention_kd_loss`: KL between teacher and student attention maps, never materialised on the
  Triton path (FlashAttention-style recomputation).
- `linear_kd_loss`: KL between token distributions through the output projections, chunked so
  whole [tokens, vocab] logits never exist.
- `repr_kd_loss`: representation MSE over all mapped layer pairs in one call.
- `linear_cross_entropy`, `linear_ce_kd_loss`: the cross-entropy through the output projection,
  chunked the same way, alone or with `linear_kd_loss`'s KL in the same pass (the student's LM loss).
"""

from .attention_kd import attention_kd_loss
from .linear_ce import linear_ce_kd_loss, linear_cross_entropy
from .linear_kd import linear_kd_loss
from .repr_kd import repr_kd_loss

__all__ = ["attention_kd_loss", "linear_ce_kd_loss", "linear_cross_entropy", "linear_kd_loss", "repr_kd_loss"]
