"""The streaming loader: webdataset shards -> batches of tensors (docs/architecture.md section 3).

The chain is open_clip's: shard list (resampled for step-based training, or an exact epoch split by
rank and dataloader worker), tar reading with a handler that logs and continues, shuffle buffer,
decode + transform + caption choice, batching with tokenization. Every skipped sample or shard is
counted by reason and the counts ride along in each batch as `skipped`.

Determinism and resume: shard draws, the shuffle buffer and augmentation use RNGs seeded from
(seed, start_step, rank, worker), never the process-global ones, so the same arguments give the
same batches, and a job restarted at `start_step` draws a fresh sequence instead of replaying the
samples it saw after step 0.
"""

from __future__ import annotations

import functools
import itertools
import logging
import random
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from webdataset.utils import make_seed

from dlip_ds.config import ConfigError, DataConfig, VisionConfig
from dlip_ds.data.sample import (
    BadSample,
    SkipCounter,
    decode_image,
    image_id_of,
    sample_fields,
)
from dlip_ds.data.shards import expand_shards
from dlip_ds.data.text import clean_caption, encode_captions
from dlip_ds.data.transforms import eval_transform, hflip_pair, train_transform

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
    deterministic and the trainer's global RNG state is untouched (workers=0)."""

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
    """Raw sample -> {"image": tensor, "caption": str, "image_id": int}, or None to skip.

    Training picks one caption at random and flips with probability 0.5 (swapping left/right in the
    caption); evaluation keeps the first caption and no randomness."""

    def __init__(self, transform: Callable, counter: SkipCounter, *, max_words: int, train: bool, seed: int):
        self.transform, self.counter, self.max_words, self.train = transform, counter, max_words, train
        self.rng = PrivateRNG(seed)

    def __call__(self, sample: dict) -> dict | None:
        key = sample.get("__key__", "?")
        try:
            ext, captions, meta = sample_fields(sample)
            captions = [c for c in (clean_caption(c, self.max_words) for c in captions) if c]
            if not captions:
                raise BadSample("empty_caption")
            image = decode_image(sample[ext])
        except BadSample as e:
            self.counter.add(e.reason, f"{sample.get('__url__', '?')}:{key}: {e}")
            return None
        with self.rng:
            caption = random.choice(captions) if self.train else captions[0]
            if self.train and random.random() < 0.5:
                image, caption = hflip_pair(image, caption)
            pixels = self.transform(image)
        return {"image": pixels, "caption": caption, "image_id": image_id_of(meta, key), "num_captions": len(captions)}


class Collate:
    """List of examples -> the batch dict of docs/architecture.md section 3."""

    def __init__(self, tokenizer, counter: SkipCounter, *, max_length: int, prompt: str):
        self.tokenizer, self.counter, self.max_length, self.prompt = tokenizer, counter, max_length, prompt

    def __call__(self, examples: list[dict]) -> dict:
        batch = encode_captions(self.tokenizer, [e["caption"] for e in examples], max_length=self.max_length,
                                prompt=self.prompt)
        batch["pixel_values"] = torch.stack([e["image"] for e in examples])
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
    `stages(counter, seed) -> (stage, collate)`, the form `build_pipeline` takes."""

    def __init__(self, tokenizer, cfg: DataConfig, transform: Callable, train: bool):
        self.tokenizer, self.cfg, self.transform, self.train = tokenizer, cfg, transform, train

    @classmethod
    def maker(cls, tokenizer, cfg: DataConfig) -> Callable[[Callable, bool], CaptionStages]:
        """`stages_for(transform, train)` of `train_loader` / `epoch_loader`."""
        return functools.partial(cls, tokenizer, cfg)

    def __call__(self, counter: SkipCounter, seed: int) -> tuple[Callable, Callable]:
        to_example = ToExample(self.transform, counter, max_words=self.cfg.max_words, train=self.train, seed=seed)
        return MapSkipNone(to_example), Collate(self.tokenizer, counter, max_length=self.cfg.max_length,
                                                prompt=self.cfg.prompt)


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
        *([] if resampled else [_FlushSkips(counter)]),
    )


def _loader(pipeline, workers: int, seed: int) -> wds.WebLoader:
    return wds.WebLoader(
        pipeline, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(seed),
        prefetch_factor=4 if workers > 0 else None,
    )


def train_loader(cfg: DataConfig, vision: VisionConfig, stages_for: Callable[[Callable, bool], Callable], *,
                 rank: int = 0, world_size: int = 1, seed: int = 0, start_step: int = 0) -> wds.WebLoader:
    """Infinite training batches of `cfg.train_shards` for this rank; `stages_for(transform, train)`
    gives the `stages` of `build_pipeline` (`CaptionStages`, `vqa.VQAStages`)."""
    sources = source_list(cfg.train_shards)
    if cfg.weights is not None and len(cfg.weights) != len(sources):
        raise ConfigError(f"data.weights has {len(cfg.weights)} entries for {len(sources)} train_shards sources")
    transform = train_transform(vision, min_scale=cfg.min_scale, randaugment=cfg.randaugment)
    pipeline = build_pipeline(sources, stages_for(transform, True), cfg=cfg, batch_size=cfg.batch_size,
                              resampled=True, train=True, rank=rank, world_size=world_size, seed=seed,
                              start_step=start_step, weights=cfg.weights)
    return _loader(pipeline, cfg.workers, make_seed(seed, start_step, rank))


def epoch_loader(shards, cfg: DataConfig, vision: VisionConfig, stages_for: Callable[[Callable, bool], Callable], *,
                 rank: int = 0, world_size: int = 1, workers: int | None = None, augment: bool = False,
                 batch_size: int | None = None, seed: int = 0) -> wds.WebLoader:
    """One exact pass over `shards` with the stages of `stages_for(transform, augment)`."""
    transform = train_transform(vision, min_scale=cfg.min_scale, randaugment=cfg.randaugment) if augment \
        else eval_transform(vision)
    pipeline = build_pipeline(source_list(shards), stages_for(transform, augment), cfg=cfg,
                              batch_size=batch_size or cfg.batch_size, resampled=False, train=augment, rank=rank,
                              world_size=world_size, seed=seed)
    return _loader(pipeline, cfg.workers if workers is None else workers, make_seed(seed, rank))


def make_train_loader(cfg: DataConfig, tokenizer, vision: VisionConfig, *, rank: int = 0, world_size: int = 1,
                      seed: int = 0, start_step: int = 0) -> wds.WebLoader:
    """Infinite training batches for this rank (docs/architecture.md section 3)."""
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
