"""The device-side image path (`data.decode: gpu`).

The dataloader workers read and check each JPEG's header (bomb guard, orientation, colour model),
draw its view with the CPU path's own `TrainView.draw` (so the crops have the same distribution by
construction), and tokenise; the batch carries the JPEG bytes and the views instead of
`pixel_values`. `finish_batch` then decodes the JPEGs of a batch in one `torchvision.io.decode_jpeg`
call on the device (nvJPEG on CUDA), crops, resizes (bicubic, antialiased, as PIL), flips and
normalises there; the trainer runs it one batch ahead on a side CUDA stream (`DevicePrefetcher`), so
it overlaps the previous step. Images libjpeg-turbo would not hand over as they are (PNG, WebP, CMYK
or EXIF-rotated JPEGs) are decoded in the worker as on the CPU path and travel as uint8 pixels.
RandAugment runs only on the CPU path: `decode: gpu` with `randaugment: true` is refused up front.

Batch keys in place of `pixel_values` (B rows, S the image size):
  jpeg_data uint8 [N]        the batch's JPEGs, concatenated
  jpeg_offsets long [B + 1]  row r's JPEG is jpeg_data[off[r]:off[r + 1]] (empty: decoded in the worker)
  crop_boxes long [B, 4]     (top, left, height, width) in the decoded image
  flips bool [B]
  worker_rows long [n], worker_pixels uint8 [n, 3, S, S]: the rows decoded in the worker
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dlip_ds.config import ConfigError, DataConfig, VisionConfig
from dlip_ds.data.transforms import View

log = logging.getLogger(__name__)
ENCODED_KEYS = ("jpeg_data", "jpeg_offsets", "crop_boxes", "flips", "worker_rows", "worker_pixels")


@dataclass
class DeviceJob:
    """A JPEG left for the device, with its drawn view."""

    data: bytes
    view: View


# --------------------------------------------------------------------------- choosing the path


@functools.cache
def nvjpeg_available(device: str = "cuda") -> bool:
    """torchvision decodes JPEGs on this CUDA device (a tiny probe; "cuda": the current one, which
    the trainer has set to this rank's before it asks)."""
    if not torch.cuda.is_available():
        return False
    try:
        from torchvision.io import decode_jpeg, encode_jpeg

        probe = encode_jpeg(torch.zeros(3, 8, 8, dtype=torch.uint8))
        decode_jpeg(probe, device=device)
        return True
    except (RuntimeError, ImportError) as e:
        log.info("torchvision cannot decode JPEGs on CUDA here: %s", e)
        return False


def check_decode(cfg: DataConfig) -> str:
    """`cfg.decode` as the loader runs it: "cpu" or "gpu" ("auto": gpu when CUDA and nvJPEG are there
    and RandAugment is off). ConfigError for "gpu" with RandAugment on."""
    if cfg.decode == "gpu" and cfg.randaugment:
        raise ConfigError("data.decode=gpu decodes, crops and flips on the GPU but does not run RandAugment there: "
                          "set data.randaugment=false, or data.decode=cpu (or auto) to keep it")
    if cfg.decode == "auto":
        return "gpu" if not cfg.randaugment and nvjpeg_available() else "cpu"
    return cfg.decode


def resolve_decode(cfg: DataConfig, device: torch.device, *, supported: bool = True) -> str:
    """What a training run on `device` uses, checked before anything is built: "gpu" needs CUDA,
    torchvision's nvJPEG decoder and a task whose loader has the path (`supported`)."""
    if cfg.decode == "gpu":
        why = ("this run's device is " + device.type if device.type != "cuda" else
               "torchvision cannot decode JPEGs on this CUDA device" if not nvjpeg_available(str(device)) else
               "this task's loader has no device-side path" if not supported else "")
        if why:
            raise ConfigError(f"data.decode=gpu: {why}; set data.decode=cpu, or auto to fall back to the CPU")
    if cfg.decode == "auto" and (device.type != "cuda" or not supported):
        return "cpu"
    return check_decode(cfg)


# --------------------------------------------------------------------------- in the worker


def collate_for_device(images: list, size: int) -> dict[str, Tensor]:
    """Per-row images (`DeviceJob`s, or uint8 pixels [3, S, S] decoded in the worker) -> the encoded
    batch keys of the module docstring."""
    b = len(images)
    offsets, chunks = [0], []
    boxes = torch.zeros(b, 4, dtype=torch.long)
    flips = torch.zeros(b, dtype=torch.bool)
    rows, pixels = [], []
    for r, image in enumerate(images):
        if isinstance(image, DeviceJob):
            chunks.append(np.frombuffer(image.data, dtype=np.uint8))
            boxes[r] = torch.tensor(image.view.box)
            flips[r] = image.view.flip
        else:
            rows.append(r)
            pixels.append(image)
        offsets.append(offsets[-1] + (len(chunks[-1]) if isinstance(image, DeviceJob) else 0))
    return {
        "jpeg_data": torch.from_numpy(np.concatenate(chunks)) if chunks else torch.zeros(0, dtype=torch.uint8),
        "jpeg_offsets": torch.tensor(offsets, dtype=torch.long),
        "crop_boxes": boxes,
        "flips": flips,
        "worker_rows": torch.tensor(rows, dtype=torch.long),
        "worker_pixels": torch.stack(pixels) if pixels else torch.zeros(0, 3, size, size, dtype=torch.uint8),
    }


# --------------------------------------------------------------------------- on the device


def decode_jpegs(datas: list[Tensor], device: torch.device | str) -> list[Tensor | None]:
    """JPEG byte tensors -> uint8 [3, H, W] RGB images on `device`, in one batched call; when that
    fails, one by one, None for each that does not decode."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    try:
        return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        out: list[Tensor | None] = []
        for data in datas:
            try:
                out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError as e:
                log.warning("skipping (bad_image on the device): %s", e)
                out.append(None)
        return out


def resized_crop(image: Tensor, box: list[int], size: int) -> Tensor:
    """uint8 [3, H, W] -> float [3, S, S] in 0..255: the box, resized as PIL's bicubic (a = -0.5,
    antialiased when shrinking), rounded as PIL's 8-bit output is."""
    top, left, h, w = box
    crop = image[None, :, top:top + h, left:left + w].float()
    out = torch.nn.functional.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return out[0].clamp_(0, 255).round_()


def finish_batch(batch: dict, vision: VisionConfig, device: torch.device | str) -> dict:
    """An encoded batch -> the same batch with `pixel_values` float32 [B, 3, S, S] on `device`,
    normalised as the CPU path (`transforms.normalize_batch`). A JPEG that does not decode is counted
    in `skipped` as "bad_image", and its row (image and text) replaced by a copy of a decoded row, so
    every rank keeps the same batch size. A batch without JPEGs is returned as it is."""
    if "jpeg_data" not in batch:
        return batch
    batch = dict(batch)
    data, off, boxes, flips, rows, pixels = (batch.pop(k) for k in ENCODED_KEYS)
    off, boxes = off.tolist(), boxes.tolist()
    b, size = len(off) - 1, vision.image_size
    out = torch.empty(b, 3, size, size, device=device)
    jpeg_rows = [r for r in range(b) if off[r + 1] > off[r]]
    decoded = decode_jpegs([data[off[r]:off[r + 1]] for r in jpeg_rows], device)
    bad = [r for r, image in zip(jpeg_rows, decoded) if image is None]
    for r, image in zip(jpeg_rows, decoded):
        if image is not None:
            out[r] = resized_crop(image, boxes[r], size)
    if len(rows):
        out[rows.to(device)] = pixels.to(device).float()
    flips = flips.to(device)
    out[flips] = out[flips].flip(-1)
    scale = torch.tensor([1.0 / (255.0 * s) for s in vision.std], device=device).view(1, 3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(vision.mean, vision.std)], device=device).view(1, 3, 1, 1)
    batch["pixel_values"] = out.mul_(scale).add_(shift)
    if bad:
        _replace_rows(batch, bad, b)
    return batch


def _replace_rows(batch: dict, bad: list[int], b: int) -> None:
    good = [r for r in range(b) if r not in bad]
    if not good:
        raise RuntimeError(f"none of the {b} JPEGs of a batch decodes on the device; check the shards with "
                           "`dlip-ds inspect`, or set data.decode=cpu")
    src = [good[i % len(good)] for i in range(len(bad))]
    for value in batch.values():
        if isinstance(value, Tensor) and value.dim() and value.shape[0] == b:
            value[bad] = value[src]
        elif isinstance(value, list) and len(value) == b:
            for r, s in zip(bad, src):
                value[r] = value[s]
    skipped = dict(batch.get("skipped") or {})
    skipped["bad_image"] = skipped.get("bad_image", 0) + len(bad)
    batch["skipped"] = skipped


class DevicePrefetcher:
    """Batches finished on the device one ahead: while the step runs on batch n, batch n + 1 is
    copied, decoded and cropped on a side CUDA stream (elsewhere, in line)."""

    def __init__(self, batches: Iterator[dict], finish: Callable[[dict], dict], device: torch.device):
        self.batches, self.finish, self.device = iter(batches), finish, torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.ahead: dict | None = None

    def _prepare(self) -> dict:
        raw = next(self.batches)
        if self.stream is None:
            return self.finish(raw)
        with torch.cuda.stream(self.stream):
            return self.finish(raw)

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> dict:
        batch = self.ahead if self.ahead is not None else self._prepare()
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            for value in batch.values():  # made on the side stream, used on this one
                if isinstance(value, Tensor) and value.is_cuda:
                    value.record_stream(current)
        try:
            self.ahead = self._prepare()
        except StopIteration:
            self.ahead = None
        return batch
