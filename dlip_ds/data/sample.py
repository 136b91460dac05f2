"""One raw sample (image bytes + caption fields) checked and decoded; shared by `prepare`, the
loader, the evaluation sets and `inspect`, so all of them accept and reject the same inputs."""

from __future__ import annotations

import io
import json
import logging
import zlib
from collections import Counter
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import ExifTags, Image, ImageOps

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_EXIF_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "TIFF")  # formats whose EXIF may rotate the image


class BadSample(Exception):
    """A sample to skip; `reason` is a short stable key for counters and rejects.jsonl."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha composited on white, 16/32-bit greys rescaled (a plain convert
    would clip them to white), CMYK and palettes converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / hi), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(canvas, img)
    return img.convert("RGB") if img.mode != "RGB" else img


@dataclass
class Opened:
    """An image whose header is read and checked, not yet decoded: `width` x `height` upright (EXIF
    orientation applied), `orientation` the EXIF tag (1: as stored)."""

    data: bytes
    img: Image.Image
    width: int
    height: int
    orientation: int

    @property
    def jpeg(self) -> bool:
        """A JPEG that libjpeg-turbo (simplejpeg, nvJPEG) decodes to RGB as PIL would: YCbCr or grey,
        stored upright (CMYK and rotated ones go through PIL)."""
        return self.img.format == "JPEG" and self.img.mode in ("RGB", "L") and self.orientation == 1


def open_image(data: bytes, *, max_pixels: int | None = None) -> Opened:
    """Bytes -> `Opened` from the header only; BadSample when empty, not an image, or larger than
    `max_pixels` (default PIL.Image.MAX_IMAGE_PIXELS): a decompression-bomb guard before decoding."""
    if not data:
        raise BadSample("empty_image")
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        img = Image.open(io.BytesIO(data))
        if limit and img.width * img.height > limit:
            raise BadSample("image_too_large", f"{img.width}x{img.height} > {limit} pixels")
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1) if img.format in _EXIF_FORMATS else 1
    except BadSample:
        raise
    except Image.DecompressionBombError as e:
        raise BadSample("image_too_large", str(e)) from None
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as e:
        raise BadSample("bad_image", f"{type(e).__name__}: {e}") from None
    w, h = (img.height, img.width) if orientation in (5, 6, 7, 8) else img.size
    return Opened(data, img, w, h, orientation)


def load_image(opened: Opened, min_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an `Opened` image to RGB, upright. A JPEG is decoded by libjpeg-turbo (simplejpeg,
    the same pixels as PIL's decoder, faster), and when `min_size` (width, height) is given, at the
    smallest DCT scale (k/8) that keeps at least that size. Everything else, and any JPEG that
    simplejpeg refuses, goes through PIL in full. BadSample("bad_image") when it does not decode."""
    if opened.jpeg:
        try:
            w, h = min_size or (opened.width, opened.height)
            arr = simplejpeg.decode_jpeg(opened.data, colorspace="RGB", min_width=w, min_height=h)
            return Image.fromarray(arr)
        except ValueError:  # simplejpeg's error for data libjpeg-turbo rejects: PIL decides (and names it)
            pass
    img = opened.img
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as e:
        raise BadSample("image_too_large", str(e)) from None
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as e:
        raise BadSample("bad_image", f"{type(e).__name__}: {e}") from None
    return to_rgb(img)


def decode_image(data: bytes, *, max_pixels: int | None = None) -> Image.Image:
    """Bytes -> RGB PIL image with EXIF orientation applied; BadSample when empty, not an image,
    truncated, or larger than `max_pixels` (default PIL.Image.MAX_IMAGE_PIXELS, checked from the
    header before decoding: a decompression-bomb guard)."""
    return load_image(open_image(data, max_pixels=max_pixels))


def decode_text(data: bytes | str) -> str:
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadSample("caption_not_utf8", str(e)) from None


def parse_captions(value) -> list[str]:
    """A caption field (str or list of str) -> non-blank captions."""
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return [c for c in items if isinstance(c, str) and c.strip()]


def image_ext(sample: dict) -> str:
    """The extension under which a webdataset sample holds its image; BadSample when it has none."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise BadSample("missing_image", f"keys {sorted(k for k in sample if not k.startswith('__'))}")
    return ext


def sample_json(sample: dict) -> dict:
    """The sample's json part as an object ({} when it has none); BadSample when it does not parse."""
    if "json" not in sample:
        return {}
    try:
        meta = json.loads(decode_text(sample["json"]))
    except json.JSONDecodeError as e:
        raise BadSample("bad_json", str(e)) from None
    if not isinstance(meta, dict):
        raise BadSample("bad_json", "not an object")
    return meta


def sample_fields(sample: dict) -> tuple[str, list[str], dict]:
    """A webdataset sample (raw bytes per extension) -> (image extension, captions, json meta).
    Captions come from json "captions"/"caption", else from txt. BadSample when a part is missing."""
    ext = image_ext(sample)
    meta = sample_json(sample)
    captions = parse_captions(meta.get("captions", meta.get("caption")))
    if not captions and "txt" in sample:
        captions = parse_captions(decode_text(sample["txt"]))
    if not captions:
        has_field = "txt" in sample or "caption" in meta or "captions" in meta
        raise BadSample("empty_caption" if has_field else "missing_caption")
    return ext, captions, meta


def image_id_of(meta: dict, key: str) -> int:
    """An integer image id: json `image_id` when it is an integer (COCO), else a stable hash of it or
    of the sample key (Flickr file names)."""
    raw = meta.get("image_id", key)
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.isdigit():
        return int(raw)
    return zlib.crc32(str(raw).encode()) & 0x7FFFFFFF


class SkipCounter:
    """Skipped samples by reason, counted where they are dropped (per dataloader worker) and logged
    (the first few of each reason, then every 1000th); `pop()` hands the counts since the previous
    call to the batch that carries them."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.total: Counter = Counter()

    def add(self, reason: str, detail: object = "") -> None:
        self.counts[reason] += 1
        self.total[reason] += 1
        n = self.total[reason]
        if n <= 5 or n % 1000 == 0:
            log.warning("skipping (%s, %d so far): %s", reason, n, detail)

    def pop(self) -> dict[str, int]:
        out, self.counts = dict(self.counts), Counter()
        return out
