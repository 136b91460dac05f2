"""Image transforms: BLIP's training transform (random resized crop, horizontal flip, RandAugment)
and its evaluation transform (square resize), normalised with the model's mean/std.

They come in two forms with the same distribution (tests compare them; RandAugment's geometric ops
differ in pixels, by at most 1 level away from the fill's edge: the views warp with OpenCV, timm with PIL):
- `train_transform` / `eval_transform`: torchvision Composes, PIL image -> normalised tensor,
  drawing from the global RNGs. The VQA loader, the evaluation sets and the exported processor use
  them, and they are the references in tests.
- `TrainView` / `EvalView`: what the caption loader runs. Every random choice of a sample (crop box,
  flip, RandAugment ops) is drawn first (`draw`), from the loader's own `random.Random` and the
  image's header size only. So the JPEG can then be decoded at a reduced DCT scale when the crop
  still has at least the output size (`min_decode_size`), and the GPU path applies the very same
  draws on the device. `render` applies a draw to a decoded image and returns uint8 pixels; the
  collate normalises the whole batch at once (`normalize_batch`).
"""

from __future__ import annotations

import functools
import math
import random
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import transforms as T

from dlip_ds.config import VisionConfig

# BLIP's RandomAugment op list: geometry and contrast only. Colour-changing ops (Color, Solarize,
# Posterize, Invert) are left out: captions name colours.
_RANDAUG_OPS = ["AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX", "ShearY",
                "TranslateXRel", "TranslateYRel", "Rotate"]
RANDAUGMENT = "rand-n2-m5-mstd0"  # BLIP: 2 ops at magnitude 5 (of 10), each applied with probability 0.5
# timm's op arguments at magnitude 5 (its *_level_to_arg; tests check them against timm): the signed
# ops are negated with probability 0.5. The geometric ones resample bilinearly, as BLIP's RandomAugment
# (cv2.warpAffine, INTER_LINEAR); timm's default draws bicubic half the time, at twice the cost. The
# views warp with OpenCV too (`_warp`); `train_transform` keeps timm's PIL ops.
_RANDAUG_ARGS = {"AutoContrast": None, "Equalize": None, "Brightness": 1.0, "Sharpness": 1.0, "ShearX": 0.15,
                 "ShearY": 0.15, "TranslateXRel": 0.225, "TranslateYRel": 0.225, "Rotate": 15.0}
_SIGNED = ("ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "Rotate")
RESAMPLE = Image.Resampling.BILINEAR
_LEFT_RIGHT = re.compile(r"\b(left|right)\b")
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default aspect-ratio range


def _fill(vision: VisionConfig) -> tuple[int, ...]:
    """Fill shears and rotations with the image mean, so they add no new colour."""
    return tuple(round(255 * m) for m in vision.mean)


def randaugment_hparams(vision: VisionConfig) -> dict:
    return {"img_mean": _fill(vision), "interpolation": RESAMPLE}


def train_transform(vision: VisionConfig, *, min_scale: float = 0.5, randaugment: bool = True) -> T.Compose:
    """PIL RGB image -> normalised tensor [3, S, S]. The flip is separate (`hflip_pair`) because it
    must also swap "left" and "right" in the caption."""
    size = vision.image_size
    ops: list = [T.RandomResizedCrop(size, scale=(min_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC)]
    if randaugment:
        from timm.data.auto_augment import rand_augment_transform

        ops.append(rand_augment_transform(RANDAUGMENT, randaugment_hparams(vision), transforms=_RANDAUG_OPS))
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


# --------------------------------------------------------------------------- draws, then render


def sample_crop(rng: random.Random, width: int, height: int, scale: tuple[float, float],
                ratio: tuple[float, float] = CROP_RATIO) -> tuple[int, int, int, int]:
    """torchvision's `RandomResizedCrop.get_params` drawn from `rng`: (top, left, height, width)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height  # fallback: the central crop, as torchvision
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_randaugment(rng: random.Random) -> tuple[tuple, ...]:
    """timm's RandAugment(rand-n2-m5-mstd0, BLIP's ops) drawn from `rng`: 2 ops chosen with
    replacement, each kept with probability 0.5 -> ((name, argument or None), ...)."""
    ops = []
    for name in [rng.choice(_RANDAUG_OPS) for _ in range(2)]:
        if rng.random() > 0.5:
            continue
        arg = _RANDAUG_ARGS[name]
        if name in _SIGNED and rng.random() > 0.5:
            arg = -arg
        ops.append((name, arg))
    return tuple(ops)


_WARPS = ("ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "Rotate")


def _warp_matrix(name: str, arg: float, width: int, height: int) -> tuple[float, ...]:
    """timm's geometric op as PIL's affine data (a, b, c, d, e, f): output (x, y) samples input
    (a x + b y + c, d x + e y + f), with pixel edges at integers and centres at +0.5."""
    if name == "ShearX":
        return 1.0, arg, 0.0, 0.0, 1.0, 0.0
    if name == "ShearY":
        return 1.0, 0.0, 0.0, arg, 1.0, 0.0
    if name == "TranslateXRel":
        return 1.0, 0.0, arg * width, 0.0, 1.0, 0.0
    if name == "TranslateYRel":
        return 1.0, 0.0, 0.0, 0.0, 1.0, arg * height
    # Rotate: PIL's Image.rotate (expand=False), counter-clockwise by `arg` degrees about (w / 2, h / 2)
    t = math.radians(arg)
    cos, sin = round(math.cos(t), 15), round(math.sin(t), 15)
    cx, cy = width / 2, height / 2
    return cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy


@functools.cache
def _cv2():
    import cv2

    cv2.setNumThreads(1)  # a loader worker is one process on one core: no pool of OpenCV threads
    return cv2


def _warp(pixels: np.ndarray, data: tuple[float, ...], fill: tuple[int, ...]) -> np.ndarray:
    """PIL's bilinear Image.transform(AFFINE, data) with cv2.warpAffine, as BLIP's RandomAugment warps
    (several times faster). cv2 indexes pixel centres at integers: the same map, shifted by half a pixel.
    Inside the image the two agree to 1 level (PIL truncates the interpolated value, cv2 rounds); along
    the edge of the fill cv2 blends the last pixel with the fill where PIL cuts it sharp."""
    a, b, c, d, e, f = data
    m = np.array([[a, b, c + 0.5 * (a + b - 1)], [d, e, f + 0.5 * (d + e - 1)]])
    cv2 = _cv2()
    return cv2.warpAffine(pixels, m, (pixels.shape[1], pixels.shape[0]),
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=fill)


def apply_randaugment(img: Image.Image, ops: tuple[tuple, ...], fill: tuple[int, ...]) -> np.ndarray:
    """Apply drawn ops in order -> uint8 [H, W, 3]: the geometric ones as `_warp` (timm's maps), the
    others with timm's own op functions (given a resample, they draw nothing)."""
    from timm.data.auto_augment import NAME_TO_OP

    for name, arg in ops:
        if name in ("Brightness", "Sharpness") and arg == 1.0:
            continue  # an enhance factor of 1 blends the image with weight 1: the image itself
        if name in _WARPS:
            pixels = np.asarray(img)
            img = _warp(pixels, _warp_matrix(name, arg, pixels.shape[1], pixels.shape[0]), fill)
        else:
            if isinstance(img, np.ndarray):
                img = Image.fromarray(img)
            img = NAME_TO_OP[name](img, *(() if arg is None else (arg,)), fillcolor=fill, resample=RESAMPLE)
    return np.asarray(img)


@dataclass(frozen=True)
class View:
    """One sample's draws: crop box (top, left, height, width) in the upright image (None: all of
    it, squashed to the output size), horizontal flip, RandAugment ops."""

    box: tuple[int, int, int, int] | None = None
    flip: bool = False
    ops: tuple[tuple, ...] = ()


def _dct_scale(decoded: int, full: int) -> float:
    """libjpeg's DCT scaling by k/8 gives ceil(full * k / 8) pixels: the factor is exactly k / 8."""
    return 1.0 if decoded == full else round(8 * decoded / full) / 8


class _ViewBase:
    def __init__(self, vision: VisionConfig):
        self.size, self.fill = vision.image_size, _fill(vision)
        self.mean, self.std = vision.mean, vision.std

    def min_decode_size(self, view: View, width: int, height: int) -> tuple[int, int]:
        """The smallest decoded (width, height) at which the view's box still has >= S pixels
        each way (a JPEG can be decoded that small by DCT scaling)."""
        _top, _left, h, w = view.box if view.box is not None else (0, 0, height, width)
        return min(width, math.ceil(width * self.size / w)), min(height, math.ceil(height * self.size / h))

    def render(self, img: Image.Image, view: View, width: int, height: int) -> torch.Tensor:
        """A decoded RGB image (possibly at a reduced scale of the upright `width` x `height`) ->
        uint8 pixels [3, S, S]: crop then bicubic resize (torchvision's resized_crop), flip, ops."""
        top, left, h, w = view.box if view.box is not None else (0, 0, height, width)
        sx, sy = _dct_scale(img.width, width), _dct_scale(img.height, height)
        if (sx, sy) == (1.0, 1.0):
            if view.box is not None:
                img = img.crop((left, top, left + w, top + h))
            img = img.resize((self.size, self.size), Image.Resampling.BICUBIC)
        else:  # the box in the reduced image: crop to whole pixels around it, resize the exact part
            x0, y0, x1, y1 = left * sx, top * sy, (left + w) * sx, (top + h) * sy
            ix0, iy0 = math.floor(x0), math.floor(y0)
            ix1, iy1 = min(img.width, math.ceil(x1)), min(img.height, math.ceil(y1))
            img = img.crop((ix0, iy0, ix1, iy1)).resize(
                (self.size, self.size), Image.Resampling.BICUBIC,
                box=(x0 - ix0, y0 - iy0, min(x1, ix1) - ix0, min(y1, iy1) - iy0))
        if view.flip:  # before RandAugment, as the Compose flips first: ShearY is not symmetric
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if view.ops:
            img = apply_randaugment(img, view.ops, self.fill)
        return to_pixels(img)


class TrainView(_ViewBase):
    """BLIP's training view: RandomResizedCrop(S, scale=(min_scale, 1), bicubic), flip with
    probability 0.5, optional RandAugment; the same distribution as `train_transform` + flip."""

    def __init__(self, vision: VisionConfig, *, min_scale: float = 0.5, randaugment: bool = True):
        super().__init__(vision)
        self.scale, self.randaugment = (min_scale, 1.0), randaugment

    def draw(self, rng: random.Random, width: int, height: int) -> View:
        box = sample_crop(rng, width, height, self.scale)
        flip = rng.random() < 0.5
        return View(box, flip, draw_randaugment(rng) if self.randaugment else ())


class EvalView(_ViewBase):
    """The evaluation view (`eval_transform`): the whole image resized to S x S, decoded in full."""

    def draw(self, rng: random.Random, width: int, height: int) -> View:
        return View()

    def min_decode_size(self, view: View, width: int, height: int) -> tuple[int, int]:
        return width, height


def to_pixels(img: Image.Image | np.ndarray) -> torch.Tensor:
    """RGB PIL image or uint8 [H, W, 3] array -> uint8 tensor [3, H, W] (channels first here, where the image is small, so the
    batch normalisation runs over contiguous memory)."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1)))


def normalize_batch(pixels: list[torch.Tensor], mean, std) -> torch.Tensor:
    """uint8 [3, S, S] images -> float32 [B, 3, S, S], (x / 255 - mean) / std, in one pass over the
    batch (converted first, then scaled in place: a uint8 x float multiply into a float output is
    several times slower). In a dataloader worker the result is allocated in shared memory, as
    default_collate does, so sending it to the trainer copies nothing more."""
    b, (c, h, w) = len(pixels), pixels[0].shape
    out = torch.empty(0)
    if torch.utils.data.get_worker_info() is not None:
        out = out.new(out._typed_storage()._new_shared(b * c * h * w))
    out = out.resize_(b, c, h, w).copy_(torch.stack(pixels))
    scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, c, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)]).view(1, c, 1, 1)
    return out.mul_(scale).add_(shift)
