"""Backend choice for the fused loss kernels.

"auto" runs the fused implementation on CUDA tensors and the PyTorch reference elsewhere, except
where the fused form is plain PyTorch (the chunked `linear_kd_loss`), which runs everywhere.
A Triton backend on CPU tensors only works under the Triton interpreter, which must be
selected (`TRITON_INTERPRET=1`) before `triton` is imported.
"""

from __future__ import annotations

import importlib.util
import os

import torch


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def resolve_backend(
    op: str, backend: str, device: torch.device, choices: tuple[str, ...], cpu_auto: str = "torch"
) -> str:
    """Map `backend` (one of `choices` or "auto") to a concrete backend for tensors on `device`.

    `choices[0]` is the fused backend that "auto" uses on CUDA (falling back to the "torch"
    reference when it is Triton and triton is not installed); `cpu_auto` is what "auto" uses elsewhere.
    """
    if backend not in (*choices, "auto"):
        raise ValueError(f"{op}: backend must be one of {('auto', *choices)}, got {backend!r}")
    if backend == "auto":
        if device.type != "cuda":
            return cpu_auto
        backend = choices[0] if choices[0] != "triton" or triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend='triton' needs the `triton` package (pip install triton)")
        if device.type != "cuda" and not interpreter_enabled():
            raise RuntimeError(
                f"{op}: backend='triton' on {device.type} tensors runs only under the Triton interpreter; "
                "set TRITON_INTERPRET=1 before importing triton, or use backend='torch'"
            )
    return backend
