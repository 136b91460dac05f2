"""Wall time of named spans of a step, measured only when asked for.

Timing a span on a GPU means synchronising the device at both ends, which stalls the pipeline, so
the trainer enables the timer on logging steps only; elsewhere `span` costs nothing.
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager

import torch


class SpanTimer:
    def __init__(self, device: torch.device | None = None):
        self.enabled = False
        self.seconds: Counter = Counter()
        self._sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)

    @contextmanager
    def span(self, name: str):
        if not self.enabled:
            yield
            return
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - start

    def take(self) -> dict[str, float]:
        """Seconds per span since the previous call."""
        seconds, self.seconds = dict(self.seconds), Counter()
        return seconds
