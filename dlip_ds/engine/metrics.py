"""What the trainer measures between two log lines, and the collective that reports it."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from dlip_ds.engine.checkpoint import TrainState
from dlip_ds.engine.distributed import DistEnv, mean_over_ranks, sum_counts_over_ranks
from dlip_ds.engine.logging import Monitor


@dataclass
class Window:
    """Sums over the steps since the last log line."""

    steps: int = 0
    micro: int = 0
    loss: float = 0.0
    terms: Counter = field(default_factory=Counter)
    tokens: float = 0.0
    timed_steps: int = 0  # steps whose spans were timed (the logging steps)
    seconds: Counter = field(default_factory=Counter)  # span name -> seconds over the timed steps
    skipped: Counter = field(default_factory=Counter)  # this rank's skipped samples by reason
    start: float = field(default_factory=time.perf_counter)

    def add_micro_batch(self, result) -> None:
        self.loss += float(result.loss.detach())
        self.terms.update({k: float(v) for k, v in result.terms.items()})
        self.tokens += float(result.tokens)
        self.micro += 1

    def add_step(self, seconds: dict[str, float]) -> None:
        self.steps += 1
        if seconds:
            self.timed_steps += 1
            self.seconds.update(seconds)

    def mean_loss(self) -> float:
        return self.loss / max(1, self.micro)

    def step_seconds(self) -> dict[str, float]:
        """Mean seconds per timed step: data wait, teacher, student forward + backward, optimizer."""
        n, s = max(1, self.timed_steps), self.seconds
        return {"time/data_s": s["data"] / n, "time/teacher_s": s["teacher"] / n,
                "time/student_fwd_bwd_s": (s["forward_backward"] - s["teacher"]) / n,
                "time/optimizer_s": s["optimizer"] / n}


def add_skipped_all_ranks(state: TrainState, window: Window) -> None:
    """Collective: fold every rank's skipped-sample counts of the window into the run's totals."""
    state.skipped_samples = dict(Counter(state.skipped_samples) + sum_counts_over_ranks(window.skipped))
    window.skipped = Counter()


def _engine_values(engine) -> dict[str, float]:
    opt = engine.optimizer
    scale = getattr(opt, "cur_scale", None)
    if scale is None and hasattr(opt, "loss_scale_config"):
        scale = opt.loss_scale_config.cur_scale
    from deepspeed.accelerator import get_accelerator

    values = {"train/lr": engine.get_lr()[0], "train/loss_scale": float(scale) if scale is not None else 1.0,
              "memory/peak_gib": get_accelerator().max_memory_allocated() / 2**30}
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:
        values["train/grad_norm"] = float(grad_norm)
    return values


def log_window_all_ranks(monitor: Monitor, engine, state: TrainState, window: Window, env: DistEnv,
                         global_batch: int) -> None:
    """Collective: average the window over micro-batches and ranks, then (rank 0) write TensorBoard
    and the console line. Every rank must call it, whichever writes."""
    names = sorted(window.terms)
    local = torch.tensor([window.mean_loss()] + [window.terms[n] / max(1, window.micro) for n in names]
                         + [window.tokens], dtype=torch.float64, device=env.device)
    reduced = mean_over_ranks(local).tolist()
    add_skipped_all_ranks(state, window)
    elapsed = time.perf_counter() - window.start
    values = {"loss/total": reduced[0]}
    for name, value in zip(names, reduced[1:-1]):
        kind, term = name.split("/", 1) if "/" in name else ("raw", name)
        values[f"loss/{term}" if kind == "raw" else f"loss_{kind}/{term}"] = value
    values.update(_engine_values(engine))
    values.update({
        "train/skipped_steps": float(state.skipped_steps),
        "throughput/samples_per_s": window.steps * global_batch / elapsed,
        "throughput/tokens_per_s": reduced[-1] * env.world_size / elapsed,
        **window.step_seconds(),
        "data/skipped_samples": float(sum(state.skipped_samples.values())),
    })
    for reason, count in state.skipped_samples.items():
        values[f"data/skipped_{reason}"] = float(count)
    monitor.scalars(state.step, values)
    monitor.console(state.step, values)
