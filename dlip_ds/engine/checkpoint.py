"""DeepSpeed checkpoints that survive crashes and preemption, and the consolidated final student.

Layout under RUN_DIR/checkpoints: one DeepSpeed tag directory per save (`step_00001000/`), each
with a `rng_rank<r>.pt` per rank, and `latest`, the tag to resume from. DeepSpeed's own
`save_checkpoint(save_latest=True)` writes `latest` on rank 0 before the other ranks have finished
their ZeRO shards (no barrier in between) and rewrites it in place, so a crash mid-save can leave
`latest` naming a broken tag. Here `latest` is written only after a barrier that follows every
rank's save, through a temporary file and an atomic rename.

A damaged file (a truncated copy, a disk that filled up) must not end a resume in a traceback: before
loading, every rank checks that each file it will read is a whole torch archive (its zip central
directory, read from the end of the file), the ranks agree, and the newest checkpoint that is whole
on every rank is loaded; a failure while loading falls back the same way.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import threading
import zipfile
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
# files that belong to one data-parallel rank: (bf16_)zero_pp_rank_<r>_mp_rank_XX_{model,optim}_states.pt
# and rng_rank<r>.pt; every other .pt in a tag (mp_rank_XX_model_states.pt) is read by every rank
_RANK_FILE = re.compile(r"(?:^|_)zero_pp_rank_(\d+)_|^rng_rank(\d+)\.pt$")


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
        self._fallbacks: dict[tuple[Path, str], list[str]] = {}  # (dir, tag) -> older whole tags, newest first
        self.loaded: tuple[Path, str] | None = None  # what `load` loaded in the end

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
        """Collective when distributed (every rank calls it). `auto` -> the newest checkpoint here that is
        whole on every rank (None if `latest` names none); a path -> the same in a checkpoint directory
        (with `latest`), or exactly one tag directory inside it. A damaged checkpoint is named on the
        console and the next older one kept by `keep_last` is used; ConfigError, naming the damaged file,
        when none is whole."""
        if resume == "auto":
            return self._newest_whole(self.dir, self._candidates(self.dir), f"--resume {resume}")
        path = Path(resume)
        if (path / LATEST).is_file():
            candidates = self._candidates(path)
            if not candidates:
                raise ConfigError(f"--resume {resume}: '{LATEST}' names a checkpoint that does not exist")
            return self._newest_whole(path, candidates, f"--resume {resume}")
        if path.is_dir() and any(path.glob("*mp_rank_*_model_states.pt")):
            return self._newest_whole(path.parent, [path.name], f"--resume {resume}")
        raise ConfigError(f"--resume {resume}: expected 'auto', a checkpoints directory with a '{LATEST}' file, "
                          "or one checkpoint tag directory")

    def _candidates(self, directory: Path) -> list[str]:
        """The tag `latest` names, then the older tags still there, newest first. Tags newer than `latest`
        are saves that never completed; without `latest` there is nothing to resume."""
        path = directory / LATEST
        named = path.read_text().strip() if path.is_file() else ""
        if not named:
            return []
        head = [named] if (directory / named).is_dir() else []
        m = _TAG.match(named)
        if m is None:
            return head
        older = sorted(((int(t.group(1)), p.name) for p in directory.iterdir()
                        if (t := _TAG.match(p.name)) and p.is_dir() and int(t.group(1)) < int(m.group(1))),
                       reverse=True)
        return head + [name for _, name in older]

    def _newest_whole(self, directory: Path, candidates: list[str], what: str) -> tuple[Path, str] | None:
        if not candidates:
            return None
        candidates = _same_on_all_ranks(candidates)
        problems = _first_problem_over_ranks([self._problem(directory / tag) for tag in candidates])
        for i, (tag, problem) in enumerate(zip(candidates, problems)):
            if problem is None:
                self._fallbacks[(directory, tag)] = [t for t, p in zip(candidates[i + 1:], problems[i + 1:]) if p is None]
                return directory, tag
            if i + 1 < len(candidates):
                self._say(f"checkpoint {directory / tag} is damaged: {problem}; falling back to the older "
                          f"{candidates[i + 1]}")
        damaged = "; ".join(f"{tag}: {p}" for tag, p in zip(candidates, problems))
        raise ConfigError(f"{what}: no whole checkpoint to resume from in {directory} ({damaged}). Delete the damaged "
                          "checkpoint(s) to start afresh, or resume from another checkpoint with --resume PATH")

    def _problem(self, tag_dir: Path) -> str | None:
        """Why this rank cannot load `tag_dir` (the damaged file and what is wrong with it), or None."""
        if not any(tag_dir.glob("*model_states.pt")):
            return f"{tag_dir}: no DeepSpeed model states"
        for path in sorted(tag_dir.glob("*.pt")):
            m = _RANK_FILE.search(path.name)
            if m is None or int(m.group(1) or m.group(2)) == self.rank:
                problem = archive_problem(path)
                if problem:
                    return f"{path} {problem}"
        return None

    def _say(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def load(self, engine, load_dir: Path, tag: str, generator: torch.Generator | None) -> TrainState:
        """Collective. Restores model, optimizer, scheduler, loss scaler, KD projections, RNG, data position.

        A checkpoint that `resolve` found whole but that fails to load (on any rank) falls back to the next
        older whole one, on every rank together; `self.loaded` is the (directory, tag) loaded in the end.
        The ranks agree after each attempt, so a failure must happen before DeepSpeed's own collectives or
        on every rank alike (the shared model states of ZeRO 0-2); the checks in `resolve` are what keeps
        one rank's damaged shard from stranding the others inside DeepSpeed."""
        load_dir = Path(load_dir)
        tags = [tag, *self._fallbacks.get((load_dir, tag), [])]
        for i, attempt in enumerate(tags):
            try:
                state, error = self._load_one(engine, load_dir, attempt, generator), None
            except Exception as e:  # noqa: BLE001 - any failure to read a checkpoint means "try the older one"
                state, error = None, f"{type(e).__name__}: {e}"
            error = _first_problem_over_ranks([error])[0]
            if error is None:
                self.loaded = (load_dir, attempt)
                return state
            if i + 1 < len(tags):
                self._say(f"checkpoint {load_dir / attempt} could not be loaded ({error}); falling back to the "
                          f"older {tags[i + 1]}")
        tried = f"{load_dir / tag}" if len(tags) == 1 else f"{load_dir} (tried {', '.join(tags)}; the last)"
        raise ConfigError(f"checkpoint {tried} could not be loaded: {error}")

    def _load_one(self, engine, load_dir: Path, tag: str, generator: torch.Generator | None) -> TrainState:
        path, client = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise ConfigError(f"DeepSpeed found no checkpoint files in {load_dir / tag}")
        rng_file = load_dir / tag / f"rng_rank{self.rank}.pt"
        if rng_file.is_file():  # absent when resuming with more ranks than saved: fresh streams then
            set_rng_state(torch.load(rng_file, weights_only=False), generator)
        return TrainState(**client["train_state"])


def archive_problem(path: Path) -> str | None:
    """What makes `path` not a whole `torch.save` archive, or None. Cheap: reads the zip central directory at
    the end of the file (a truncated or half-written file has none) and checks that every entry it lists
    lies inside the file; the data itself is not read."""
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.header_offset + info.compress_size > size:
                    return f"is cut short: entry {info.filename} ends past its {size} bytes"
    except FileNotFoundError:
        return "is missing"
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as e:
        return f"is not a whole torch archive ({type(e).__name__}: {e}; truncated or damaged)"
    return None


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def _same_on_all_ranks(value: list) -> list:
    """Rank 0's `value` on every rank (the candidate tags, in case ranks see different directories)."""
    if not _distributed():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _first_problem_over_ranks(problems: list[str | None]) -> list[str | None]:
    """Per entry, the first rank's problem (with its rank) when any rank has one; the same list on every rank."""
    if not _distributed():
        return problems
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, problems)
    return [next((f"{p[i]} (rank {r})" for r, p in enumerate(gathered) if p[i] is not None), None)
            for i in range(len(problems))]


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
    """The student's fp32 weights from a DeepSpeed checkpoint of a task, whatever the ZeRO stage.

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
    student = {k[len("student."):]: v.float() for k, v in state.items() if k.startswith("student.")}
    # A bf16/fp16 run keeps the momentum EMA in fp32 beside the student (MomentumMaster): prefer it
    # to the student's copies, which hold it rounded to the training dtype.
    master = "momentum_master."
    student.update({"momentum." + k[len(master):]: v.float() for k, v in state.items() if k.startswith(master)})
    return student


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


def load_source_model(source: str | Path):
    """A trained model from a training run directory (its student) or anything `load_model` takes."""
    from dlip_ds.models.load import load_model

    path = Path(source)
    if path.is_dir() and (path / "config.yaml").is_file() and not (path / "config.json").is_file():
        return load_run_student(path)[0]
    return load_model(source)
