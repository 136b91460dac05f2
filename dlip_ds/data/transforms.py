"""Image transforms: BLIP's training transform (random resized crop, horizontal flip, RandAugment)
and its evaluation transform (square resize), normalised with the model's mean/std."""

from __future__ import annotations

import re

from PIL import Image, ImageOps
from torchvision import transforms as T

from dlip_ds.config import VisionConfig

# BLIP's RandomAugment op list: geometry and contrast only. Colour-changing ops (Color, Solarize,
# Posterize, Invert) are left out: captions name colours.
_RANDAUG_OPS = ["AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX", "ShearY",
                "TranslateXRel", "TranslateYRel", "Rotate"]
_LEFT_RIGHT = re.compile(r"\b(left|right)\b")


def train_transform(vision: VisionConfig, *, min_scale: float = 0.5, randaugment: bool = True) -> T.Compose:
    """PIL RGB image -> normalised tensor [3, S, S]. The flip is separate (`hflip_pair`) because it
    must also swap "left" and "right" in the caption."""
    size = vision.image_size
    ops: list = [T.RandomResizedCrop(size, scale=(min_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC)]
    if randaugment:
        from timm.data.auto_augment import rand_augment_transform

        # BLIP: 2 ops at magnitude 5 (of 10); fill with the image mean so shears add no new colour.
        fill = tuple(round(255 * m) for m in vision.mean)
        ops.append(rand_augment_transform("rand-n2-m5-mstd0", {"img_mean": fill}, transforms=_RANDAUG_OPS))
    ops += [T.ToTensor(), T.Normalize(vision.mean, vision.std)]
    return T.Compose(ops)


def eval_transform(vision: VisionConfig) -> T.Compose:
    size = vision.image_size
    return T.Compose([
        T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(vision.mean, vision.std),
    ])


def swap_left_right(text: str) -> str:
    """"left" <-> "right" (whole words): the text of a mirrored image."""
    return _LEFT_RIGHT.sub(lambda m: "right" if m.group(1) == "left" else "left", text)


def hflip_pair(image: Image.Image, caption: str) -> tuple[Image.Image, str]:
    """Mirror the image and swap "left"/"right" in its caption, so the pair still agrees."""
    return ImageOps.mirror(image), swap_left_right(caption)
