"""`load_model`: one entry point for every model source (preset, our export, transformers BLIP,
Salesforce BLIP `.pth`)."""

from __future__ import annotations

from pathlib import Path

from dlip_ds.config import ConfigError, deep_merge, model_config_from_dict
from dlip_ds.models.dlip_format import CONFIG_NAME, FORMAT, load_dlip
from dlip_ds.models.hf_blip import load_hf_blip
from dlip_ds.models.presets import PRESETS, preset_dict
from dlip_ds.models.salesforce import load_salesforce_blip
from dlip_ds.models.vlp import VLPModel
from dlip_ds.models.weights import read_json


def load_model(source: str | Path, **overrides) -> VLPModel:
    """A `VLPModel` from a preset name (random init), a directory written by `save_model`/`dlip-ds export`,
    a transformers BLIP directory, or a Salesforce BLIP `.pth` (its med config json beside it or given
    with `med_config=`; `vision_config=` says its ViT heads, `tokenizer=` its [DEC]/[SEP] ids, see
    `load_salesforce_blip`). `overrides` are ModelConfig fields (nested dicts for sections), e.g.
    `load_model("blip-base", momentum=True, vision={"image_size": 384})`. Returned in eval mode.
    """
    pth_only = {k: overrides.pop(k) for k in ("med_config", "vision_config", "tokenizer") if k in overrides}
    src = str(source)
    path = Path(src).expanduser()
    given = [k for k, v in pth_only.items() if v is not None]
    if given and not (path.is_file() and path.suffix in (".pth", ".pt", ".bin")):
        raise ConfigError(f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} for Salesforce BLIP .pth files, "
                          f"not for {src}")
    if src in PRESETS:
        model = VLPModel(model_config_from_dict(deep_merge(preset_dict(src), overrides), f"preset '{src}'"))
    elif path.is_dir() and (path / CONFIG_NAME).is_file():
        meta = read_json(path / CONFIG_NAME)
        if meta.get("format") == FORMAT:
            model = load_dlip(path, overrides)
        elif meta.get("model_type") == "blip" or "text_config" in meta:
            model = load_hf_blip(path, overrides)
        else:
            raise ConfigError(f"{path / CONFIG_NAME}: neither a dlip_ds export nor a transformers BLIP config")
    elif path.is_file() and path.suffix in (".pth", ".pt", ".bin"):
        model = load_salesforce_blip(path, pth_only.get("med_config"), overrides,
                                     vision_config=pth_only.get("vision_config"), tokenizer=pth_only.get("tokenizer"))
    elif path.exists():
        raise ConfigError(f"model source {src}: expected a directory with {CONFIG_NAME} or a .pth file")
    else:
        raise ConfigError(f"model source '{src}': not a preset ({', '.join(PRESETS)}) and no such file or directory")
    return model.eval()
