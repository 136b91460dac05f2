"""Our exported model directory: `config.json` (`{"format": "dlip_ds", "model": ModelConfig}`) and
`model.safetensors`, plus the tokenizer's files when one is given."""

from __future__ import annotations

import json
from pathlib import Path

from dlip_ds.config import ConfigError, deep_merge, model_config_from_dict, to_dict
from dlip_ds.models.vlp import VLPModel
from dlip_ds.models.weights import load_state_strict, read_json

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "dlip_ds"


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


def load_dlip(path: Path, overrides: dict) -> VLPModel:
    """A directory written by `save_model`; `overrides` are merged into its stored ModelConfig."""
    from safetensors.torch import load_file

    meta = read_json(path / CONFIG_NAME)
    cfg = model_config_from_dict(deep_merge(meta["model"], overrides), f"{path / CONFIG_NAME}:model")
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise ConfigError(f"{path}: {WEIGHTS_NAME} is missing")
    model = VLPModel(cfg)
    load_state_strict(model, load_file(str(weights)), str(weights))
    return model
