"""Recipes: YAML files (shipped ones live in `recipes/`) read into a checked `Recipe`.

A recipe may name a `base:` recipe it extends; overrides use dotted keys
(`--set student.vision.depth=6`) whose values are read as YAML scalars. A student section is
`{preset, init, <ModelConfig fields>}`: the preset's fields, overridden by the ones given.
"""

from __future__ import annotations

import re
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from dlip_ds.config import (
    ConfigError,
    InitConfig,
    Recipe,
    StudentConfig,
    check_kd_term,
    deep_merge,
    did_you_mean,
    from_dict,
    model_config_from_dict,
    to_dict,
)
from dlip_ds.models.presets import preset_dict
from dlip_ds.tasks import TASKS

RECIPE_DIR = "recipes"


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` (no dot) as a float, as people write learning rates."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def parse_override(text: str) -> dict:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override '{text}': empty key")
    value = load_yaml(raw) if raw.strip() else ""
    out: dict = {}
    cur = out
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def resolve_student(data: dict, path: str = "student") -> StudentConfig:
    """`{preset | source, init, <model fields>}` -> StudentConfig, model fields overriding the preset.

    With `source` the architecture is the source model's, known only when the run builds it
    (`dlip_ds.engine.build`); the model fields given are kept as `overrides` and checked here."""
    data = dict(data or {})
    preset = data.pop("preset", "") or ""
    source = str(data.pop("source", "") or "")
    init = data.pop("init", {}) or {}
    model = data.pop("model", {}) or {}
    model = deep_merge(model, data)  # `student.vision.depth` and `student.model.vision.depth` both work
    if source and preset:
        raise ConfigError(f"{path}: give preset or source, not both (source: the trained model a task fine-tunes)")
    base = preset_dict(preset) if preset else {}
    return StudentConfig(
        preset=preset,
        model=model_config_from_dict(deep_merge(base, model), f"{path}"),
        init=from_dict(InitConfig, init, f"{path}.init"),
        source=source,
        overrides=model if source else {},
    )


def shipped_recipes() -> list[str]:
    root = resources.files("dlip_ds") / RECIPE_DIR
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def _read_recipe_dict(name_or_path: str) -> tuple[dict, Path | None]:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        return load_yaml(path.read_text()) or {}, path
    res = resources.files("dlip_ds") / RECIPE_DIR / f"{name_or_path}.yaml"
    if not res.is_file():
        names = shipped_recipes()
        raise ConfigError(
            f"no recipe '{name_or_path}': not a file, and not a shipped recipe{did_you_mean(name_or_path, names)}; "
            f"shipped: {', '.join(names)}"
        )
    return load_yaml(res.read_text()) or {}, None


def load_recipe_dict(name_or_path: str, overrides: typing.Sequence[str] = ()) -> dict:
    """Raw recipe dict with `base:` inheritance resolved and overrides applied."""
    data, path = _read_recipe_dict(name_or_path)
    base = data.pop("base", None)
    if base:
        if path is not None and not Path(base).is_absolute() and (path.parent / base).exists():
            base = str(path.parent / base)
        data = deep_merge(load_recipe_dict(base), data)
    for ov in overrides:
        data = deep_merge(data, parse_override(ov))
    return data


def recipe_from_dict(data: dict) -> Recipe:
    data = dict(data)
    student = resolve_student(data.pop("student", {}) or {})
    recipe = from_dict(Recipe, data)
    recipe.student = student
    validate_recipe(recipe)
    return recipe


def load_recipe(name_or_path: str, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Load a recipe (a YAML path or a shipped recipe name) with dotted overrides, validated."""
    data = load_recipe_dict(name_or_path, overrides)
    data.setdefault("name", Path(name_or_path).stem)
    return recipe_from_dict(data)


def validate_recipe(r: Recipe) -> None:
    """Checks that need the whole recipe but no model; it changes nothing in `r`."""
    if r.task not in TASKS:
        raise ConfigError(f"task must be {'|'.join(TASKS)}, got '{r.task}'{did_you_mean(r.task, TASKS)}")
    for i, term in enumerate(r.loss.kd):
        check_kd_term(term, f"loss.kd[{i}]")
    if r.loss.kd and not r.teacher.source:
        raise ConfigError("loss.kd lists distillation terms but teacher.source is empty")
    if r.teacher.tp_size != 1:
        raise ConfigError(
            f"teacher.tp_size={r.teacher.tp_size}: only 1 is supported. A tensor-parallel teacher would need every "
            "rank of its group to run it on the same inputs, while each rank trains on its own micro-batch, and "
            "DeepSpeed's automatic tensor parallelism slices this model's fused ViT qkv projection wrongly. The "
            "teacher runs whole on each device: in fp16/bf16 (teacher.dtype) BLIP ViT-B takes about 0.5 GB")
    if r.loss.itc_soft_targets == "teacher" and not r.teacher.source:
        raise ConfigError("loss.itc_soft_targets=teacher needs teacher.source")
    if r.loss.itc_soft_targets == "momentum" and not r.student.model.momentum:
        raise ConfigError("loss.itc_soft_targets=momentum needs student.momentum=true")
    if r.loss.alpha_warmup_steps < 0:
        raise ConfigError(f"loss.alpha_warmup_steps must be >= 0 (0 = no ramp), got {r.loss.alpha_warmup_steps}")
    for name in ("batch_size", "workers"):
        if getattr(r.data, name) < (1 if name == "batch_size" else 0):
            raise ConfigError(f"data.{name} has an invalid value {getattr(r.data, name)}")
    if r.data.weights is not None:
        n = len(r.data.train_shards) if isinstance(r.data.train_shards, list) else 1
        if len(r.data.weights) != n:
            raise ConfigError(f"data.weights has {len(r.data.weights)} entries for {n} train_shards sources")
    if r.data.tokenizer and not Path(r.data.tokenizer).exists() and "/" in r.data.tokenizer \
            and (r.data.tokenizer.startswith((".", "/", "~"))):
        raise ConfigError(f"data.tokenizer: no such directory {r.data.tokenizer}")
    if r.train.max_steps < 1 or r.train.grad_accum < 1:
        raise ConfigError("train.max_steps and train.grad_accum must be >= 1")


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    data = to_dict(recipe)
    student = data.pop("student")
    data["student"] = {"preset": student["preset"], "init": student["init"], **student["model"]}
    if student["source"]:  # the resolved architecture, as overrides of the source's: rebuilt identically
        data["student"]["source"] = student["source"]
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
