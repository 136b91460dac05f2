"""The training loop: a frozen teacher beside a DeepSpeed student, read top to bottom.

    Trainer()            process group, recipe fitted to the tokenizer, teacher (inference engine),
                         task (student + KD plan), deepspeed.initialize, resume
    train()              loop over train_step(); logging, evaluation, stop signals and checkpoints
                         are named calls; the student exported at the end
    train_step()         one optimizer step: grad_accum x forward_backward_step(), step, EMA
    forward_backward_step()  one micro-batch; a non-finite loss is dropped on every rank alike

Methods whose names end in `_all_ranks` run collectives: every rank must call them together.

Exact resume: the data stream is a function of (seed, rank, start position), so the loader is
restarted at the data position after every checkpoint. A run resumed from a checkpoint therefore
sees exactly the batches the uninterrupted run saw after that checkpoint, and with the restored
model, optimizer, scheduler, loss scaler and RNG states it follows the same loss curve.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import torch

from dlip_ds.config import Recipe
from dlip_ds.data.gpu import resolve_decode
from dlip_ds.data.shards import check_local_shards
from dlip_ds.engine.build import (
    build_task,
    fit_to_tokenizer,
    initialize_engine,
    quiet_deepspeed,
)
from dlip_ds.engine.checkpoint import (
    INTERRUPTED_FILE,
    CheckpointManager,
    StopRequest,
    TrainState,
    export_student,
)
from dlip_ds.engine.distributed import (
    any_rank,
    barrier,
    init_distributed,
    limit_cpu_threads,
)
from dlip_ds.engine.ds_config import compute_dtype, resolve_ds_config, zero_stage
from dlip_ds.engine.evaluation import BestKeeper, evaluate_all_ranks, load_eval_data
from dlip_ds.engine.logging import Monitor
from dlip_ds.engine.metrics import Window, add_skipped_all_ranks, log_window_all_ranks
from dlip_ds.models.vlp import MomentumMaster
from dlip_ds.recipe import save_recipe
from dlip_ds.tasks import task_class
from dlip_ds.timing import SpanTimer


def momentum_update_all_ranks(student, *, zero3: bool, master: MomentumMaster | None = None) -> None:
    """BLIP's EMA of the momentum encoders, after an applied update.

    With `master` (the task's `MomentumMaster`, what the trainer passes) the EMA accumulates in fp32
    from the optimizer's fp32 master weights, so a bf16/fp16 run does not round its small steps away;
    the student's momentum copies then take its value in their own dtype. Without it the copies are the
    EMA, updated from the (gathered, under ZeRO-3) parameters: exact in fp32 only."""
    import deepspeed

    if master is not None:
        master.update((_fp32_weight(p) for p in student.momentum_sources()), student.cfg.momentum_coef)
        copies = list(student.momentum.parameters())
        with deepspeed.zero.GatheredParameters(copies, modifier_rank=0, enabled=zero3):
            master.write_to(student)
        return
    if not zero3:
        student.momentum_update()
        return
    params = [p for name, p in student.named_parameters() if name.split(".")[0] in ("momentum", "vision", "text", "itc")]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        student.momentum_update()


def _fp32_weight(param: torch.nn.Parameter) -> torch.Tensor:
    """The whole fp32 value of a trained parameter: DeepSpeed's fp32 master (sharded by ZeRO 1-3 and by
    the bf16 optimizer: `safe_get_full_fp32_param` assembles it, a collective), else the parameter."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(param)
    if full is not None:
        return full
    with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
        return param.detach().float().clone()


def train(recipe: Recipe, run_dir: str | Path, *, ds_config: str, resume: str | None = None) -> int:
    """Run (or resume) one training job; every rank calls this. Returns the process exit code."""
    return Trainer(recipe, Path(run_dir), ds_config=ds_config, resume=resume).train()


class Trainer:
    def __init__(self, recipe: Recipe, run_dir: Path, *, ds_config: str, resume: str | None):
        from dlip_ds.data import tokenizer_from_config

        quiet_deepspeed()
        self.env = env = init_distributed()
        if env.device.type == "cpu":
            limit_cpu_threads(recipe.data.workers)
        check_local_shards(recipe.data.train_shards, "data.train_shards")
        self.decode = resolve_decode(recipe.data, env.device, supported=task_class(recipe.task).stream == "captions")
        self.tokenizer = tokenizer_from_config(recipe.data)
        self.recipe = recipe = fit_to_tokenizer(recipe, self.tokenizer)
        self.cfg, self.run_dir = recipe.train, run_dir
        self.ds_cfg = resolve_ds_config(ds_config, recipe, env.world_size)
        self.global_batch = self.ds_cfg["train_batch_size"]

        self.teacher, self.task = build_task(recipe, env.device)
        self.task.timer = self.timer = SpanTimer(env.device)
        self.student = self.task.student
        recipe.student.model = self.student.cfg  # with student.source, the architecture is known only now
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_recipe(recipe, run_dir / "config.yaml")
        self.engine = initialize_engine(self.task, recipe, self.ds_cfg, env.device)
        self._resume_all_ranks(resume)
        self.monitor = Monitor(run_dir, enabled=env.is_main, start_step=self.state.step,
                               max_steps=self.cfg.max_steps, log_every=self.cfg.log_every)
        self._announce()
        self.eval_data = self.best = None
        if self.cfg.eval_every > 0 and recipe.data.eval_shards and env.is_main:
            self.eval_data = load_eval_data(recipe, self.task.stream)
            self.best = BestKeeper(run_dir, self.task.metric)
        self.batches = self._new_loader()
        self.window = self._new_window()
        self.bad_in_a_row = 0  # non-finite losses and skipped updates since the last applied update

    # ------------------------------------------------------------------ setup

    def _resume_all_ranks(self, resume: str | None) -> None:
        env, cfg = self.env, self.cfg
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", rank=env.rank, keep_last=cfg.keep_last)
        self.generator = torch.Generator(device=env.device).manual_seed(cfg.seed + env.rank)  # hard negatives
        torch.manual_seed(cfg.seed + 1 + env.rank)  # per-rank dropout / drop-path streams
        self.resumed_from = self.ckpt.resolve(resume) if resume else None
        self.state = TrainState()
        if self.resumed_from is not None:
            self.state = self.ckpt.load(self.engine, *self.resumed_from, self.generator)
            self.resumed_from = self.ckpt.loaded  # an older tag when the chosen one failed to load
        self.last_saved = self.state.step if self.resumed_from else -1
        self.stop = StopRequest(self.run_dir)
        barrier()
        if env.is_main:
            self.stop.clear()
            (self.run_dir / INTERRUPTED_FILE).unlink(missing_ok=True)
        barrier()

    def _announce(self) -> None:
        env, found = self.env, self.resumed_from
        if env.is_main:
            self.monitor.text("config", "```yaml\n" + (self.run_dir / "config.yaml").read_text() + "\n```")
        start = f"resuming at step {self.state.step} from {found[0] / found[1]}" if found else "starting"
        self.monitor.print(
            f"{start}: {self.recipe.name or 'run'} ({self.recipe.task}) on {env.world_size} rank(s) "
            f"({env.device.type}), ZeRO-{zero_stage(self.ds_cfg)}, {compute_dtype(self.ds_cfg)}, global batch "
            f"{self.global_batch}, {self.cfg.max_steps} steps, "
            + (f"teacher in {next(self.teacher.parameters()).dtype}, " if self.teacher is not None else "")
            + f"run dir {self.run_dir}")

    def _new_loader(self):
        """This rank's batches from the data position; with `data.decode` gpu, their JPEGs decoded and
        cropped on the device one batch ahead (`data.gpu.DevicePrefetcher`)."""
        from dlip_ds import data
        from dlip_ds.data.gpu import DevicePrefetcher, finish_batch

        make = data.make_vqa_train_loader if self.task.stream == "vqa" else data.make_train_loader
        cfg = dataclasses.replace(self.recipe.data, decode=self.decode)
        vision = self.student.cfg.vision
        batches = iter(make(cfg, self.tokenizer, vision, rank=self.env.rank, world_size=self.env.world_size,
                            seed=self.cfg.seed, start_step=self.state.micro_batches))
        if self.decode != "gpu":
            return batches
        return DevicePrefetcher(batches, functools.partial(finish_batch, vision=vision, device=self.env.device),
                                self.env.device)

    def _new_window(self) -> Window:
        return Window(workers=self.recipe.data.workers)

    # ------------------------------------------------------------------ the loop

    def train(self) -> int:
        stop_reason = None
        while self.state.step < self.cfg.max_steps and stop_reason is None:
            if self.train_step():
                self._log_and_evaluate_all_ranks()
                stop_reason = self._stop_requested_all_ranks()
            else:
                stop_reason = "non-finite"
                self.monitor.print(
                    f"stopping: {self.bad_in_a_row} non-finite steps in a row exceed train.max_nonfinite="
                    f"{self.cfg.max_nonfinite}; the last good state is checkpointed. Lower train.lr, check the "
                    "data, or use bf16 instead of fp16.")
            due = stop_reason is not None or self.state.step % self.cfg.ckpt_every == 0
            if due or self.state.step == self.cfg.max_steps:
                self._checkpoint_all_ranks(restart_loader=stop_reason is None)
        if stop_reason is not None:
            return self._stopped(stop_reason)
        return self._finish_all_ranks()

    def train_step(self) -> bool:
        """One optimizer step over train.grad_accum micro-batches. False (nothing applied) when
        non-finite losses or skipped updates in a row exceed train.max_nonfinite."""
        state, timer = self.state, self.timer
        timer.enabled = self._is_log_step(state.step + 1)  # timing synchronises the device: only when logged
        self.task.step = state.step  # loss schedules (the ITC alpha ramp) follow the optimizer steps
        for _ in range(self.cfg.grad_accum):
            if not self.forward_backward_step():
                return False
        if self.bad_in_a_row > self.cfg.max_nonfinite:  # skipped updates reached the limit last step
            return False
        with timer.span("optimizer"):
            self.engine.step()
        state.step += 1
        state.samples += self.global_batch
        if self.engine.was_step_applied():
            self.bad_in_a_row = 0
            if self.student.cfg.momentum:
                momentum_update_all_ranks(self.student, zero3=zero_stage(self.ds_cfg) == 3,
                                          master=self.task.momentum_master)
        else:  # DeepSpeed found inf/nan gradients (normal while an fp16 loss scale settles)
            state.skipped_steps += 1
            self.bad_in_a_row += 1
        self.window.add_step(timer.take())
        self.monitor.advance(state.step, self.window.mean_loss())
        return True

    def forward_backward_step(self) -> bool:
        """Forward and backward of one micro-batch. A non-finite loss is dropped on every rank alike,
        before backward (nothing was accumulated from it), and the next micro-batch is taken."""
        while True:
            with self.timer.span("data"):
                raw = next(self.batches)
                self.state.micro_batches += 1
                self.window.take_loader_fields(raw)
                batch = self.task.batch_type.from_dict(raw).to(self.env.device)  # fp32: each model casts its own
            with self.timer.span("forward_backward"):
                result = self.engine(batch, teacher=self.teacher, generator=self.generator)
                finite = not any_rank(not bool(torch.isfinite(result.loss)), self.env.device)
                if finite:
                    self.engine.backward(result.loss)
            if finite:
                break
            self.state.skipped_steps += 1
            self.bad_in_a_row += 1
            self.monitor.print(f"step {self.state.step}: non-finite loss, micro-batch skipped "
                               f"({self.bad_in_a_row} non-finite in a row)")
            if self.bad_in_a_row > self.cfg.max_nonfinite:
                return False
        self.window.add_micro_batch(result)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # no update inside the window; DeepSpeed only counts the micro step
        return True

    # ------------------------------------------------------------------ named calls of the loop

    def _is_log_step(self, step: int) -> bool:
        return step % self.cfg.log_every == 0 or step == self.cfg.max_steps

    def _log_and_evaluate_all_ranks(self) -> None:
        step, cfg = self.state.step, self.cfg
        if self._is_log_step(step):
            knobs = f"raise data.workers (now {self.recipe.data.workers})" + (
                "" if self.decode == "gpu" else ", or on a GPU set data.decode=gpu (now cpu; it decodes and crops "
                "there, without RandAugment)")
            log_window_all_ranks(self.monitor, self.engine, self.state, self.window, self.env, self.global_batch,
                                 knobs)
            self.window = self._new_window()
        if cfg.eval_every > 0 and step % cfg.eval_every == 0 and self.recipe.data.eval_shards:
            metrics, model = evaluate_all_ranks(self.recipe.task, self.student, self.eval_data, self.tokenizer,
                                                self.recipe, self.env, zero3=zero_stage(self.ds_cfg) == 3)
            if self.env.is_main:
                self.monitor.scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
                better = self.best.offer(step, metrics, model, self.tokenizer)
                self.monitor.print(f"step {step} eval: " + " ".join(f"{k} {v:.2f}" for k, v in metrics.items())
                                   + (f" (best {self.task.metric} so far: {self.best.dir})" if better else ""))

    def _stop_requested_all_ranks(self) -> str | None:
        if any_rank(self.stop.requested() is not None, self.env.device):
            return self.stop.requested() or "another rank's signal"
        return None

    def _checkpoint_all_ranks(self, *, restart_loader: bool) -> None:
        if self.last_saved == self.state.step:
            return
        add_skipped_all_ranks(self.state, self.window)
        tag = self.ckpt.save(self.engine, self.state, self.generator)
        self.last_saved = self.state.step
        self.monitor.print(f"step {self.state.step}: checkpoint {self.ckpt.dir / tag}")
        if restart_loader:
            self.batches = self._new_loader()  # same stream as a run resumed from this checkpoint

    # ------------------------------------------------------------------ the end

    def _stopped(self, reason: str) -> int:
        if reason != "non-finite" and self.env.is_main:
            (self.run_dir / INTERRUPTED_FILE).write_text(f"{reason} at step {self.state.step}\n")
        self.monitor.print(f"stopped at step {self.state.step} ({reason}); resume with --resume auto")
        self.monitor.close()
        return 1 if reason == "non-finite" else 0

    def _finish_all_ranks(self) -> int:
        """The consolidated fp32 student, in the exported-model format, in RUN_DIR/student."""
        self._checkpoint_all_ranks(restart_loader=False)
        if self.env.is_main:
            out = export_student(self.student.cfg, self.ckpt.dir, self.ckpt.latest_tag(), self.run_dir / "student",
                                 self.tokenizer)
            self.monitor.print(f"done: {self.state.step} steps, {self.state.skipped_steps} skipped; "
                               f"student exported to {out}")
            if self.best is not None and self.best.best is not None:
                b = self.best.best
                self.monitor.print(f"best {b['metric']} {b['value']:.2f} at step {b['step']}: {self.best.dir}")
        barrier()
        self.monitor.close()
        return 0
