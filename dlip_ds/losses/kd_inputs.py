"""What a task hands the KD plan: per model, the tensors distillation terms read; and the masks.

Typed, so that each field has one shape whatever the term reading it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class ItcSims:
    """One model's ITC similarities, local queries against the keys of every rank, over its temperature."""

    i2t: Tensor  # [B, K]
    t2i: Tensor  # [B, K]


@dataclass
class LMHeadInputs:
    """What the LM head multiplies: logits = features @ weight.T + bias (never formed whole by the KD)."""

    features: Tensor  # [B, L, D] after the prediction-head transform
    weight: Tensor  # [V, D]
    bias: Tensor | None  # [V]


@dataclass
class KDInputs:
    """What one model (student or teacher) produced in a step that distillation terms read."""

    taps: dict[str, dict] = field(default_factory=dict)  # module -> that stage's `taps`
    itc: ItcSims | None = None
    itm: Tensor | None = None  # [3B, 2] ITM logits on the pair plan
    lm: LMHeadInputs | None = None


@dataclass
class KDMasks:
    """Masks the KD terms apply, True = leave out; vision has none (every patch is real)."""

    text: Tensor | None = None  # [B, L] padding of the ITC text
    fusion: Tensor | None = None  # [3B, L] padding of the pair plan's texts
    decoder: Tensor | None = None  # [B, L'] padding of the decoder text
    lm: Tensor | None = None  # [B, L'] positions that predict no label

    def of(self, module: str) -> Tensor | None:
        return getattr(self, module, None)
