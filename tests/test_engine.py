"""Engine pieces that need no training run: DeepSpeed configs, optimizer groups and schedule,
checkpoint bookkeeping (crash mid-save, pruning), stop requests, launcher environments."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from dlip_ds.config import ConfigError
from dlip_ds.engine import distributed
from dlip_ds.engine.checkpoint import (
    LATEST,
    CheckpointManager,
    StopRequest,
    TrainState,
    tag_for,
)
from dlip_ds.engine.ds_config import (
    compute_dtype,
    find_ds_config,
    resolve_ds_config,
    shipped_ds_configs,
    zero_stage,
)
from dlip_ds.engine.optim import param_groups, warmup_cosine
from dlip_ds.recipe import load_recipe

# --------------------------------------------------------------------------- DeepSpeed configs


def test_shipped_configs_cover_every_stage_and_precision():
    names = set(shipped_ds_configs())
    for zero in ("zero0", "zero1", "zero2", "zero3", "zero3_offload"):
        for prec in ("bf16", "fp16"):
            assert f"{zero}_{prec}" in names
    assert "zero2_fp32" in names  # for CPUs without bf16 matrix units
    for name in names:
        cfg = json.loads(find_ds_config(name).read_text())
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            assert cfg[key] == "auto", (name, key)
        stage = int(name[4])
        assert zero_stage(cfg) == stage
        expected = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name.rsplit("_", 1)[1]]
        assert compute_dtype(cfg) == expected
        offload = cfg["zero_optimization"].get("offload_optimizer", {}).get("device")
        assert offload == ("cpu" if "offload" in name else None)


def test_auto_fields_filled_from_recipe():
    recipe = load_recipe("tiny-pretrain", ["data.batch_size=3", "train.grad_accum=5", "train.grad_clip=0.5"])
    cfg = resolve_ds_config("zero3_bf16", recipe, world_size=4)
    assert cfg["train_micro_batch_size_per_gpu"] == 3
    assert cfg["gradient_accumulation_steps"] == 5
    assert cfg["train_batch_size"] == 3 * 5 * 4
    assert cfg["gradient_clipping"] == 0.5


def test_disagreement_is_a_clear_error(tmp_path):
    recipe = load_recipe("tiny-pretrain", ["data.batch_size=3"])
    cfg = json.loads(find_ds_config("zero2_bf16").read_text())
    cfg["train_micro_batch_size_per_gpu"] = 4
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu is 4 but the recipe gives 3 \(data.batch_size\)"):
        resolve_ds_config(str(path), recipe, world_size=1)
    cfg["train_micro_batch_size_per_gpu"] = "auto"
    cfg["train_batch_size"] = 64
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="train_batch_size is 64 .* world size"):
        resolve_ds_config(str(path), recipe, world_size=2)
    cfg["train_batch_size"] = "auto"
    cfg["optimizer"] = {"type": "AdamW"}
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="remove the 'optimizer' section"):
        resolve_ds_config(str(path), recipe, world_size=1)
    with pytest.raises(ConfigError, match="no such JSON file .* zero2_bf16"):
        resolve_ds_config("zero9_bf16", recipe, world_size=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused on CPU only")
def test_fp16_refused_on_cpu():
    with pytest.raises(ConfigError, match="fp16 training needs a CUDA device"):
        resolve_ds_config("zero2_fp16", load_recipe("tiny-pretrain"), world_size=1)


# --------------------------------------------------------------------------- optimizer and schedule


def test_param_groups_exclude_norms_biases_and_positions():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            self.norm = torch.nn.LayerNorm(4)
            self.pos_embed = torch.nn.Parameter(torch.zeros(1, 3, 4))
            self.temp = torch.nn.Parameter(torch.tensor(0.07))
            self.frozen = torch.nn.Linear(4, 4).requires_grad_(False)

    model = Tiny()
    decay, no_decay = param_groups(model, 0.05)
    ids = lambda group: {id(p) for p in group["params"]}
    assert ids(decay) == {id(model.proj.weight)} and decay["weight_decay"] == 0.05
    assert ids(no_decay) == {id(p) for p in (model.proj.bias, model.norm.weight, model.norm.bias, model.pos_embed,
                                              model.temp)}
    assert no_decay["weight_decay"] == 0.0


def test_warmup_cosine_against_the_formula():
    lr, min_lr, warmup, total = 1e-3, 1e-5, 10, 110
    sched = warmup_cosine(warmup, total, min_lr / lr)
    for step in range(total + 5):
        if step < warmup:
            want = lr * (step + 1) / (warmup + 1)
        else:
            t = min(1.0, (step - warmup) / (total - warmup))
            want = min_lr + (lr - min_lr) * (1 + math.cos(math.pi * t)) / 2
        assert lr * sched(step) == pytest.approx(want, rel=1e-9)
    assert sched(warmup) == pytest.approx(1.0) and lr * sched(total) == pytest.approx(min_lr)


# --------------------------------------------------------------------------- checkpoints


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS", "SLURM_PROCID",
                 "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


def _clean_launcher_env(monkeypatch):
    """Unset the launcher variables; setenv first so monkeypatch restores even those that were unset."""
    for key in LAUNCHER_VARS:
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)


@pytest.fixture
def gloo_world_of_one(monkeypatch):
    """A one-process gloo group, as `dlip-ds train` makes on a CPU without a launcher."""
    _clean_launcher_env(monkeypatch)
    created = not torch.distributed.is_initialized()
    if created:
        distributed._export_rank_env()
        torch.distributed.init_process_group("gloo")
    yield
    if created:
        torch.distributed.destroy_process_group()


class FakeEngine:
    """Stands in for a DeepSpeed engine: writes files the way save_checkpoint does; can crash mid-save."""

    def __init__(self, crash: bool = False):
        self.crash = crash

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False  # `latest` is ours to write, after every rank's files
        d = os.path.join(save_dir, tag)
        os.makedirs(d, exist_ok=True)
        torch.save({"client": client_state}, os.path.join(d, "mp_rank_00_model_states.pt"))
        if self.crash:
            raise KeyboardInterrupt("killed while writing the optimizer shards")
        torch.save({}, os.path.join(d, "zero_pp_rank_0_mp_rank_00_optim_states.pt"))


def test_crash_mid_save_keeps_latest_on_the_last_complete_checkpoint(tmp_path, gloo_world_of_one):
    ckpt = CheckpointManager(tmp_path, rank=0, keep_last=2)
    assert ckpt.resolve("auto") is None
    ckpt.save(FakeEngine(), TrainState(step=10), None)
    assert (tmp_path / LATEST).read_text() == tag_for(10)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(FakeEngine(crash=True), TrainState(step=20), None)
    assert (tmp_path / tag_for(20)).is_dir()  # the broken one is on disk ...
    assert ckpt.resolve("auto") == (tmp_path, tag_for(10))  # ... but resume never sees it
    assert not list(tmp_path.glob(".*tmp"))


def test_keep_last_k_and_resume_paths(tmp_path, gloo_world_of_one):
    ckpt = CheckpointManager(tmp_path, rank=0, keep_last=2)
    for step in (1, 2, 3, 4):
        ckpt.save(FakeEngine(), TrainState(step=step), torch.Generator())
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [tag_for(3), tag_for(4)]
    assert (tmp_path / tag_for(4) / "rng_rank0.pt").is_file()
    assert ckpt.resolve(str(tmp_path)) == (tmp_path, tag_for(4))
    assert ckpt.resolve(str(tmp_path / tag_for(3))) == (tmp_path, tag_for(3))
    with pytest.raises(ConfigError, match="--resume"):
        ckpt.resolve(str(tmp_path / "nowhere"))


def test_stop_request_from_signal_and_file(tmp_path):
    old = {sig: signal.getsignal(sig) for sig in StopRequest.SIGNALS}
    try:
        stop = StopRequest(tmp_path)
        assert stop.requested() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested() == "SIGUSR1"
        stop = StopRequest(tmp_path)
        (tmp_path / "STOP").touch()
        assert stop.requested() == "STOP"
        stop.clear()
        assert stop.requested() is None
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------- launcher environments


@pytest.mark.parametrize("launcher", ["torchrun", "slurm", "plain"])
def test_rank_environment(monkeypatch, launcher):
    _clean_launcher_env(monkeypatch)
    if launcher == "torchrun":
        monkeypatch.setenv("RANK", "3")
        monkeypatch.setenv("WORLD_SIZE", "8")
        monkeypatch.setenv("MASTER_PORT", "29500")
    elif launcher == "slurm":
        for key, value in {"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "1234",
                           "SLURM_JOB_NODELIST": "gpu-node7"}.items():
            monkeypatch.setenv(key, value)
    distributed._export_rank_env()
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    if launcher == "torchrun":
        assert env == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29500"}
    elif launcher == "slurm":
        assert env == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu-node7",
                       "MASTER_PORT": str(20000 + 1234)}
    else:
        assert env["RANK"] == "0" and env["WORLD_SIZE"] == "1" and int(env["MASTER_PORT"]) > 0


# --------------------------------------------------------------------------- shipped recipes


@pytest.mark.parametrize("name", ["tiny-pretrain", "tiny-distill", "blip-distill-dlip-small", "blip-distill-dlip-base",
                                  "blip-pretrain-dlip-small"])
def test_engine_recipes_load_and_fit_every_ds_config(name):
    recipe = load_recipe(name)
    assert bool(recipe.teacher.source) == ("distill" in name) == bool(recipe.loss.kd)
    for ds in shipped_ds_configs():
        if ds.endswith("fp16") and not torch.cuda.is_available():
            continue
        cfg = resolve_ds_config(ds, recipe, world_size=8)
        assert cfg["train_batch_size"] == recipe.data.batch_size * recipe.train.grad_accum * 8


def test_cpu_threads_leave_room_for_ranks_and_data_workers(monkeypatch):
    from dlip_ds.engine.distributed import limit_cpu_threads

    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    try:
        assert limit_cpu_threads(data_workers=2) == 2 and torch.get_num_threads() == 2  # 16 / 4 - 2
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
        assert limit_cpu_threads(data_workers=2) == 1  # never below one
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert limit_cpu_threads(data_workers=2) is None  # the user's choice stands
    finally:
        torch.set_num_threads(before)


def test_teacher_dtype_auto_follows_the_cpus_bf16_support(monkeypatch):
    """auto: fp16 on CUDA; on a CPU bf16 only where it computes bf16 natively (an AVX2 CPU emulates
    it, several times slower than fp32); an explicit dtype is kept."""
    from dlip_ds.config import TeacherConfig
    from dlip_ds.engine import teacher as t

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda n=native: n, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
        assert t.teacher_dtype(TeacherConfig(dtype="auto"), cpu) == expected
        assert t.teacher_dtype(TeacherConfig(dtype="auto"), cuda) == torch.float16
        assert t.teacher_dtype(TeacherConfig(dtype="bf16"), cpu) == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert t.teacher_dtype(TeacherConfig(dtype="auto"), cpu) == torch.bfloat16
