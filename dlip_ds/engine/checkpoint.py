"""DeepSpeed checkpoints that survive crashes and preemption, and the consolidated final student.

Layout under RUN_DIR/checkpoints: one DeepSpeed tag directory per save (`step_00001000/`), each
with a `rng_rank<r>.pt` per rank, and `latest`, the tag to resume from. DeepSpeed's own
`save_checkpoint(save_latest=True)` writes `latest` on rank 0 before the other ranks have finished
their ZeRO shards (no barrier in between) and rewrites it in place, so a crash mid-save can leave
`latest` naming a broken tag. Here `latest` is written only after a barrier that follows every
rank's save, through a temporary file and an atomic rename.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from dlip_ds.config import ConfigError
from dlip_ds.engine.distributed import barrier

LATEST = "latest"
STOP_FILE = "STOP"  # `touch RUN_DIR/STOP` asks a run to checkpoint and exit (the sbatch trap does)
INTERRUPTED_FILE = "interrupted"  # written when a run stops early; the sbatch script requeues on it
_TAG = re.compile(r"^step_(\d+)$")


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs (saved as DeepSpeed client_state)."""

    step: int = 0  # optimizer steps attempted (applied + skipped)
    micro_batches: int = 0  # batches drawn from this rank's loader: the data position
    samples: int = 0  # samples trained on, all ranks
    skipped_steps: int = 0  # steps skipped for non-finite loss or gradients
    skipped_samples: dict[str, int] = field(default_factory=dict)  # by reason, all ranks


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state(generator: torch.Generator | None) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator | None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


class CheckpointManager:
    def __init__(self, directory: str | Path, *, rank: int, keep_last: int):
        self.dir = Path(directory)
        self.rank = rank
        self.keep_last = keep_last

    def latest_tag(self) -> str | None:
        path = self.dir / LATEST
        if not path.is_file():
            return None
        tag = path.read_text().strip()
        return tag if tag and (self.dir / tag).is_dir() else None

    def save(self, engine, state: TrainState, generator: torch.Generator | None) -> str:
        """Collective: every rank calls it. Returns the tag."""
        tag = tag_for(state.step)
        engine.save_checkpoint(str(self.dir), tag=tag, client_state={"train_state": asdict(state)},
                               save_latest=False)
        torch.save(rng_state(generator), self.dir / tag / f"rng_rank{self.rank}.pt")
        barrier()  # every rank's files are on disk before `latest` may name them
        if self.rank == 0:
            tmp = self.dir / f".{LATEST}.tmp"
            with open(tmp, "w") as f:
                f.write(tag)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.dir / LATEST)
            self._prune(keep=tag)
        barrier()
        return tag

    def _prune(self, keep: str) -> None:
        tags = sorted((int(m.group(1)), p) for p in self.dir.iterdir() if (m := _TAG.match(p.name)) and p.is_dir())
        old = [p for _, p in tags if p.name != keep][: max(0, len(tags) - self.keep_last)]
        for path in old:
            shutil.rmtree(path, ignore_errors=True)

    def resolve(self, resume: str) -> tuple[Path, str] | None:
        """`auto` -> the latest complete checkpoint here (None if there is none); a path -> a
        checkpoint directory (with `latest`) or one tag directory inside it."""
        if resume == "auto":
            tag = self.latest_tag()
            return (self.dir, tag) if tag else None
        path = Path(resume)
        if (path / LATEST).is_file():
            tag = CheckpointManager(path, rank=self.rank, keep_last=self.keep_last).latest_tag()
            if tag is None:
                raise ConfigError(f"--resume {resume}: '{LATEST}' names a checkpoint that does not exist")
            return path, tag
        if path.is_dir() and any(path.glob("mp_rank_*_model_states.pt")):
            return path.parent, path.name
        raise ConfigError(f"--resume {resume}: expected 'auto', a checkpoints directory with a '{LATEST}' file, "
                          "or one checkpoint tag directory")

    def load(self, engine, load_dir: Path, tag: str, generator: torch.Generator | None) -> TrainState:
        """Collective. Restores model, optimizer, scheduler, loss scaler, KD projections, RNG, data position."""
        path, client = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise ConfigError(f"checkpoint {load_dir / tag} could not be loaded")
        rng_file = load_dir / tag / f"rng_rank{self.rank}.pt"
        if rng_file.is_file():  # absent when resuming with more ranks than saved: fresh streams then
            set_rng_state(torch.load(rng_file, weights_only=False), generator)
        return TrainState(**client["train_state"])


# --------------------------------------------------------------------------- preemption


class StopRequest:
    """Set by SIGTERM / SIGUSR1 or by a STOP file in the run directory; the loop polls `requested()`
    at step boundaries, checkpoints and exits. The handler only sets a flag: saving from inside a
    signal handler could interleave with a collective in progress."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, run_dir: Path):
        self.stop_file = run_dir / STOP_FILE
        self.signal_name: str | None = None
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def requested(self) -> str | None:
        """Why this rank should stop (a signal name or the STOP file), or None."""
        if self.signal_name:
            return self.signal_name
        return STOP_FILE if self.stop_file.exists() else None

    def clear(self) -> None:
        self.stop_file.unlink(missing_ok=True)


# --------------------------------------------------------------------------- the consolidated student


def consolidated_student_state(checkpoint_dir: str | Path, tag: str) -> dict[str, torch.Tensor]:
    """The student's fp32 weights from a DeepSpeed checkpoint of a StepModule, whatever the ZeRO stage.

    ZeRO 1-3 keep the fp32 master weights sharded in the optimizer files; DeepSpeed's zero_to_fp32
    merges them. ZeRO-0 has no shards: the module weights are read (fp32 when trained in fp32).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint_dir = Path(checkpoint_dir)
    if any((checkpoint_dir / tag).glob("*optim_states.pt")):
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    else:
        files = sorted((checkpoint_dir / tag).glob("mp_rank_*_model_states.pt"))
        if not files:
            raise ConfigError(f"{checkpoint_dir / tag}: no DeepSpeed model states")
        state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    prefix = "student."
    return {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}


def student_from_state(model_cfg, state: dict[str, torch.Tensor], source: str):
    """A fresh fp32 VLPModel holding `state` (a trained student's weights)."""
    from dlip_ds.models.vlp import VLPModel
    from dlip_ds.models.weights import load_state_strict

    model = VLPModel(model_cfg)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    # The trainer trains 0-d parameters as [1] (see trainer._lift_scalar_params): restore the shape.
    state = {k: v.float().reshape(shapes[k]) if k in shapes and v.numel() == 1 else v.float() for k, v in state.items()}
    load_state_strict(model, state, source)
    return model.eval()


def student_from_checkpoint(model_cfg, checkpoint_dir: Path, tag: str):
    return student_from_state(model_cfg, consolidated_student_state(checkpoint_dir, tag), str(checkpoint_dir / tag))


def export_student(model_cfg, checkpoint_dir: Path, tag: str, out_dir: Path, tokenizer=None) -> Path:
    """Write the exported-model directory (design card section 4) from a checkpoint."""
    from dlip_ds.models.dlip_format import save_model

    return save_model(student_from_checkpoint(model_cfg, checkpoint_dir, tag), out_dir, tokenizer=tokenizer)


def load_run_student(run_dir: str | Path):
    """(VLPModel, tokenizer or None) of a training run: its exported `student/`, or, for a run that
    stopped before exporting, the student consolidated from its latest checkpoint."""
    from dlip_ds.data import load_tokenizer, tokenizer_from_config
    from dlip_ds.models.load import load_model
    from dlip_ds.recipe import load_recipe

    run_dir = Path(run_dir)
    student_dir = run_dir / "student"
    if (student_dir / "config.json").is_file():
        has_tokenizer = (student_dir / "vocab.txt").is_file() or (student_dir / "tokenizer.json").is_file()
        return load_model(student_dir), (load_tokenizer(student_dir) if has_tokenizer else None)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"{run_dir}: not a training run (no student/ and no config.yaml)")
    recipe = load_recipe(str(config))
    ckpt = CheckpointManager(run_dir / "checkpoints", rank=0, keep_last=1)
    tag = ckpt.latest_tag()
    if tag is None:
        raise ConfigError(f"{run_dir}: no student/ and no complete checkpoint in {ckpt.dir}")
    return student_from_checkpoint(recipe.student.model, ckpt.dir, tag), tokenizer_from_config(recipe.data)
