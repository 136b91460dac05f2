"""What the trainer shows about its data: the loader's pairs/s beside the step's, and a one-line
warning when the step waits on data for more than a quarter of its time (engine/metrics.py,
engine/logging.py). One tiny CPU run with an artificially slow loader, as users start it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_engine_assets

from dlip_ds.engine.logging import Monitor
from dlip_ds.engine.metrics import Window

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
SLOW = 0.6  # seconds the patched collate sleeps per batch


def test_window_rates_and_wait_share():
    w = Window(workers=2)
    for _ in range(3):
        w.take_loader_fields({"skipped": {"bad_image": 1}, "loader_seconds": 0.5, "image_ids": torch.arange(8)})
    w.seconds.update({"data": 1.0, "forward_backward": 2.5, "optimizer": 0.5})
    step_rate, loader_rate = w.data_rates(elapsed=4.0)
    assert (step_rate, loader_rate) == (6.0, 24 * 2 / 1.5) and w.skipped == {"bad_image": 3}
    assert w.data_wait_share() == 0.25
    assert Window().data_rates(1.0) == (0.0, 0.0)  # no batch carried its time: no capacity figure


def test_data_warning_at_most_once_per_ten_lines(tmp_path, capsys):
    m = Monitor(tmp_path, enabled=True, start_step=0, max_steps=100, log_every=1)
    values = {"data/step_pairs_per_s": 10.0, "data/loader_pairs_per_s": 12.0, "data/wait_share": 0.4}
    for step in range(1, 13):
        m.console(step, values)
        m.data_warning(step, values, "raise data.workers (now 1)")
    m.close()
    out = capsys.readouterr().out
    assert out.count("waiting on data") == 2 and "step 1: waiting on data 40% of the step" in out
    assert "step 11: waiting on data" in out and "(loader 12)" in out and "raise data.workers (now 1)" in out


SLOW_SCRIPT = f"""
import sys, time
from dlip_ds import train
from dlip_ds.data import stream

collate = stream.Collate.__call__

def slow(self, examples):
    time.sleep({SLOW})
    return collate(self, examples)

stream.Collate.__call__ = slow
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_engine_assets(tmp_path_factory.mktemp("engine"), train=32)


def test_slow_loader_run_warns_and_logs_both_rates(assets, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    sets = [f"data.train_shards={assets / 'synth' / 'train'}", "data.batch_size=4", "data.workers=0",
            "data.shuffle_buffer=8", "teacher.source=", "train.max_steps=3", "train.warmup_steps=1",
            "train.log_every=1", "train.ckpt_every=100"]
    cmd = [sys.executable, "-c", SLOW_SCRIPT, "--config", "tiny-pretrain", "--out", str(run_dir),
           *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    warnings = [ln for ln in proc.stdout.splitlines() if "waiting on data" in ln]
    assert len(warnings) == 1 and "data.workers (now 0)" in warnings[0] and "data.decode=gpu" in warnings[0]
    assert " pairs/s (loader " in proc.stdout  # the console line shows both rates
    acc = EventAccumulator(str(next((run_dir / "tensorboard").glob("events.*"))))
    acc.Reload()
    loader = [e.value for e in acc.Scalars("data/loader_pairs_per_s")]
    step = [e.value for e in acc.Scalars("data/step_pairs_per_s")]
    assert len(loader) == len(step) == 3
    assert all(0 < v <= 4 / SLOW for v in loader)  # each 4-pair batch took the worker at least SLOW seconds
    assert all(v > 0.25 for v in (e.value for e in acc.Scalars("data/wait_share")))
