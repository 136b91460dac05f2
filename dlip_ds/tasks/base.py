"""What every task shares: its batch, the typed hand-off to the KD plan, and the weighted sum.

A task's `compute` runs teacher and student and returns a `TaskOutput`: its own unweighted losses,
and for each model a `KDInputs` that holds what the distillation terms may read. `Task.forward`
adds the plan's terms and weighs everything into the one scalar DeepSpeed back-propagates.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from dlip_ds.config import LOGITS, MODULES, ConfigError, LossConfig, ModelConfig
from dlip_ds.losses.kd_inputs import KDInputs, KDMasks
from dlip_ds.models.vlp import MomentumMaster, VLPModel
from dlip_ds.timing import SpanTimer

# --------------------------------------------------------------------------- batches


@dataclass
class TaskBatch:
    """Base of a task's batch: tensors named as the loader's dict keys (docs/architecture.md §3)."""

    @classmethod
    def from_dict(cls, batch: dict) -> TaskBatch:
        """The fields this task reads; keys it does not read (captions, counts) are left out."""
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in batch:
                values[f.name] = batch[f.name]
            elif f.default is dataclasses.MISSING:
                raise KeyError(f"batch has no '{f.name}', which the {cls.__name__} needs; batches are described "
                               "in docs/architecture.md section 3")
        return cls(**values)

    def to(self, device: torch.device, float_dtype: torch.dtype | None = None) -> TaskBatch:
        """Tensors onto `device`; float tensors (images) in `float_dtype` when given. The trainer keeps
        them fp32: each model casts its own inputs (a bf16 student must not hand an fp32 teacher
        rounded pixels)."""
        def move(value):
            if not isinstance(value, Tensor):
                return value
            value = value.to(device, non_blocking=True)
            return value.to(float_dtype) if float_dtype is not None and value.is_floating_point() else value

        return dataclasses.replace(self, **{f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def require(self, name: str, why: str) -> Tensor:
        """A field that this step needs although the batch type makes it optional."""
        value = getattr(self, name)
        if value is None:
            raise KeyError(f"batch has no '{name}' ({why}); batches are described in docs/architecture.md section 3")
        return value


@dataclass
class TaskOutput:
    losses: dict[str, Tensor]  # the task's own terms, unweighted (e.g. itc, itm, lm)
    weights: dict[str, float]  # the weight of each of them
    tokens: Tensor  # non-padding text tokens of this rank's batch (for tokens/s)
    student: KDInputs
    teacher: KDInputs | None = None  # None when no teacher ran
    masks: KDMasks = field(default_factory=KDMasks)


@dataclass
class StepResult:
    loss: Tensor  # the scalar to back-propagate
    # detached scalars: "raw/<term>" unweighted, "weighted/<term>" as summed into `loss`
    terms: dict[str, Tensor]
    tokens: Tensor


def unwrap(teacher):
    """The model inside a DeepSpeed InferenceEngine (which keeps it as `.module`)."""
    return teacher.module if hasattr(teacher, "module") and not isinstance(teacher, VLPModel) else teacher


# --------------------------------------------------------------------------- the task


class Task(nn.Module):
    """Owns the student, the KD plan (None: no distillation) and the loss state (with a momentum
    student, the fp32 master of its EMA: `momentum_master`); the frozen teacher is passed to each call
    and is never part of this module, so ZeRO neither shards nor saves it.

    Subclasses set `name` and `batch_type` and implement `compute`; the class attributes below say
    what else the run needs to know about the task.
    """

    name: ClassVar[str]
    batch_type: ClassVar[type[TaskBatch]]
    stream: ClassVar[str] = "captions"  # the loader that feeds it: "captions" (image-text pairs) or "vqa"
    metric: ClassVar[str] = "r_mean"  # the evaluation metric that picks the best checkpoint (higher is better)
    kd_keys: ClassVar[tuple[str, ...]] = MODULES + LOGITS  # what its KD inputs carry (terms on others are refused)

    @classmethod
    def student_config(cls, cfg: ModelConfig) -> ModelConfig:
        """The topology this task trains, given a source model's (student.source); unchanged by default."""
        return cfg

    @classmethod
    def adapt_student(cls, model: VLPModel) -> VLPModel:
        """A trained model (student.source) in this task's topology, its weights carried over."""
        return model

    @classmethod
    def check_teacher(cls, teacher: VLPModel, where: str) -> None:
        """What this task needs of a teacher's topology (a ConfigError naming `where` otherwise)."""

    def __init__(self, student: nn.Module, plan: nn.Module | None, loss_cfg: LossConfig):
        super().__init__()
        self.student = student
        self.plan = plan
        self.loss_cfg = loss_cfg
        # the fp32 EMA behind the student's momentum copies (which train in the engine's dtype)
        momentum = getattr(getattr(student, "cfg", None), "momentum", False)
        self.momentum_master = MomentumMaster(student) if momentum else None
        self.timer = SpanTimer()  # the trainer enables it on logging steps
        self.step = 0  # optimizer steps applied before this one; the trainer sets it (loss schedules read it)
        for i, r in enumerate(plan.terms if plan is not None else ()):
            self.check_model(r.term.module in self.kd_keys,
                             f"loss.kd[{i}] ({r.name}): the {self.name} task produces no '{r.term.module}' to "
                             f"distil; its terms may read {', '.join(self.kd_keys)}")

    def check_model(self, condition: bool, message: str) -> None:
        """A model-dependent requirement of the recipe, checked when the task is built."""
        if not condition:
            raise ConfigError(message)

    def forward(self, batch: TaskBatch | dict, teacher=None, generator: torch.Generator | None = None) -> StepResult:
        if isinstance(batch, dict):
            batch = self.batch_type.from_dict(batch)
        out = self.compute(batch, unwrap(teacher) if teacher is not None else None, generator)
        losses, weights = dict(out.losses), dict(out.weights)
        if self.plan is not None:
            if out.teacher is None:
                raise ValueError("this step distils (loss.kd) but no teacher was given")
            losses.update(self.plan(out.student, out.teacher, out.masks))
            weights.update(self.plan.weights)
        weighted = {name: weights[name] * value for name, value in losses.items()}
        terms = {f"raw/{n}": v.detach() for n, v in losses.items()}
        terms.update({f"weighted/{n}": v.detach() for n, v in weighted.items()})
        return StepResult(loss=sum(weighted.values()), terms=terms, tokens=out.tokens.detach())

    def compute(self, batch: TaskBatch, teacher, generator: torch.Generator | None) -> TaskOutput:
        raise NotImplementedError
