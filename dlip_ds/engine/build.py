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
    teacher = load_teacher(recipe.teacher) if recipe.teacher.source else None
    if teacher is not None:
        _check_teacher(recipe, teacher)
    student = VLPModel(recipe.student.model)
    init_student(student, recipe.student.init, teacher=teacher)  # from the fp32 teacher, before it is cast
    plan = KDPlan(recipe.loss.kd, student, teacher) if recipe.loss.kd else None
    if teacher is not None:
        teacher = to_inference(teacher, recipe.teacher, device)
    return teacher, task_class(recipe.task)(student, plan, recipe.loss)


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
