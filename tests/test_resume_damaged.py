"""Resuming from a damaged checkpoint (issue 13): the damaged file is named, the newest whole checkpoint
that `keep_last` kept is loaded instead (and the console says so), a clear ConfigError when none is
whole; with 2 ranks where only rank 1's optimizer shard is damaged, both ranks fall back to the same tag.

The checks of `CheckpointManager.resolve` run in-process on hand-made tag directories; the training runs
are `python -m dlip_ds.train` subprocesses (CPU, gloo; two ranks through torchrun), as users start them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dlip_ds.config import ConfigError
from dlip_ds.engine.checkpoint import CheckpointManager, archive_problem

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}


def truncate(path: Path) -> None:
    """Keep the first half of the file: what a full disk or an interrupted copy leaves."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# --------------------------------------------------------------------------- resolve, in-process


def fake_tag(directory: Path, step: int, ranks: int = 2) -> Path:
    """A ZeRO-2 tag directory's file names, each a real torch archive."""
    tag = directory / f"step_{step:08d}"
    tag.mkdir(parents=True)
    torch.save({"module": {"w": torch.randn(64)}}, tag / "mp_rank_00_model_states.pt")
    for r in range(ranks):
        torch.save({"optimizer_state_dict": {"m": torch.randn(256)}}, tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        torch.save({"python": r}, tag / f"rng_rank{r}.pt")
    return tag


@pytest.fixture
def ckpts(tmp_path):
    d = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        fake_tag(d, step)
    fake_tag(d, 8).joinpath("mp_rank_00_model_states.pt").unlink()  # a save killed before `latest` moved on
    (d / "latest").write_text("step_00000006")
    return d


def test_whole_archives_pass_the_check_and_damaged_ones_are_named(ckpts):
    optim = ckpts / "step_00000006" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    assert archive_problem(optim) is None
    truncate(optim)
    assert "not a whole torch archive" in archive_problem(optim)
    assert archive_problem(ckpts / "nothing.pt") == "is missing"


def test_resolve_falls_back_to_the_newest_whole_checkpoint_and_says_so(ckpts, capsys):
    manager = CheckpointManager(ckpts, rank=0, keep_last=3)
    assert manager.resolve("auto") == (ckpts, "step_00000006")
    damaged = ckpts / "step_00000006" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    truncate(damaged)
    assert manager.resolve("auto") == (ckpts, "step_00000004")
    out = capsys.readouterr().out
    assert str(damaged) in out and "falling back to the older step_00000004" in out
    # the same through an explicit checkpoints directory
    assert manager.resolve(str(ckpts)) == (ckpts, "step_00000004")
    # each rank checks the files it reads: rank 1 does not read rank 0's shard. Alone, rank 1 would take
    # step 6; with several ranks, an all-gather makes them agree (the two-rank run below).
    assert CheckpointManager(ckpts, rank=1, keep_last=3).resolve("auto") == (ckpts, "step_00000006")
    truncate(ckpts / "step_00000006" / "rng_rank1.pt")
    assert CheckpointManager(ckpts, rank=1, keep_last=3).resolve("auto") == (ckpts, "step_00000004")


def test_resolve_stops_with_the_damaged_file_when_none_is_whole(ckpts):
    manager = CheckpointManager(ckpts, rank=0, keep_last=3)
    for step in (2, 4, 6):
        truncate(ckpts / f"step_{step:08d}" / "mp_rank_00_model_states.pt")
    with pytest.raises(ConfigError, match=r"no whole checkpoint.*step_00000002/mp_rank_00_model_states\.pt"):
        manager.resolve("auto")
    tag = ckpts / "step_00000004"
    with pytest.raises(ConfigError, match=r"step_00000004/mp_rank_00_model_states\.pt is not a whole torch archive"):
        manager.resolve(str(tag))  # one tag asked for by name: no fallback


# --------------------------------------------------------------------------- training runs


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Synthetic shards (32 px) and their tokenizer."""
    from dlip_ds.data.synth import synth

    root = tmp_path_factory.mktemp("resume")
    synth(root / "synth", train=32, test=8, image_size=32, shard_size=16)
    return root


def train_cmd(assets: Path, out: Path, *args: str, ranks: int = 1) -> list[str]:
    """Pretraining (no teacher: the checkpoints are the same kind, the runs start faster), ZeRO-2 fp32, a
    checkpoint every 2 steps, the last 2 kept."""
    sets = ["teacher.source=", f"data.train_shards={assets / 'synth' / 'train'}",
            "data.batch_size=2", "data.workers=0", "data.shuffle_buffer=8", "train.warmup_steps=1",
            "train.log_every=1", "train.ckpt_every=2", "train.keep_last=2", "train.max_steps=4"]
    cmd = ["-m", "dlip_ds.train", "--config", "tiny-pretrain", "--deepspeed", "zero2_fp32", "--out", str(out),
           *[a for s in sets for a in ("--set", s)], *args]
    if ranks == 1:
        return [sys.executable, *cmd]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *cmd]


def run(cmd: list[str], rc: int = 0, timeout: float = 180) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    """loss/total by step from the run's TensorBoard files (the last value wins for a re-logged step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[int, float] = {}
    for events in sorted((run_dir / "tensorboard").glob("events.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        out.update({e.step: e.value for e in acc.Scalars("loss/total")})
    return out


@pytest.mark.slow  # two DeepSpeed runs, 20-35 s each on a busy 2-core machine
def test_one_rank_resume_falls_back_to_the_previous_checkpoint(assets, tmp_path):
    run_dir = tmp_path / "run"
    run(train_cmd(assets, run_dir))
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000004"
    first = losses(run_dir)
    damaged = ckpts / "step_00000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    truncate(damaged)

    proc = run(train_cmd(assets, run_dir, "--resume", "auto"))
    assert f"checkpoint {ckpts / 'step_00000004'} is damaged: {damaged}" in proc.stdout
    assert "falling back to the older step_00000002" in proc.stdout
    assert "resuming at step 2" in proc.stdout
    again = losses(run_dir)  # steps 3 and 4 retrained from step 2: the same losses as the first time
    assert again[3] == pytest.approx(first[3], rel=1e-5) and again[4] == pytest.approx(first[4], rel=1e-5)
    assert (ckpts / "latest").read_text() == "step_00000004"
    assert (run_dir / "student" / "model.safetensors").is_file()
    # every checkpoint damaged: test_resolve_stops_with_the_damaged_file_when_none_is_whole (the ConfigError
    # becomes `dlip-ds train: error: ...` and exit code 2, without a traceback)


@pytest.mark.slow  # two DeepSpeed runs, 20-35 s each on a busy 2-core machine
def test_two_ranks_agree_on_the_older_checkpoint_when_one_rank_shard_is_damaged(assets, tmp_path):
    run_dir = tmp_path / "run"
    run(train_cmd(assets, run_dir, ranks=2))
    ckpts = run_dir / "checkpoints"
    first = losses(run_dir)
    damaged = ckpts / "step_00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert damaged.is_file()
    truncate(damaged)

    proc = run(train_cmd(assets, run_dir, "--resume", "auto", ranks=2), timeout=150)
    out = proc.stdout
    assert f"is damaged: {damaged}" in out and "(rank 1)" in out  # rank 0 reports what rank 1 found
    assert "resuming at step 2" in out
    # both ranks restarted from step 2: the global losses of steps 3-4 are those of the first run
    again = losses(run_dir)
    assert again[3] == pytest.approx(first[3], rel=1e-5) and again[4] == pytest.approx(first[4], rel=1e-5)
    assert (run_dir / "student" / "model.safetensors").is_file()
