"""DeepSpeed JSON configs: find them, fill their "auto" fields from the recipe, check the rest.

The recipe owns batch size, accumulation, clipping, optimizer and schedule; the DeepSpeed config
owns ZeRO stage, offload and precision. A field set in both must agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dlip_ds.config import ConfigError, Recipe

# Shipped configs live at the repository's top level, beside the package.
DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
DEFAULT_DS_CONFIG = "zero2_bf16"


def shipped_ds_configs() -> list[str]:
    return sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))


def find_ds_config(name_or_path: str) -> Path:
    """A JSON path, or the name of a shipped config (`zero2_bf16`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = DS_CONFIG_DIR / f"{name_or_path}.json"
    if shipped.is_file():
        return shipped
    raise ConfigError(
        f"--deepspeed {name_or_path}: no such JSON file and no shipped config of that name "
        f"(shipped in {DS_CONFIG_DIR}: {', '.join(shipped_ds_configs()) or 'none found'})"
    )


def resolve_ds_config(name_or_path: str, recipe: Recipe, world_size: int) -> dict:
    """The DeepSpeed config dict with "auto" filled from the recipe; ConfigError on disagreement."""
    path = find_ds_config(name_or_path)
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    for owned in ("optimizer", "scheduler"):
        if owned in cfg:
            raise ConfigError(
                f"{path}: remove the '{owned}' section; the recipe's train section (lr, min_lr, "
                "weight_decay, warmup_steps) sets the optimizer and its schedule"
            )
    micro, accum = recipe.data.batch_size, recipe.train.grad_accum
    wanted = {
        "train_micro_batch_size_per_gpu": (micro, "data.batch_size"),
        "gradient_accumulation_steps": (accum, "train.grad_accum"),
        "train_batch_size": (micro * accum * world_size,
                             f"data.batch_size x train.grad_accum x world size = {micro} x {accum} x {world_size}"),
        "gradient_clipping": (recipe.train.grad_clip, "train.grad_clip"),
    }
    for key, (value, source) in wanted.items():
        given = cfg.get(key, "auto")
        if given == "auto":
            cfg[key] = value
        elif given != value:
            raise ConfigError(
                f"{path}: {key} is {given!r} but the recipe gives {value!r} ({source}); "
                f'set it to "auto" or change the recipe'
            )
    fp16 = cfg.get("fp16", {}).get("enabled", False) is True
    bf16 = cfg.get("bf16", cfg.get("bfloat16", {})).get("enabled", False) is True
    if fp16 and bf16:
        raise ConfigError(f"{path}: fp16 and bf16 are both enabled; choose one")
    if fp16 and not torch.cuda.is_available():
        raise ConfigError(f"{path}: fp16 training needs a CUDA device; on CPU use a bf16 config (e.g. zero2_bf16)")
    return cfg


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def optimizer_offloaded(ds_config: dict) -> bool:
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)


def compute_dtype(ds_config: dict) -> torch.dtype:
    if ds_config.get("fp16", {}).get("enabled", False):
        return torch.float16
    if ds_config.get("bf16", ds_config.get("bfloat16", {})).get("enabled", False):
        return torch.bfloat16
    return torch.float32
