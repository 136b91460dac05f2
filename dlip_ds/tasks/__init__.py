"""Tasks: one module per kind of training step (`task:` in a recipe).

A task is the `nn.Module` that `deepspeed.initialize` wraps. It owns the student, the KD plan (with
its projections) and any loss state (feature queues), declares its batch as a dataclass, runs teacher
and student through the model's stage methods and returns typed losses and KD inputs
(`dlip_ds.tasks.base`). Without a teacher the same task is the no-distillation baseline.

Adding a task: a module here with a `Task` subclass, one line in `_REGISTRY`, a recipe and a test.
The registry holds import paths so that reading a recipe does not import torch.
"""

from __future__ import annotations

import importlib

_REGISTRY = {
    "pretrain": "dlip_ds.tasks.pretrain:PretrainTask",
    "retrieval": "dlip_ds.tasks.retrieval:RetrievalTask",
    "captioning": "dlip_ds.tasks.captioning:CaptioningTask",
    "vqa": "dlip_ds.tasks.vqa:VQATask",
}
TASKS: tuple[str, ...] = tuple(_REGISTRY)


def task_class(name: str):
    """The `Task` subclass registered under `name` (a recipe's `task:`)."""
    if name not in _REGISTRY:
        raise KeyError(f"no task '{name}'; tasks: {', '.join(TASKS)}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)
