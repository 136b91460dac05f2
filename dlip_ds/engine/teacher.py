"""The frozen teacher: loaded once, no gradients, no optimizer state, run by DeepSpeed inference.

It is never a submodule of the trained `StepModule`, so ZeRO neither shards nor checkpoints it;
`deepspeed.init_inference` places it on the device in fp16 (CUDA) or bf16 (CPU, where fp16 matmuls
are slow or missing) and splits it over `tp_size` devices when it does not fit one.
"""

from __future__ import annotations

import functools
import time

import torch

from dlip_ds.config import ConfigError, TeacherConfig
from dlip_ds.models.vlp import VLPModel

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# The stage methods StepModule calls on a teacher (design card section 3).
STAGE_METHODS = ("encode_image", "encode_text", "fuse", "decode", "lm_features", "lm_projection", "temperature")


def teacher_dtype(cfg: TeacherConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    if cfg.dtype == "fp16" and device.type != "cuda":
        raise ConfigError("teacher.dtype=fp16 needs a CUDA device; use bf16 or auto on CPU")
    return _DTYPES[cfg.dtype]


def load_teacher(cfg: TeacherConfig) -> VLPModel:
    """`load_model(cfg.source)`, frozen and in eval mode, still fp32 on the CPU (students may be
    initialised from it before `to_inference` casts it)."""
    from dlip_ds.models.checkpoints import load_model

    return load_model(cfg.source).requires_grad_(False).eval()


def to_inference(model: VLPModel, cfg: TeacherConfig, device: torch.device) -> VLPModel:
    """Wrap the frozen teacher with `deepspeed.init_inference` (cast, placed, split over tp_size)."""
    import deepspeed

    engine = deepspeed.init_inference(
        model,
        dtype=teacher_dtype(cfg, device),
        tensor_parallel={"tp_size": cfg.tp_size},
        replace_with_kernel_inject=False,  # keep our own attention: taps read Q and K from it
    )
    # StepModule calls the stage methods of the module the engine prepared.
    return engine.module


class StageClock:
    """Wall time spent in the teacher's stage methods, for the time split in TensorBoard.

    The teacher runs inside the student's forward (StepModule calls it), so its time can only be
    told apart at its own method calls; each is synchronised with the device so the time is its own.
    """

    def __init__(self, model: VLPModel, device: torch.device):
        self.seconds = 0.0
        self._sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        for name in STAGE_METHODS:
            setattr(model, name, self._timed(getattr(model, name)))

    def _timed(self, method):
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            self._sync()
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self._sync()
                self.seconds += time.perf_counter() - start

        return wrapper

    def take(self) -> float:
        """Seconds accumulated since the previous call."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds
