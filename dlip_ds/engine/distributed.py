"""Process-group setup for every way the trainer is started.

The `deepspeed` launcher and torchrun export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT; `srun python -m dlip_ds.train` exports only SLURM_* variables, which are mapped onto
the same names; a plain `dlip-ds train` is a world of one. CPU runs use gloo.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections import Counter
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0].split("[")[0] or "127.0.0.1"


def _export_rank_env() -> None:
    """Fill the torch.distributed env:// variables when a launcher did not."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        env.setdefault("LOCAL_RANK", "0")
    elif int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", _first_slurm_host())
        # Same port on every task: derived from the job id, so concurrent jobs on a node differ.
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    else:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        if env["WORLD_SIZE"] != "1":
            raise RuntimeError("MASTER_PORT is not set for a multi-process run; start it with a launcher")
        env["MASTER_PORT"] = str(_free_port())


def init_distributed() -> DistEnv:
    """Initialise deepspeed.comm (and torch.distributed) once; return this process's place."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    _export_rank_env()
    acc = get_accelerator()
    local_rank = int(os.environ["LOCAL_RANK"])
    if acc.device_name() == "cpu":
        backend, device = "gloo", torch.device("cpu")
    else:
        acc.set_device(local_rank)
        backend, device = acc.communication_backend_name(), torch.device(acc.device_name(local_rank))
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return DistEnv(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        local_rank=local_rank,
        device=device,
    )


def limit_cpu_threads(data_workers: int) -> int | None:
    """On a CPU, give each rank its share of the cores less one per data worker, unless
    OMP_NUM_THREADS says otherwise. Oversubscribed OpenMP threads wait on each other for whole
    scheduler slices: one tiny-model step took 3.3 s with 2 threads beside a busy worker, 20 ms with 1."""
    if "OMP_NUM_THREADS" in os.environ:
        return None
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    threads = max(1, len(os.sched_getaffinity(0)) // local_world - data_workers)
    torch.set_num_threads(threads)
    return threads


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is True on any rank (so all ranks take the same branch)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Element-wise mean of a float tensor over ranks (used for logged scalars only)."""
    values = values.detach().clone()
    torch.distributed.all_reduce(values)
    return values / torch.distributed.get_world_size()


def sum_counts_over_ranks(counts: Counter) -> Counter:
    """Sum of every rank's counts (the keys may differ between ranks)."""
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, dict(counts))
    total: Counter = Counter()
    for part in gathered:
        total.update(part)
    return total


def barrier() -> None:
    torch.distributed.barrier()
