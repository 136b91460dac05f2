"""AdamW over decay / no-decay parameter groups and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

# timm's convention: position embeddings and class tokens are not decayed, like norms and biases.
_NO_DECAY_SUFFIXES = ("pos_embed", "cls_token", "position_embeddings.weight")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices decay; norms, biases, scalars (temperature) and positions do not."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(_NO_DECAY_SUFFIXES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(groups: list[dict], lr: float, *, offload: bool, device: torch.device) -> torch.optim.Optimizer:
    """torch AdamW (fused on CUDA); DeepSpeed's CPU Adam when ZeRO offloads the optimizer to the CPU."""
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=lr, fused=device.type == "cuda")


def warmup_cosine(warmup_steps: int, max_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup from 0, then cosine from 1 down to min_lr / lr at max_steps.

    A plain function on purpose: LambdaLR checkpoints no state for functions, so a resumed run keeps
    its step count (from the checkpoint) but follows its own recipe's schedule (e.g. a longer max_steps).
    """

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        span = max(1, max_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, *, lr: float, min_lr: float, warmup_steps: int,
                    max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, max_steps, min_lr / lr))
