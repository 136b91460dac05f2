"""The streaming loader: webdataset shards -> batches of tensors (docs/architecture.md section 3).

The chain is open_clip's: shard list (resampled for step-based training, or an exact epoch split by
rank and dataloader worker), tar reading with a handler that logs and continues, shuffle buffer,
caption choice + view draw + decode + crop (`ToExample`), batching with tokenization and one
normalisation per batch. Every skipped sample or shard is counted by reason and the counts ride
along in each batch as `skipped`; each batch also carries `loader_seconds`, what it cost the worker.

Determinism and resume: shard draws, the shuffle buffer and augmentation use RNGs seeded from
(seed, start_step, rank, worker), never the process-global ones, so the same arguments give the
same batches, and a job restarted at `start_step` draws a fresh sequence instead of replaying the
samples it saw after step 0.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from webdataset.utils import make_seed

from dlip_ds.config import ConfigError, DataConfig, VisionConfig
from dlip_ds.data.gpu import DeviceJob, check_decode, collate_for_device
from dlip_ds.data.sample import (
    BadSample,
    SkipCounter,
    image_id_of,
    load_image,
    open_image,
    sample_fields,
)
from dlip_ds.data.shards import expand_shards
from dlip_ds.data.text import clean_caption, encode_captions
from dlip_ds.data.transforms import (
    EvalView,
    TrainView,
    normalize_batch,
    swap_left_right,
)

log = logging.getLogger(__name__)


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def source_list(spec) -> list[str]:
    """`DataConfig.train_shards`/`eval_shards` -> one spec per source."""
    specs = [str(s) for s in spec] if isinstance(spec, (list, tuple)) else [str(spec)]
    if not specs or not all(specs):
        raise ConfigError(f"data shards: empty source in {spec!r}")
    return specs


# --------------------------------------------------------------------------- pipeline stages


class _LogAndContinue:
    """webdataset handler: count (and log) the failure as `reason`, then continue."""

    def __init__(self, counter: SkipCounter, reason: str):
        self.counter, self.reason = counter, reason

    def __call__(self, exn: Exception) -> bool:
        self.counter.add(self.reason, exn)
        return True


class _RankWorkerSeed:
    """`worker_seed` for ResampledShards that uses the rank we were given, not the environment."""

    def __init__(self, rank: int):
        self.rank = rank

    def __call__(self) -> int:
        return make_seed(self.rank, _worker()[0])


class _SplitByRank:
    """webdataset.split_by_node with the rank we were given (the engine may not have set the env)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def __call__(self, src: Iterator) -> Iterator:
        return itertools.islice(src, self.rank, None, self.world_size)


class PrivateRNG:
    """Runs augmentation under its own python/numpy/torch RNG streams (torchvision draws from torch,
    timm's RandAugment from python and numpy), seeded per worker on first use, so results are
    deterministic and the trainer's global RNG state is untouched (workers=0). The VQA loader's
    Compose transforms need it; the caption loader draws from its own `random.Random` instead
    (`ToExample`), which costs nothing per sample (swapping these states costs 0.15 ms or more)."""

    def __init__(self, seed: int):
        self.seed = seed
        self.state: tuple | None = None

    @staticmethod
    def _get() -> tuple:
        return random.getstate(), np.random.get_state(), torch.get_rng_state()

    @staticmethod
    def _set(state: tuple) -> None:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])

    def __enter__(self):
        self.saved = self._get()
        if self.state is None:
            s = make_seed(self.seed, _worker()[0])
            random.seed(s)
            np.random.seed(s)
            torch.default_generator.manual_seed(s)
        else:
            self._set(self.state)

    def __exit__(self, *exc):
        self.state = self._get()
        self._set(self.saved)


class _WeightedMix(torch.utils.data.IterableDataset):
    """Interleave sample streams, choosing each next sample's source with the given weights
    (webdataset.RandomMix draws from the global RNG; this one is seeded per worker)."""

    def __init__(self, sources: Sequence, weights: Sequence[float], seed: int):
        self.sources, self.weights, self.seed = list(sources), list(weights), seed

    def __iter__(self):
        rng = random.Random(make_seed(self.seed, _worker()[0]))
        its = [iter(s) for s in self.sources]
        while True:
            i = rng.choices(range(len(its)), weights=self.weights)[0]
            try:
                yield next(its[i])
            except StopIteration:  # a source with no readable shard at all ends the mix
                return


class ToExample:
    """Raw sample -> {"image", "caption": str, "image_id": int, "num_captions": int}, or None to skip.

    Training picks one caption at random and flips with probability 0.5 (swapping left/right in the
    caption); evaluation keeps the first caption and no randomness. The draws (caption, then the
    view: crop box, flip, RandAugment ops) come from this worker's own `random.Random`, seeded from
    (seed, worker), and are made from the image header, before decoding: the JPEG is then decoded at
    the smallest DCT scale the crop allows. "image" is uint8 pixels [3, S, S], or with `on_device` a
    `DeviceJob` (the JPEG and its view) for the GPU to finish (`data.gpu`)."""

    def __init__(self, view: TrainView | EvalView, counter: SkipCounter, *, max_words: int, train: bool, seed: int,
                 on_device: bool = False):
        self.view, self.counter, self.max_words, self.train = view, counter, max_words, train
        self.seed, self.on_device, self._rng = seed, on_device, None

    @property
    def rng(self) -> random.Random:
        if self._rng is None:  # made in the worker that runs it: one stream per (seed, worker)
            self._rng = random.Random(make_seed(self.seed, _worker()[0]))
        return self._rng

    def __call__(self, sample: dict) -> dict | None:
        key = sample.get("__key__", "?")
        try:
            ext, captions, meta = sample_fields(sample)
            captions = [c for c in (clean_caption(c, self.max_words) for c in captions) if c]
            if not captions:
                raise BadSample("empty_caption")
            opened = open_image(sample[ext])
            caption = self.rng.choice(captions) if self.train else captions[0]
            view = self.view.draw(self.rng, opened.width, opened.height)
            if self.on_device and opened.jpeg:
                image = DeviceJob(opened.data, view)
            else:
                decoded = load_image(opened, self.view.min_decode_size(view, opened.width, opened.height))
                image = self.view.render(decoded, view, opened.width, opened.height)
        except BadSample as e:
            self.counter.add(e.reason, f"{sample.get('__url__', '?')}:{key}: {e}")
            return None
        if view.flip:
            caption = swap_left_right(caption)
        return {"image": image, "caption": caption, "image_id": image_id_of(meta, key), "num_captions": len(captions)}


class Collate:
    """List of examples -> the batch dict of docs/architecture.md section 3: `pixel_values`
    normalised here, in one pass over the batch, or with `on_device` the JPEGs and views that
    `gpu.finish_batch` turns into `pixel_values` on the GPU."""

    def __init__(self, tokenizer, counter: SkipCounter, vision: VisionConfig, *, max_length: int, prompt: str,
                 on_device: bool = False):
        self.tokenizer, self.counter, self.vision = tokenizer, counter, vision
        self.max_length, self.prompt, self.on_device = max_length, prompt, on_device

    def __call__(self, examples: list[dict]) -> dict:
        batch = encode_captions(self.tokenizer, [e["caption"] for e in examples], max_length=self.max_length,
                                prompt=self.prompt)
        images = [e["image"] for e in examples]
        if self.on_device:
            batch.update(collate_for_device(images, self.vision.image_size))
        else:
            batch["pixel_values"] = normalize_batch(images, self.vision.mean, self.vision.std)
        batch["image_ids"] = torch.tensor([e["image_id"] for e in examples], dtype=torch.long)
        # For logs and `inspect`: the caption each row was tokenized from, and how many it had.
        batch["captions"] = [e["caption"] for e in examples]
        batch["num_captions"] = torch.tensor([e["num_captions"] for e in examples], dtype=torch.long)
        batch["skipped"] = self.counter.pop()
        return batch


class MapSkipNone:
    """Pipeline stage: each sample -> `fn(sample)`, left out when that is None (a skipped sample)."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, src: Iterator) -> Iterator:
        return (e for e in map(self.fn, src) if e is not None)


class CaptionStages:
    """The caption path's per-sample stage (`ToExample`) and collate (`Collate`), made per pipeline:
    `stages(counter, seed) -> (stage, collate)`, the form `build_pipeline` takes. `train`: the
    training view (`TrainView`), else the evaluation one; `cfg.decode` "gpu" (training only) leaves
    JPEGs for the device."""

    def __init__(self, tokenizer, cfg: DataConfig, vision: VisionConfig, train: bool):
        self.tokenizer, self.cfg, self.vision, self.train = tokenizer, cfg, vision, train
        self.view = TrainView(vision, min_scale=cfg.min_scale, randaugment=cfg.randaugment) if train \
            else EvalView(vision)
        self.on_device = train and check_decode(cfg) == "gpu"

    @classmethod
    def maker(cls, tokenizer, cfg: DataConfig) -> Callable[[VisionConfig, bool], CaptionStages]:
        """`stages_for(vision, train)` of `train_loader` / `epoch_loader`."""
        return functools.partial(cls, tokenizer, cfg)

    def __call__(self, counter: SkipCounter, seed: int) -> tuple[Callable, Callable]:
        to_example = ToExample(self.view, counter, max_words=self.cfg.max_words, train=self.train, seed=seed,
                               on_device=self.on_device)
        return MapSkipNone(to_example), Collate(self.tokenizer, counter, self.vision, max_length=self.cfg.max_length,
                                                prompt=self.cfg.prompt, on_device=self.on_device)


class _BusyClock:
    """Last stage: each batch carries `loader_seconds`, the time this worker spent making it (reading,
    decoding, collating; not the time it waited for a free prefetch slot), so the trainer can show
    what the loader could deliver beside what the step takes."""

    def __call__(self, src: Iterator) -> Iterator:
        it = iter(src)
        while True:
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            batch["loader_seconds"] = time.perf_counter() - start
            yield batch


class _FlushSkips:
    """Epoch mode: samples skipped after a worker's last batch still reach the consumer, in a final
    batch that holds only `skipped`."""

    def __init__(self, counter: SkipCounter):
        self.counter = counter

    def __call__(self, src: Iterator) -> Iterator:
        yield from src
        if left := self.counter.pop():
            yield {"skipped": left}


# --------------------------------------------------------------------------- loaders


def build_pipeline(sources: Sequence[str], stages: Callable[[SkipCounter, int], tuple[Callable, Callable]], *,
                   cfg: DataConfig, batch_size: int, resampled: bool, train: bool, rank: int = 0, world_size: int = 1,
                   seed: int = 0, start_step: int = 0, weights: Sequence[float] | None = None) -> wds.DataPipeline:
    """The whole chain as one DataPipeline. `resampled`: infinite, shards drawn with replacement per
    rank and worker (open_clip's training mode); else one exact epoch, shards split by rank then by
    worker, in order, with a last partial batch. `stages(counter, seed)` makes the per-sample stage
    (an iterator of raw samples -> an iterator of examples, skips counted in `counter`, randomness
    seeded by `seed`) and the collate (examples -> batch dict), e.g. `CaptionStages`."""
    counter = SkipCounter()
    run_seed = make_seed(seed, start_step, rank)
    read = [wds.tarfile_to_samples(handler=_LogAndContinue(counter, "shard_error"))]
    shuffle = [wds.shuffle(cfg.shuffle_buffer, initial=min(cfg.shuffle_buffer, 100), rng=random.Random(run_seed))] \
        if train and cfg.shuffle_buffer > 1 else []
    if resampled:
        urls = [expand_shards(s) for s in sources]
        streams = [wds.DataPipeline(wds.ResampledShards(u, seed=run_seed, worker_seed=_RankWorkerSeed(rank),
                                                        deterministic=True), *read) for u in urls]
        weights = list(weights) if weights is not None else [float(len(u)) for u in urls]
        head = [streams[0] if len(streams) == 1 else _WeightedMix(streams, weights, run_seed)]
    else:
        urls = [u for s in sources for u in expand_shards(s)]
        if len(urls) < world_size:
            log.warning("%d shards for %d ranks: some ranks read nothing", len(urls), world_size)
        head = [wds.SimpleShardList(urls), _SplitByRank(rank, world_size), wds.split_by_worker, *read]
    per_sample, collate = stages(counter, run_seed)
    return wds.DataPipeline(
        *head,
        *shuffle,
        per_sample,
        wds.batched(batch_size, collation_fn=collate, partial=not resampled),
        _BusyClock(),
        *([] if resampled else [_FlushSkips(counter)]),
    )


def _loader(pipeline, workers: int, seed: int) -> wds.WebLoader:
    return wds.WebLoader(
        pipeline, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(seed),
        prefetch_factor=4 if workers > 0 else None,
    )


def train_loader(cfg: DataConfig, vision: VisionConfig, stages_for: Callable[[VisionConfig, bool], Callable], *,
                 rank: int = 0, world_size: int = 1, seed: int = 0, start_step: int = 0) -> wds.WebLoader:
    """Infinite training batches of `cfg.train_shards` for this rank; `stages_for(vision, train)`
    gives the `stages` of `build_pipeline` (`CaptionStages`, `vqa.VQAStages`)."""
    sources = source_list(cfg.train_shards)
    if cfg.weights is not None and len(cfg.weights) != len(sources):
        raise ConfigError(f"data.weights has {len(cfg.weights)} entries for {len(sources)} train_shards sources")
    pipeline = build_pipeline(sources, stages_for(vision, True), cfg=cfg, batch_size=cfg.batch_size,
                              resampled=True, train=True, rank=rank, world_size=world_size, seed=seed,
                              start_step=start_step, weights=cfg.weights)
    return _loader(pipeline, cfg.workers, make_seed(seed, start_step, rank))


def epoch_loader(shards, cfg: DataConfig, vision: VisionConfig, stages_for: Callable[[VisionConfig, bool], Callable], *,
                 rank: int = 0, world_size: int = 1, workers: int | None = None, augment: bool = False,
                 batch_size: int | None = None, seed: int = 0) -> wds.WebLoader:
    """One exact pass over `shards` with the stages of `stages_for(vision, augment)` (pixels decoded
    on the CPU whatever `cfg.decode` says)."""
    cfg = dataclasses.replace(cfg, decode="cpu")
    pipeline = build_pipeline(source_list(shards), stages_for(vision, augment), cfg=cfg,
                              batch_size=batch_size or cfg.batch_size, resampled=False, train=augment, rank=rank,
                              world_size=world_size, seed=seed)
    return _loader(pipeline, cfg.workers if workers is None else workers, make_seed(seed, rank))


def make_train_loader(cfg: DataConfig, tokenizer, vision: VisionConfig, *, rank: int = 0, world_size: int = 1,
                      seed: int = 0, start_step: int = 0) -> wds.WebLoader:
    """Infinite training batches for this rank (docs/architecture.md section 3); with `cfg.decode`
    "gpu" they carry JPEGs for `gpu.finish_batch` instead of `pixel_values`."""
    return train_loader(cfg, vision, CaptionStages.maker(tokenizer, cfg), rank=rank, world_size=world_size, seed=seed,
                        start_step=start_step)


def make_epoch_loader(shards, cfg: DataConfig, tokenizer, vision: VisionConfig, *, rank: int = 0,
                      world_size: int = 1, workers: int | None = None, augment: bool = False,
                      batch_size: int | None = None, seed: int = 0) -> wds.WebLoader:
    """One exact pass over `shards` (every sample once across ranks and workers), batched like
    training; `augment` applies the training transform (as `inspect --augment` shows it). A worker
    whose last samples were all skipped ends with a batch that holds only `skipped`."""
    return epoch_loader(shards, cfg, vision, CaptionStages.maker(tokenizer, cfg), rank=rank, world_size=world_size,
                        workers=workers, augment=augment, batch_size=batch_size, seed=seed)
