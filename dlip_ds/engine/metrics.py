"""What the trainer measures between two log lines, and the collective that reports it."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from dlip_ds.engine.checkpoint import TrainState
from dlip_ds.engine.distributed import DistEnv, mean_over_ranks, sum_counts_over_ranks
from dlip_ds.engine.logging import Monitor

DATA_BOUND = 0.25  # warn when the step waits on data for more than this share of its time


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
    workers: int = 1  # this rank's dataloader workers (0 counts as 1: the loader runs in the trainer)
    pairs: int = 0  # rows of the batches taken
    loader_seconds: float = 0.0  # what the workers spent making them (`loader_seconds` of each batch)
    start: float = field(default_factory=time.perf_counter)

    def take_loader_fields(self, raw: dict) -> None:
        """Move the loader's bookkeeping out of a raw batch: skipped samples by reason, the worker's
        seconds for it, and count its rows."""
        self.skipped.update(raw.pop("skipped", None) or {})
        self.loader_seconds += float(raw.pop("loader_seconds", 0.0))
        self.pairs += len(raw.get("image_ids", ()))

    def data_rates(self, elapsed: float) -> tuple[float, float]:
        """(pairs/s the step consumed, pairs/s the loader could deliver: rows x workers / busy seconds)."""
        capacity = self.pairs * max(1, self.workers) / self.loader_seconds if self.loader_seconds > 0 else 0.0
        return self.pairs / elapsed if elapsed > 0 else 0.0, capacity

    def data_wait_share(self) -> float:
        """The share of a timed step spent waiting for its batches."""
        total = self.seconds["data"] + self.seconds["forward_backward"] + self.seconds["optimizer"]
        return self.seconds["data"] / total if total > 0 else 0.0

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
                         global_batch: int, data_knobs: str = "") -> None:
    """Collective: average the window over micro-batches and ranks, then (rank 0) write TensorBoard
    and the console line, and warn when the step waited on data for over a quarter of its time
    (`data_knobs` names the settings to change). Every rank must call it, whichever writes."""
    names = sorted(window.terms)
    elapsed = time.perf_counter() - window.start
    local = torch.tensor([window.mean_loss()] + [window.terms[n] / max(1, window.micro) for n in names]
                         + [window.tokens, *window.data_rates(elapsed), window.data_wait_share()],
                         dtype=torch.float64, device=env.device)
    reduced = mean_over_ranks(local).tolist()
    tokens, step_rate, loader_rate, wait_share = reduced[-4:]
    add_skipped_all_ranks(state, window)
    values = {"loss/total": reduced[0]}
    for name, value in zip(names, reduced[1:-4]):
        kind, term = name.split("/", 1) if "/" in name else ("raw", name)
        values[f"loss/{term}" if kind == "raw" else f"loss_{kind}/{term}"] = value
    values.update(_engine_values(engine))
    values.update({
        "train/skipped_steps": float(state.skipped_steps),
        "throughput/samples_per_s": window.steps * global_batch / elapsed,
        "throughput/tokens_per_s": tokens * env.world_size / elapsed,
        **window.step_seconds(),
        "data/skipped_samples": float(sum(state.skipped_samples.values())),
        "data/step_pairs_per_s": step_rate,  # per rank: what the step took
        "data/wait_share": wait_share,
    })
    if loader_rate > 0:
        values["data/loader_pairs_per_s"] = loader_rate  # per rank: what its workers could make
    for reason, count in state.skipped_samples.items():
        values[f"data/skipped_{reason}"] = float(count)
    monitor.scalars(state.step, values)
    monitor.console(state.step, values)
    if window.timed_steps and wait_share > DATA_BOUND:
        monitor.data_warning(state.step, values, data_knobs)
