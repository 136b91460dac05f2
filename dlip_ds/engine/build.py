"""Building a run: the recipe fitted to its tokenizer, the teacher, the task (student + KD plan) and
the DeepSpeed engine around the task."""

from __future__ import annotations

import copy

import torch

from dlip_ds.config import ConfigError, Recipe
from dlip_ds.engine.ds_config import optimizer_offloaded, zero_stage
from dlip_ds.engine.optim import build_optimizer, build_scheduler, param_groups
from dlip_ds.engine.teacher import load_teacher, to_inference
from dlip_ds.losses.distill import KDPlan
from dlip_ds.models.init import init_student
from dlip_ds.models.vlp import VLPModel
from dlip_ds.tasks import task_class
from dlip_ds.tasks.base import Task


def quiet_deepspeed() -> None:
    """DeepSpeed logs its whole config and every overflow at INFO; the console line and TensorBoard
    report what matters. torch warns on every ZeRO reduce about a call DeepSpeed makes."""
    import logging
    import warnings

    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.* is deprecated", category=FutureWarning)


def fit_to_tokenizer(recipe: Recipe, tokenizer) -> Recipe:
    """A copy of `recipe` whose student predicts the tokenizer's ids (its vocabulary size is the
    tokenizer's), after checking what would otherwise crash later."""
    recipe = copy.deepcopy(recipe)
    student = recipe.student.model
    student.text.vocab_size = len(tokenizer)
    if recipe.data.max_length > student.text.max_positions:
        raise ConfigError(f"data.max_length={recipe.data.max_length} exceeds the student's "
                          f"text.max_positions={student.text.max_positions}")
    return recipe


def _check_teacher(recipe: Recipe, teacher: VLPModel) -> None:
    t_vocab, vocab = teacher.cfg.text.vocab_size, recipe.student.model.text.vocab_size
    if t_vocab != vocab:
        raise ConfigError(f"teacher.source {recipe.teacher.source}: vocabulary of {t_vocab} ids, but the "
                          f"tokenizer (data.tokenizer) has {vocab}; use the teacher's tokenizer")


def build_task(recipe: Recipe, device: torch.device) -> tuple[VLPModel | None, Task]:
    """(teacher or None, task): the frozen teacher on its inference engine, and the recipe's task
    holding the student and its KD plan, initialised identically on every rank. `recipe` is
    already fitted to its tokenizer."""
    torch.manual_seed(recipe.train.seed)
    cls = task_class(recipe.task)
    teacher = load_teacher(recipe.teacher) if recipe.teacher.source else None
    if teacher is not None:
        _check_teacher(recipe, teacher)
        cls.check_teacher(teacher, f"teacher.source {recipe.teacher.source}")
    if recipe.student.source:
        student = student_from_source(recipe, cls)
    else:
        student = VLPModel(recipe.student.model)
        init_student(student, recipe.student.init, teacher=teacher)  # from the fp32 teacher, before it is cast
    plan = KDPlan(recipe.loss.kd, student, teacher) if recipe.loss.kd else None
    if teacher is not None:
        teacher = to_inference(teacher, recipe.teacher, device)
    return teacher, cls(student, plan, recipe.loss)


def student_from_source(recipe: Recipe, cls: type[Task]) -> VLPModel:
    """The student a task fine-tunes: `student.source` (a trained model or a run directory) in the task's
    topology (`Task.adapt_student`), with the recipe's model fields (`student.overrides`) applied."""
    from dlip_ds.config import deep_merge, model_config_from_dict, to_dict
    from dlip_ds.engine.checkpoint import load_source_model
    from dlip_ds.models.weights import load_state_strict

    s = recipe.student
    if s.init.vision != "random" or s.init.text != "random":
        raise ConfigError("student.init applies to a student built from a preset; with student.source the "
                          "source's weights are the start")
    source = cls.adapt_student(load_source_model(s.source))
    vocab = recipe.student.model.text.vocab_size  # the tokenizer's (fit_to_tokenizer)
    if source.cfg.text.vocab_size != vocab:
        raise ConfigError(f"student.source {s.source}: vocabulary of {source.cfg.text.vocab_size} ids, but the "
                          f"tokenizer (data.tokenizer) has {vocab}; use the tokenizer the source was trained with")
    cfg = model_config_from_dict(deep_merge(to_dict(source.cfg), s.overrides), "student (source + overrides)")
    student = VLPModel(cls.student_config(cfg))
    load_state_strict(student, source.state_dict(), f"student.source {s.source}")
    return student


def _lift_scalar_params(module: torch.nn.Module) -> None:
    """Give 0-d parameters (the ITC temperature) shape [1]: DeepSpeed's initial broadcast views every
    parameter as bytes, which torch refuses for 0-d tensors. The export restores their shape."""
    for p in module.parameters():
        if p.dim() == 0:
            p.data = p.data.reshape(1)


def initialize_engine(task: Task, recipe: Recipe, ds_cfg: dict, device: torch.device):
    """deepspeed.initialize with AdamW over decay/no-decay groups and the warmup + cosine schedule."""
    import deepspeed

    cfg = recipe.train
    if device.type == "cpu" and ds_cfg.get("zero_optimization", {}).get("overlap_comm"):
        # No device streams to overlap on a CPU, and with gloo ZeRO-3's overlapped reduce aborts now
        # and then (std::terminate in about 1 of 6 two-rank runs here): run it in order.
        ds_cfg = {**ds_cfg, "zero_optimization": {**ds_cfg["zero_optimization"], "overlap_comm": False}}
    _lift_scalar_params(task)
    optimizer = build_optimizer(param_groups(task, cfg.weight_decay), cfg.lr,
                                offload=optimizer_offloaded(ds_cfg), device=device)
    scheduler = build_scheduler(optimizer, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                                max_steps=cfg.max_steps)
    engine, _, _, _ = deepspeed.initialize(model=task, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_cfg, dist_init_required=False)
    if zero_stage(ds_cfg) == 3 and task.student.cfg.decoder.enabled:
        # Tasks multiply by the LM projection outside the modules that own it.
        for p in task.student.lm_projection():
            deepspeed.zero.register_external_parameter(task, p)
    return engine
