"""The training loop: a frozen teacher beside a DeepSpeed student, read top to bottom.

    setup   process group, tokenizer, recipe checks, teacher (inference engine), student + KD plan
            inside a StepModule, AdamW + warmup/cosine, deepspeed.initialize, resume
    loop    per optimizer step: grad_accum micro-batches of (data -> forward -> backward -> step);
            non-finite losses are dropped and counted, non-finite gradients make DeepSpeed skip the
            update (counted); logs every train.log_every steps; checkpoints every train.ckpt_every
            steps, on SIGTERM / SIGUSR1 / RUN_DIR/STOP, and at the end
    finish  the student consolidated in fp32 and exported to RUN_DIR/student

Exact resume: the data stream is a function of (seed, rank, start position), so the loader is
restarted at the data position after every checkpoint. A run resumed from a checkpoint therefore
sees exactly the batches the uninterrupted run saw after that checkpoint, and with the restored
model, optimizer, scheduler, loss scaler and RNG states it follows the same loss curve.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dlip_ds.config import ConfigError, Recipe, check_local_shards, save_recipe
from dlip_ds.engine.checkpoint import (
    INTERRUPTED_FILE,
    CheckpointManager,
    StopRequest,
    TrainState,
    export_student,
    student_from_state,
)
from dlip_ds.engine.distributed import (
    DistEnv,
    any_rank,
    barrier,
    init_distributed,
    limit_cpu_threads,
    mean_over_ranks,
)
from dlip_ds.engine.ds_config import (
    compute_dtype,
    optimizer_offloaded,
    resolve_ds_config,
    zero_stage,
)
from dlip_ds.engine.logging import Monitor
from dlip_ds.engine.optim import build_optimizer, build_scheduler, param_groups
from dlip_ds.engine.teacher import StageClock, load_teacher, to_inference


@dataclass
class StepTimes:
    """Seconds per optimizer step, split as the issue asks."""

    data: float = 0.0
    teacher: float = 0.0
    student: float = 0.0  # student forward + backward (the forward's teacher time removed)
    optimizer: float = 0.0


@dataclass
class Window:
    """Sums over the steps since the last log line."""

    steps: int = 0
    terms: Counter = field(default_factory=Counter)
    loss: float = 0.0
    micro: int = 0
    tokens: float = 0.0
    times: StepTimes = field(default_factory=StepTimes)
    skipped: Counter = field(default_factory=Counter)  # this rank's skipped samples by reason
    start: float = field(default_factory=time.perf_counter)


# --------------------------------------------------------------------------- setup helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Tensors onto the device; float tensors (images) in the engine's compute dtype."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if value.is_floating_point():
                value = value.to(dtype)
        out[key] = value
    return out


def _check_recipe(recipe: Recipe, tokenizer, teacher) -> None:
    """Fit the student's vocabulary to the tokenizer; fail early on mismatches that would crash later."""
    student = recipe.student.model
    vocab = len(tokenizer)
    student.text.vocab_size = vocab  # the LM head predicts tokenizer ids: its size is the tokenizer's
    if recipe.data.max_length > student.text.max_positions:
        raise ConfigError(f"data.max_length={recipe.data.max_length} exceeds the student's "
                          f"text.max_positions={student.text.max_positions}")
    if teacher is not None:
        t_vocab = teacher.cfg.text.vocab_size
        if t_vocab != vocab:
            raise ConfigError(f"teacher.source {recipe.teacher.source}: vocabulary of {t_vocab} ids, but the "
                              f"tokenizer (data.tokenizer) has {vocab}; use the teacher's tokenizer")


def _build_student(recipe: Recipe, teacher):
    from dlip_ds.models.checkpoints import init_student
    from dlip_ds.models.vlp import VLPModel

    student = VLPModel(recipe.student.model)
    init_student(student, recipe.student.init, teacher=teacher)  # also fills momentum copies
    return student


def _lift_scalar_params(module: torch.nn.Module) -> None:
    """Give 0-d parameters (the ITC temperature) shape [1]: DeepSpeed's initial broadcast views every
    parameter as bytes, which torch refuses for 0-d tensors. The export restores their shape."""
    for p in module.parameters():
        if p.dim() == 0:
            p.data = p.data.reshape(1)


def _momentum_update(student, zero3: bool) -> None:
    """BLIP's EMA of the momentum encoders. Under ZeRO-3 the parameters are shards: gather the
    encoders, update on every rank alike, and let rank 0's result be written back into the shards."""
    if not zero3:
        student.momentum_update()
        return
    import deepspeed

    params = [p for name, p in student.named_parameters() if name.split(".")[0] in ("momentum", "vision", "text", "itc")]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        student.momentum_update()


def _quiet_deepspeed() -> None:
    """DeepSpeed logs its whole config and every overflow at INFO; the console line and TensorBoard
    report what matters. torch warns on every ZeRO reduce about a call DeepSpeed makes."""
    import logging
    import warnings

    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.* is deprecated", category=FutureWarning)


def _loss_scale(engine) -> float:
    opt = engine.optimizer
    scale = getattr(opt, "cur_scale", None)
    if scale is None and hasattr(opt, "loss_scale_config"):
        scale = opt.loss_scale_config.cur_scale
    return float(scale) if scale is not None else 1.0


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def _peak_memory_gib() -> float:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().max_memory_allocated() / 2**30


def _gather_counts(counts: Counter) -> Counter:
    """Sum of every rank's counts (reasons may differ between ranks)."""
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, dict(counts))
    total: Counter = Counter()
    for part in gathered:
        total.update(part)
    return total


def _evaluate(recipe: Recipe, student, eval_set, tokenizer, env: DistEnv, zero3: bool) -> dict:
    """Retrieval metrics (ITC ranking, ITM re-rank of the top 16) of an fp32 copy of the student, on
    rank 0; every rank takes part in gathering ZeRO-3 shards for the copy."""
    import deepspeed

    from dlip_ds.eval.retrieval import evaluate_retrieval

    metrics: dict = {}
    with deepspeed.zero.GatheredParameters(list(student.parameters()), enabled=zero3):
        if env.is_main:
            state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    if env.is_main:
        model = student_from_state(student.cfg, state, "the training student").to(env.device)
        metrics = evaluate_retrieval(model, eval_set, tokenizer, k=16, batch_size=recipe.data.batch_size,
                                     device=env.device, rank=0, world_size=1, progress=False)
    barrier()
    return metrics


def build_step_module(recipe: Recipe, tokenizer, device: torch.device):
    """(teacher or None, StepModule): the frozen teacher on its inference engine, and the student
    with its KD plan, initialised identically on every rank."""
    from dlip_ds.engine.step import StepModule
    from dlip_ds.losses.distill import KDPlan

    torch.manual_seed(recipe.train.seed)
    teacher = load_teacher(recipe.teacher) if recipe.teacher.source else None
    _check_recipe(recipe, tokenizer, teacher)
    student = _build_student(recipe, teacher)  # from the fp32 teacher, before it is cast
    plan = KDPlan(recipe.loss.kd, student, teacher) if recipe.loss.kd else None
    if teacher is not None:
        teacher = to_inference(teacher, recipe.teacher, device)
    return teacher, StepModule(student, plan, recipe.loss)


def initialize_engine(module, recipe: Recipe, ds_cfg: dict, device: torch.device):
    """deepspeed.initialize with AdamW over decay/no-decay groups and the warmup + cosine schedule."""
    import deepspeed

    cfg = recipe.train
    if device.type == "cpu" and ds_cfg.get("zero_optimization", {}).get("overlap_comm"):
        # No device streams to overlap on a CPU, and with gloo ZeRO-3's overlapped reduce aborts now
        # and then (std::terminate in about 1 of 6 two-rank runs here): run it in order.
        ds_cfg = {**ds_cfg, "zero_optimization": {**ds_cfg["zero_optimization"], "overlap_comm": False}}
    _lift_scalar_params(module)
    optimizer = build_optimizer(param_groups(module, cfg.weight_decay), cfg.lr,
                                offload=optimizer_offloaded(ds_cfg), device=device)
    scheduler = build_scheduler(optimizer, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                                max_steps=cfg.max_steps)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_cfg, dist_init_required=False)
    student = module.student
    if zero_stage(ds_cfg) == 3 and student.cfg.decoder.enabled:
        # StepModule multiplies by the LM projection outside the modules that own it.
        for p in student.lm_projection():
            deepspeed.zero.register_external_parameter(module, p)
    return engine


# --------------------------------------------------------------------------- the run


def train(recipe: Recipe, run_dir: str | Path, *, ds_config: str, resume: str | None = None) -> int:
    """Run (or resume) one training job; every rank calls this. Returns the process exit code."""
    from dlip_ds.data import load_eval_set, make_train_loader, tokenizer_from_config

    _quiet_deepspeed()
    env = init_distributed()
    if env.device.type == "cpu":
        limit_cpu_threads(recipe.data.workers)
    run_dir = Path(run_dir)
    cfg = recipe.train
    check_local_shards(recipe.data.train_shards, "data.train_shards")
    ds_cfg = resolve_ds_config(ds_config, recipe, env.world_size)
    stage, dtype = zero_stage(ds_cfg), compute_dtype(ds_cfg)
    tokenizer = tokenizer_from_config(recipe.data)

    # ---- models: the teacher frozen, the student (and the KD projections) trained
    teacher, module = build_step_module(recipe, tokenizer, env.device)
    student = module.student
    teacher_clock = StageClock(teacher, env.device) if teacher is not None else None
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run_dir / "config.yaml")
    engine = initialize_engine(module, recipe, ds_cfg, env.device)

    # ---- resume
    ckpt = CheckpointManager(run_dir / "checkpoints", rank=env.rank, keep_last=cfg.keep_last)
    generator = torch.Generator(device=env.device).manual_seed(cfg.seed + env.rank)  # hard negatives
    torch.manual_seed(cfg.seed + 1 + env.rank)  # per-rank dropout / drop-path streams
    state = TrainState()
    found = ckpt.resolve(resume) if resume else None
    if found is not None:
        state = ckpt.load(engine, *found, generator)
    stop = StopRequest(run_dir)
    barrier()
    if env.is_main:
        stop.clear()
        (run_dir / INTERRUPTED_FILE).unlink(missing_ok=True)
    barrier()

    monitor = Monitor(run_dir, enabled=env.is_main, start_step=state.step, max_steps=cfg.max_steps,
                      log_every=cfg.log_every)
    monitor.text("config", "```yaml\n" + (run_dir / "config.yaml").read_text() + "\n```" if env.is_main else "")
    monitor.print(
        f"{'resuming at step ' + str(state.step) + ' from ' + str(found[0] / found[1]) if found else 'starting'}: "
        f"{recipe.name or 'run'} on {env.world_size} rank(s) ({env.device.type}), ZeRO-{stage}, {dtype}, "
        f"global batch {ds_cfg['train_batch_size']}, {cfg.max_steps} steps, run dir {run_dir}"
    )
    eval_set = None
    if cfg.eval_every > 0 and recipe.data.eval_shards and env.is_main:
        eval_set = load_eval_set(recipe.data.eval_shards, max_words=recipe.data.max_words)

    def new_loader():
        loader = make_train_loader(recipe.data, tokenizer, student.cfg.vision, rank=env.rank,
                                   world_size=env.world_size, seed=cfg.seed, start_step=state.micro_batches)
        return iter(loader)

    batches = new_loader()
    global_batch = ds_cfg["train_batch_size"]
    window = Window()
    bad_in_a_row = 0  # non-finite losses and skipped updates since the last applied update
    stop_reason = None
    exit_code = 0
    last_saved = state.step if found else -1

    # ---- the loop
    while state.step < cfg.max_steps:
        times = StepTimes()
        for _ in range(cfg.grad_accum):
            while True:  # until a micro-batch with a finite loss has been back-propagated
                t0 = time.perf_counter()
                batch = next(batches)
                state.micro_batches += 1
                window.skipped.update(batch.pop("skipped", None) or {})
                batch = _to_device(batch, env.device, dtype)
                _sync(env.device)
                t1 = time.perf_counter()
                times.data += t1 - t0
                result = engine(batch, teacher=teacher, generator=generator)
                if any_rank(not bool(torch.isfinite(result.loss)), env.device):
                    # Dropped on every rank alike, before backward: nothing was accumulated from it.
                    state.skipped_steps += 1
                    bad_in_a_row += 1
                    monitor.print(f"step {state.step}: non-finite loss, micro-batch skipped "
                                  f"({bad_in_a_row} non-finite in a row)")
                    if bad_in_a_row > cfg.max_nonfinite:
                        break
                    continue
                engine.backward(result.loss)
                _sync(env.device)
                times.student += time.perf_counter() - t1
                window.loss += float(result.loss.detach())
                window.terms.update({k: float(v) for k, v in result.terms.items()})
                window.tokens += float(result.tokens)
                window.micro += 1
                if not engine.is_gradient_accumulation_boundary():
                    engine.step()  # no update inside the window; DeepSpeed only counts the micro step
                break
            if bad_in_a_row > cfg.max_nonfinite:
                break
        if bad_in_a_row > cfg.max_nonfinite:
            stop_reason, exit_code = "non-finite", 1
            monitor.print(f"stopping: {bad_in_a_row} non-finite steps in a row exceed train.max_nonfinite="
                          f"{cfg.max_nonfinite}; the last good state is checkpointed. Lower train.lr, check the "
                          "data, or use bf16 instead of fp16.")
        else:
            t2 = time.perf_counter()
            engine.step()
            _sync(env.device)
            times.optimizer += time.perf_counter() - t2
            state.step += 1
            state.samples += global_batch
            if engine.was_step_applied():
                bad_in_a_row = 0
                if student.cfg.momentum:
                    _momentum_update(student, stage == 3)
            else:  # DeepSpeed found inf/nan gradients (normal while an fp16 loss scale settles)
                state.skipped_steps += 1
                bad_in_a_row += 1
            if teacher_clock is not None:
                times.teacher = teacher_clock.take()
                times.student -= times.teacher
            window.steps += 1
            for name in ("data", "teacher", "student", "optimizer"):
                setattr(window.times, name, getattr(window.times, name) + getattr(times, name))
            monitor.advance(state.step, window.loss / max(1, window.micro))

            if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
                _log(monitor, engine, state, window, env, global_batch)
                window = Window()
            if cfg.eval_every > 0 and state.step % cfg.eval_every == 0 and recipe.data.eval_shards:
                metrics = _evaluate(recipe, student, eval_set, tokenizer, env, stage == 3)
                monitor.scalars(state.step, {f"eval/{k}": v for k, v in metrics.items()})
                monitor.print(f"step {state.step} eval: " + " ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
            if stop_reason is None and any_rank(stop.requested() is not None, env.device):
                stop_reason = stop.requested() or "another rank's signal"

        due = stop_reason is not None or state.step % cfg.ckpt_every == 0 or state.step == cfg.max_steps
        if due and last_saved != state.step:
            state.skipped_samples = dict(Counter(state.skipped_samples) + _gather_counts(window.skipped))
            window.skipped = Counter()
            tag = ckpt.save(engine, state, generator)
            last_saved = state.step
            monitor.print(f"step {state.step}: checkpoint {ckpt.dir / tag}")
            if stop_reason is None:
                batches = new_loader()  # same stream as a run resumed from this checkpoint
        if stop_reason is not None:
            break

    if stop_reason is not None:
        if stop_reason != "non-finite" and env.is_main:
            (run_dir / INTERRUPTED_FILE).write_text(f"{stop_reason} at step {state.step}\n")
        monitor.print(f"stopped at step {state.step} ({stop_reason}); resume with --resume auto")
        monitor.close()
        return exit_code

    # ---- finish: the consolidated fp32 student, in the exported-model format
    if last_saved != state.step:
        ckpt.save(engine, state, generator)
    if env.is_main:
        out = export_student(student.cfg, ckpt.dir, ckpt.latest_tag(), run_dir / "student", tokenizer)
        monitor.print(f"done: {state.step} steps, {state.skipped_steps} skipped; student exported to {out}")
    barrier()
    monitor.close()
    return 0


def _log(monitor: Monitor, engine, state: TrainState, window: Window, env: DistEnv, global_batch: int) -> None:
    """Average the window over micro-batches and ranks, then write TensorBoard and the console line."""
    names = sorted(window.terms)
    local = torch.tensor([window.loss / max(1, window.micro)] + [window.terms[n] / max(1, window.micro) for n in names]
                         + [window.tokens], dtype=torch.float64, device=env.device)
    reduced = mean_over_ranks(local).tolist()
    skipped = _gather_counts(window.skipped)
    state.skipped_samples = dict(Counter(state.skipped_samples) + skipped)
    window.skipped = Counter()
    elapsed = time.perf_counter() - window.start
    steps = max(1, window.steps)
    values = {"loss/total": reduced[0]}
    for name, value in zip(names, reduced[1:-1]):
        kind, term = name.split("/", 1) if "/" in name else ("raw", name)
        values[f"loss/{term}" if kind == "raw" else f"loss_{kind}/{term}"] = value
    values.update({
        "train/lr": engine.get_lr()[0],
        "train/loss_scale": _loss_scale(engine),
        "train/skipped_steps": float(state.skipped_steps),
        "throughput/samples_per_s": window.steps * global_batch / elapsed,
        "throughput/tokens_per_s": reduced[-1] * env.world_size / elapsed,
        "time/data_s": window.times.data / steps,
        "time/teacher_s": window.times.teacher / steps,
        "time/student_fwd_bwd_s": window.times.student / steps,
        "time/optimizer_s": window.times.optimizer / steps,
        "memory/peak_gib": _peak_memory_gib(),
    })
    grad_norm = _grad_norm(engine)
    if grad_norm is not None:
        values["train/grad_norm"] = grad_norm
    values["data/skipped_samples"] = float(sum(state.skipped_samples.values()))
    for reason, count in state.skipped_samples.items():
        values[f"data/skipped_{reason}"] = float(count)
    monitor.scalars(state.step, values)
    monitor.console(state.step, values)
