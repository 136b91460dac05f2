"""The frozen teacher: loaded once, no gradients, no optimizer state, run by DeepSpeed inference.

It is never a submodule of the trained task, so ZeRO neither shards nor checkpoints it;
`deepspeed.init_inference` places it whole on each device in fp16 (CUDA), or on a CPU in bf16 where
the CPU computes bf16 natively (AVX512-BF16 or AMX) and in fp32 elsewhere (an AVX2 CPU emulates bf16
matmuls: measured 8x slower than fp32 on an AMD EPYC Zen 3). `teacher.tp_size` must be 1: `recipe.validate_recipe` says why.
"""

from __future__ import annotations

import torch

from dlip_ds.config import ConfigError, TeacherConfig
from dlip_ds.models.vlp import VLPModel

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX), per torch's own probe."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def teacher_dtype(cfg: TeacherConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if cfg.dtype == "fp16" and device.type != "cuda":
        raise ConfigError("teacher.dtype=fp16 needs a CUDA device; use bf16 or auto on CPU")
    return _DTYPES[cfg.dtype]


def load_teacher(cfg: TeacherConfig) -> VLPModel:
    """`load_model(cfg.source)`, frozen and in eval mode, still fp32 on the CPU (students may be
    initialised from it before `to_inference` casts it)."""
    from dlip_ds.models.load import load_model

    return load_model(cfg.source).requires_grad_(False).eval()


def to_inference(model: VLPModel, cfg: TeacherConfig, device: torch.device) -> VLPModel:
    """Wrap the frozen teacher with `deepspeed.init_inference` (cast and placed; no tensor parallelism)."""
    if cfg.tp_size != 1:
        raise ConfigError(f"teacher.tp_size={cfg.tp_size}: only 1 is supported (see dlip_ds.recipe.validate_recipe)")
    import deepspeed

    engine = deepspeed.init_inference(
        model,
        dtype=teacher_dtype(cfg, device),
        tensor_parallel={"tp_size": 1},
        replace_with_kernel_inject=False,  # keep our own attention: taps read Q and K from it
    )
    # Tasks call the stage methods of the module the engine prepared.
    return engine.module
