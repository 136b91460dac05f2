"""Evaluation sets for retrieval and captioning: every image once, all its captions grouped.

A source is shards (read as one exact epoch, in order) or a Karpathy/BLIP annotation JSON with an
image root. Captions are grouped by image id, so shards with one sample per (image, caption) pair
also give one image with all its captions. Images are checked on load and decoded again, streamed,
by `image_batches`, so a large set is never held in memory."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import webdataset as wds

from dlip_ds.config import ConfigError
from dlip_ds.data.sample import (
    BadSample,
    SkipCounter,
    decode_image,
    image_id_of,
    parse_captions,
    sample_fields,
)
from dlip_ds.data.shards import expand_shards
from dlip_ds.data.stream import source_list
from dlip_ds.data.text import clean_caption

log = logging.getLogger(__name__)


@dataclass
class EvalSet:
    """captions[j] belongs to image txt2img[j]; img2txt[i] lists the captions of image i."""

    captions: list[str] = field(default_factory=list)
    image_ids: list = field(default_factory=list)
    txt2img: list[int] = field(default_factory=list)
    img2txt: list[list[int]] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    # Where image i comes from: (shard url, sample key, image extension) or a file path.
    refs: list = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.image_ids)

    def _add(self, group, image_id, captions: list[str], ref, index: dict) -> None:
        if group in index:  # another sample of an image we have: its captions join the group
            i = index[group]
        else:
            i = index[group] = len(self.image_ids)
            self.image_ids.append(image_id)
            self.img2txt.append([])
            self.refs.append(ref)
        for c in captions:
            self.img2txt[i].append(len(self.captions))
            self.txt2img.append(i)
            self.captions.append(c)

    def images(self) -> Iterator:
        """PIL images in image order."""
        if self.refs and isinstance(self.refs[0], tuple):
            wanted = {(url, key): i for i, (url, key, _) in enumerate(self.refs)}
            urls = list(dict.fromkeys(r[0] for r in self.refs))
            pending: dict[int, object] = {}
            next_i = 0
            for sample in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
                i = wanted.get((sample["__url__"], sample["__key__"]))
                if i is None:
                    continue
                pending[i] = decode_image(sample[self.refs[i][2]])
                while next_i in pending:  # shards are read in order, so this buffer stays tiny
                    yield pending.pop(next_i)
                    next_i += 1
            if next_i != len(self.refs):
                raise RuntimeError(f"eval set: {len(self.refs) - next_i} images disappeared from the shards since loading")
        else:
            for path in self.refs:
                yield decode_image(Path(path).read_bytes())

    def image_batches(self, batch_size: int, transform: Callable) -> Iterator[torch.Tensor]:
        """[b, 3, H, W] tensors of `transform(image)`, in image order."""
        batch: list[torch.Tensor] = []
        for img in self.images():
            batch.append(transform(img))
            if len(batch) == batch_size:
                yield torch.stack(batch)
                batch = []
        if batch:
            yield torch.stack(batch)


def _from_shards(specs: list[str], max_words: int) -> EvalSet:
    es, index, counter = EvalSet(), {}, SkipCounter()
    urls = [u for s in specs for u in expand_shards(s)]
    read = wds.tarfile_to_samples(handler=lambda exn: counter.add("shard_error", exn) or True)
    for sample in wds.DataPipeline(wds.SimpleShardList(urls), read):
        try:
            ext, captions, meta = sample_fields(sample)
            captions = [c for c in (clean_caption(c, max_words) for c in captions) if c]
            if not captions:
                raise BadSample("empty_caption")
            decode_image(sample[ext])
        except BadSample as e:
            counter.add(e.reason, f"eval set {sample['__url__']}:{sample['__key__']}: {e}")
            continue
        image_id = image_id_of(meta, sample["__key__"])
        es._add(image_id, image_id, captions, (sample["__url__"], sample["__key__"], ext), index)
    es.skipped = dict(counter.total)
    return es


def read_annotations(path: str | Path) -> list[dict]:
    """A Karpathy/BLIP annotation JSON: a list of {"image", "caption" (str or list), "image_id"?}."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"annotation file not found: {path}")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: expected a JSON list of {{'image': ..., 'caption': ...}} entries")
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "image" not in e or not ("caption" in e or "captions" in e):
            raise ConfigError(f"{path}: entry {i} needs 'image' and 'caption' fields, got {str(e)[:120]}")
    return entries


def _from_annotations(path: Path, image_root: str | None, max_words: int) -> EvalSet:
    root = Path(image_root) if image_root else path.parent
    es, index, counter = EvalSet(), {}, SkipCounter()
    for e in read_annotations(path):
        image_path = root / e["image"]
        try:
            captions = [clean_caption(c, max_words) for c in parse_captions(e.get("caption", e.get("captions")))]
            captions = [c for c in captions if c]
            if not captions:
                raise BadSample("empty_caption")
            if image_path.as_posix() not in index:  # each image file is checked once
                if not image_path.is_file():
                    raise BadSample("missing_file")
                decode_image(image_path.read_bytes())
        except BadSample as err:
            counter.add(err.reason, f"eval set {image_path}: {err}")
            continue
        # Grouped by file: BLIP's training annotations list one entry per caption.
        es._add(image_path.as_posix(), e.get("image_id", e["image"]), captions, str(image_path), index)
    es.skipped = dict(counter.total)
    return es


def load_eval_set(source, *, image_root: str | None = None, max_words: int = 30) -> EvalSet:
    """Shards (a directory, pattern, list of sources) or an annotation JSON with `image_root`."""
    specs = source_list(source)
    if len(specs) == 1 and specs[0].endswith(".json"):
        es = _from_annotations(Path(specs[0]), image_root, max_words)
    else:
        es = _from_shards(specs, max_words)
    if not es.image_ids:
        raise ConfigError(f"eval set {source}: no usable image-caption pair (skipped: {es.skipped})")
    if es.skipped:
        log.warning("eval set %s: %d images, %d captions, skipped %s", source, len(es), len(es.captions), es.skipped)
    return es
