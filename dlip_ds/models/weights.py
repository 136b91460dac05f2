"""Reading checkpoint files and loading them strictly.

Weights are read with safetensors or `torch.load(weights_only=True)`; nothing is unpickled. Every load is
strict: a key that does not fit fails with the list of missing and unexpected keys.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from dlip_ds.config import ConfigError
from dlip_ds.models.vit import resize_pos_embed
from dlip_ds.models.vlp import VLPModel

log = logging.getLogger(__name__)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def read_weights(path: Path) -> dict:
    """A state dict from safetensors or a weights-only torch file (nested `{"model": ...}` unwrapped)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling refusal is the user's file, not our bug
        raise ConfigError(f"{path}: cannot read it as a weights-only torch checkpoint ({e})") from None
    for key in ("model", "state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def read_hf_weights(path: Path) -> dict:
    """The whole state dict of a transformers model directory, single file or sharded."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return read_weights(path / name)
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / name).is_file():
            shards = sorted(set(read_json(path / name)["weight_map"].values()))
            state: dict = {}
            for shard in shards:
                state.update(read_weights(path / shard))
            return state
    raise ConfigError(f"{path}: no model.safetensors or pytorch_model.bin")


def _show(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _check_fit(own: dict, state: dict, missing: set, source: str) -> None:
    unexpected = set(state) - set(own)
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


def load_module_strict(module: torch.nn.Module, state: dict, source: str) -> None:
    own = module.state_dict()
    _check_fit(own, state, set(own) - set(state), source)
    module.load_state_dict(state)


def load_state_strict(model: VLPModel, state: dict, source: str, allow_missing: tuple[str, ...] = ()) -> None:
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
    kept = {k for k in missing if k.startswith(allow_missing)} if allow_missing else set()
    if kept:
        log.warning("%s: no weights for %s; they keep their initialisation", source,
                    _show({k.rsplit(".", 2)[0] if k.count(".") > 2 else k for k in kept}, 6))
        missing -= kept
    fill_momentum = bool(model.cfg.momentum and missing and all(k.startswith("momentum.") for k in missing))
    if fill_momentum:
        missing = set()
    _check_fit(own, state, missing, source)
    model.load_state_dict(state, strict=not (fill_momentum or kept))
    if fill_momentum:
        model.reset_momentum()
