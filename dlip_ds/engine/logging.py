"""What a run reports: TensorBoard scalars and text (rank 0), a console line every N steps, and a
progress bar when the console is a terminal."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tqdm import tqdm


def format_seconds(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class Monitor:
    """Rank 0 writes; every other rank gets a Monitor whose methods do nothing."""

    WARN_EVERY = 10  # log lines between two data warnings at most

    def __init__(self, run_dir: Path, *, enabled: bool, start_step: int, max_steps: int, log_every: int):
        self.enabled = enabled
        self.lines_since_warning = self.WARN_EVERY
        self.log_every = max(1, log_every)
        self.start_step, self.max_steps = start_step, max_steps
        self.start_time = time.perf_counter()
        self.tb = None
        self.bar = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            if sys.stderr.isatty():
                self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, text, step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.tb is None:
            return
        for name, value in values.items():
            self.tb.add_scalar(name, value, step)
        self.tb.flush()

    def advance(self, step: int, loss: float | None) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.4f}" if loss is not None else "nan", refresh=False)
            self.bar.refresh()

    def console(self, step: int, values: dict[str, float]) -> None:
        """One line: step, losses, lr, throughput and ETA."""
        elapsed = time.perf_counter() - self.start_time
        done = step - self.start_step
        eta = elapsed / done * (self.max_steps - step) if done > 0 else 0.0
        losses = " ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in values.items() if k.startswith("loss/")
                          and k != "loss/total")
        loader = values.get("data/loader_pairs_per_s")
        data = f"data {values.get('data/step_pairs_per_s', 0.0):.0f} pairs/s" + (
            f" (loader {loader:.0f})" if loader is not None else "")
        self.print(
            f"step {step}/{self.max_steps} | loss {values.get('loss/total', float('nan')):.4f} ({losses}) | "
            f"lr {values.get('train/lr', 0.0):.2e} | {values.get('throughput/samples_per_s', 0.0):.1f} samples/s | "
            f"{data} | elapsed {format_seconds(elapsed)} | eta {format_seconds(eta)}"
        )
        self.lines_since_warning += 1

    def data_warning(self, step: int, values: dict[str, float], knobs: str) -> None:
        """One line when the step waits on data, at most once every WARN_EVERY log lines."""
        if self.lines_since_warning < self.WARN_EVERY:
            return
        self.lines_since_warning = 0
        loader = values.get("data/loader_pairs_per_s")
        rates = f"the step takes {values.get('data/step_pairs_per_s', 0.0):.0f} pairs/s per rank" + (
            f", the loader makes {loader:.0f}" if loader is not None else "")
        self.print(f"step {step}: waiting on data {100 * values.get('data/wait_share', 0.0):.0f}% of the step "
                   f"({rates}); {knobs or 'more data.workers or data.decode=gpu would help'}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
