"""Checkpoints in and out: presets, our exported directories, transformers BLIP, Salesforce BLIP `.pth`,
timm ViT and transformers BERT (student initialisation).

Weights are read with safetensors or `torch.load(weights_only=True)`; nothing is unpickled. Every load is
strict: a key that does not fit fails with the list of missing and unexpected keys.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dlip_ds.config import (
    ConfigError,
    deep_merge,
    model_config_from_dict,
    to_dict,
)
from dlip_ds.models.presets import PRESETS, preset_dict
from dlip_ds.models.vit import resize_pos_embed
from dlip_ds.models.vlp import VLPModel

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "dlip_ds"


# --------------------------------------------------------------------------- strict loading


def _show(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_state_strict(model: VLPModel, state: dict, source: str) -> None:
    """Load `state` into `model`; missing or unexpected keys or shapes are a ConfigError naming them.

    Allowed gaps: momentum copies absent from the checkpoint are copied from the online weights, those of
    a model built without momentum are dropped (logged), and position embeddings of another grid are resized.
    """
    own = model.state_dict()
    state = dict(state)
    if not model.cfg.momentum:
        dropped = [k for k in state if k.startswith("momentum.")]
        if dropped:
            log.info("%s: dropping %d momentum-encoder tensors (the model has momentum=false)", source, len(dropped))
            for k in dropped:
                del state[k]
    for key in [k for k in state if k.endswith("pos_embed") and k in own]:
        if state[key].shape != own[key].shape:
            grid = model.cfg.vision.image_size // model.cfg.vision.patch_size
            state[key] = resize_pos_embed(state[key], (grid, grid))
    missing = set(own) - set(state)
    unexpected = set(state) - set(own)
    fill_momentum = model.cfg.momentum and missing and all(k.startswith("momentum.") for k in missing)
    if fill_momentum:
        missing = set()
    bad_shape = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in set(own) & set(state) if state[k].shape != own[k].shape]
    if missing or unexpected or bad_shape:
        parts = [f"{source}: the checkpoint does not fit the model"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_show(unexpected)}")
        if bad_shape:
            parts.append(f"shape mismatches ({len(bad_shape)}): {_show(bad_shape)}")
        raise ConfigError("\n  ".join(parts))
    model.load_state_dict(state, strict=not fill_momentum)
    if fill_momentum:
        model.reset_momentum()


# --------------------------------------------------------------------------- our format


def save_model(model: VLPModel, out_dir: str | Path, tokenizer=None) -> Path:
    """Write `config.json` + `model.safetensors` (+ tokenizer files) that `load_model` reads back."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(json.dumps({"format": FORMAT, "model": to_dict(model.cfg)}, indent=2))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": FORMAT})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def _load_ours(path: Path, overrides: dict) -> VLPModel:
    from safetensors.torch import load_file

    meta = _read_json(path / CONFIG_NAME)
    cfg = model_config_from_dict(deep_merge(meta["model"], overrides), f"{path / CONFIG_NAME}:model")
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise ConfigError(f"{path}: {WEIGHTS_NAME} is missing")
    model = VLPModel(cfg)
    load_state_strict(model, load_file(str(weights)), str(weights))
    return model


# --------------------------------------------------------------------------- front door


def load_model(source: str | Path, **overrides) -> VLPModel:
    """A `VLPModel` from a preset name (random init), a directory written by `save_model`/`dlip-ds export`,
    a transformers BLIP directory, or a Salesforce BLIP `.pth` (its med config json beside it or given
    with `med_config=`). `overrides` are ModelConfig fields (nested dicts for sections), e.g.
    `load_model("blip-base", momentum=True, vision={"image_size": 384})`. Returned in eval mode.
    """
    med_config = overrides.pop("med_config", None)
    src = str(source)
    path = Path(src).expanduser()
    if src in PRESETS:
        model = VLPModel(model_config_from_dict(deep_merge(preset_dict(src), overrides), f"preset '{src}'"))
    elif path.is_dir() and (path / CONFIG_NAME).is_file():
        meta = _read_json(path / CONFIG_NAME)
        if meta.get("format") == FORMAT:
            model = _load_ours(path, overrides)
        elif meta.get("model_type") == "blip" or "text_config" in meta:
            model = _load_hf_blip(path, overrides)
        else:
            raise ConfigError(f"{path / CONFIG_NAME}: neither a dlip_ds export nor a transformers BLIP config")
    elif path.is_file() and path.suffix in (".pth", ".pt", ".bin"):
        model = _load_salesforce_blip(path, med_config, overrides)
    elif path.exists():
        raise ConfigError(f"model source {src}: expected a directory with {CONFIG_NAME} or a .pth file")
    else:
        raise ConfigError(f"model source '{src}': not a preset ({', '.join(PRESETS)}) and no such file or directory")
    return model.eval()



# --------------------------------------------------------------------------- transformers / Salesforce BLIP


def _load_hf_blip(path: Path, overrides: dict) -> VLPModel:
    raise ConfigError(f"{path}: transformers BLIP loading lands in the next commit")


def _load_salesforce_blip(path: Path, med_config, overrides: dict) -> VLPModel:
    raise ConfigError(f"{path}: Salesforce BLIP loading lands in the next commit")
