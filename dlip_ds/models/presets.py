"""Named model sizes. A preset is a nested dict of `ModelConfig` fields (the defaults fill the rest);
recipes start from one and override fields.

What `dlip-ds profile` counts (224 px, 35-token text, 20-token caption with 3 beams; FLOPs = 2 x MACs):

| preset       | params  | vs blip-base | ITC FLOPs | ITM FLOPs | caption FLOPs |
|--------------|---------|--------------|-----------|-----------|---------------|
| blip-base    | 252.4M  | 1            | 41.1G     | 47.9G     | 66.3G         |
| dlip-base    | 131.9M  | 0.523        | 20.7G     | 22.4G     |               |
| dlip-small   | 49.9M   | 0.198        | 9.95G (0.242) | 10.4G (0.217) | 13.0G (0.195) |
| dlip-tiny    | 18.3M   | 0.072        | 2.73G     | 2.84G     |               |

The DLIP paper's small student keeps at most 22.4% of the teacher's parameters and 24.8% of its FLOPs;
`dlip-small` (DeiT-S vision, so `init.vision: timm:deit_small_patch16_224` loads as is) meets both.
`demo-student` has 23% of `demo-teacher`'s parameters at the preset vocabulary (recipes set the vocabulary
from the tokenizer): the teacher's depth in vision, three of its four text layers, at half its width.
"""

from __future__ import annotations

import copy
import difflib

from dlip_ds.config import ConfigError, ModelConfig, model_config_from_dict


def _bert(width: int, depth: int, heads: int) -> dict:
    return {"width": width, "depth": depth, "heads": heads, "intermediate": 4 * width}


def _vit(width: int, depth: int, heads: int, image_size: int = 224, patch_size: int = 16) -> dict:
    return {"width": width, "depth": depth, "heads": heads, "image_size": image_size, "patch_size": patch_size}


# BLIP ViT-B/16 (Salesforce `model_base.pth` / `Salesforce/blip-itm-base-coco`): ViT-B/16, BERT-base with
# cross-attention in all 12 layers, a decoder sharing everything but self-attention.
_BLIP_BASE = {
    "vision": _vit(768, 12, 12),
    "text": _bert(768, 12, 12),
    "fusion": {"mode": "blip", "layers": 12},
    "decoder": {"enabled": True, "share": True},
    "embed_dim": 256,
}

PRESETS: dict[str, dict] = {
    "blip-base": _BLIP_BASE,
    "blip-base-384": {**_BLIP_BASE, "vision": _vit(768, 12, 12, image_size=384)},
    # Students. Vision widths/heads match timm's DeiT so `init.vision: timm:deit_*` loads directly.
    "dlip-base": {
        "vision": _vit(768, 6, 12),
        "text": _bert(768, 6, 12),
        "fusion": {"mode": "blip", "layers": 3},
        "embed_dim": 256,
    },
    "dlip-small": {
        "vision": _vit(384, 12, 6),
        "text": _bert(384, 6, 6),
        "fusion": {"mode": "blip", "layers": 3},
        "embed_dim": 256,
    },
    "dlip-tiny": {
        "vision": _vit(192, 12, 3),
        "text": _bert(256, 4, 4),
        "fusion": {"mode": "blip", "layers": 2},
        "embed_dim": 128,
    },
    # Tiny models for unit tests (random init, CPU, milliseconds).
    "test-tiny": {
        "vision": _vit(32, 2, 2, image_size=32, patch_size=8),
        "text": {**_bert(32, 2, 2), "vocab_size": 128, "max_positions": 64, "bos_token_id": 1, "sep_token_id": 2},
        "fusion": {"mode": "blip", "layers": 2},
        "embed_dim": 16,
    },
    # The embedded demo: 64 px synthetic images, trainable on a CPU in minutes.
    "demo-teacher": {
        "vision": _vit(128, 4, 4, image_size=64, patch_size=8),
        "text": {**_bert(128, 4, 4), "vocab_size": 1024, "max_positions": 64, "bos_token_id": 1, "sep_token_id": 2},
        "fusion": {"mode": "blip", "layers": 4},
        "embed_dim": 64,
    },
    "demo-student": {
        "vision": _vit(64, 4, 2, image_size=64, patch_size=8),
        # cross-attention in the last two text layers: the captioning decoder reads the image in both
        "text": {**_bert(64, 3, 2), "vocab_size": 1024, "max_positions": 64, "bos_token_id": 1, "sep_token_id": 2},
        "fusion": {"mode": "blip", "layers": 2},
        "embed_dim": 64,
    },
}


def preset_dict(name: str) -> dict:
    """Nested dict of ModelConfig fields for preset `name` (a copy; callers may merge into it)."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown model preset '{name}'{hint}; known: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def preset_config(name: str) -> ModelConfig:
    return model_config_from_dict(preset_dict(name), f"preset '{name}'")
