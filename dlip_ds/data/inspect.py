"""`dlip-ds inspect SHARDS`: stream shards through the real pipeline (decode, transform, tokenize,
batch) in one exact pass and report samples, captions, skipped samples by reason, caption lengths
and throughput; `--show K` writes a PNG grid of K decoded samples with their captions."""

from __future__ import annotations

import argparse
import json
import statistics
import textwrap
import time
from pathlib import Path

import torch

from dlip_ds.config import ConfigError, DataConfig, VisionConfig


def _stats(values: list[int]) -> dict:
    if not values:
        return {}
    values = sorted(values)
    return {"min": values[0], "mean": round(statistics.fmean(values), 2),
            "p95": values[min(len(values) - 1, int(0.95 * len(values)))], "max": values[-1]}


def inspect_shards(shards, tokenizer, *, image_size: int = 224, batch_size: int = 64, workers: int = 0,
                   max_samples: int = 0, augment: bool = False, show: int = 0) -> tuple[dict, list]:
    """-> (report, up to `show` (image tensor [3,H,W] in [0,1], caption) pairs)."""
    from dlip_ds.data.stream import make_epoch_loader

    vision = VisionConfig(image_size=image_size)
    cfg = DataConfig(batch_size=batch_size, workers=workers)
    loader = make_epoch_loader(shards, cfg, tokenizer, vision, augment=augment)
    mean, std = torch.tensor(vision.mean).view(3, 1, 1), torch.tensor(vision.std).view(3, 1, 1)
    samples, captions, skipped, words, tokens, shown = 0, 0, {}, [], [], []
    start = time.perf_counter()
    for batch in loader:
        for reason, n in batch["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
        if "captions" not in batch:  # the skipped-only batch that ends an epoch
            continue
        samples += len(batch["captions"])
        captions += int(batch["num_captions"].sum())
        words += [len(c.split()) for c in batch["captions"]]
        tokens += batch["attention_mask"].sum(1).tolist()
        for img, cap in zip(batch["pixel_values"], batch["captions"]):
            if len(shown) < show:
                shown.append(((img * std + mean).clamp(0, 1), cap))
        if max_samples and samples >= max_samples:
            break
    seconds = time.perf_counter() - start
    report = {
        "shards": shards, "samples": samples, "images": samples, "captions": captions,
        "skipped": skipped, "caption_words": _stats(words), "caption_tokens": _stats(tokens),
        "truncated_at_max_length": sum(t >= cfg.max_length for t in tokens),
        "seconds": round(seconds, 3), "samples_per_s": round(samples / seconds, 1) if seconds else None,
    }
    return report, shown


def save_grid(shown: list, path: str | Path, *, cols: int = 4) -> None:
    """Images with their captions written below, in a grid."""
    from PIL import Image, ImageDraw

    size = max(shown[0][0].shape[-1], 160)
    text_h = 52
    rows = (len(shown) + cols - 1) // cols
    grid = Image.new("RGB", (cols * size, rows * (size + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, cap) in enumerate(shown):
        x, y = (i % cols) * size, (i // cols) * (size + text_h)
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        grid.paste(Image.fromarray(arr).resize((size, size)), (x, y))
        draw.multiline_text((x + 3, y + size + 2), "\n".join(textwrap.wrap(cap, size // 6)[:4]), fill="black")
    grid.save(path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("shards", metavar="SHARDS", nargs="+", help="shard directory, .tar files or brace pattern")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--show", type=int, default=0, metavar="K", help="write a PNG grid of K samples")
    p.add_argument("--grid", default="inspect.png", help="where --show writes (default inspect.png)")
    p.add_argument("--tokenizer", metavar="PATH", default="",
                   help="tokenizer directory or hub name (default: the synth tokenizer beside the shards)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--max-samples", type=int, default=0, help="stop after about this many samples (0: all)")
    p.add_argument("--augment", action="store_true", help="apply the training transform instead of the eval one")


def run(args: argparse.Namespace) -> int:
    from dlip_ds.data.text import tokenizer_from_config

    shards = args.shards if len(args.shards) > 1 else args.shards[0]
    tokenizer = tokenizer_from_config(DataConfig(train_shards=shards, tokenizer=args.tokenizer))
    report, shown = inspect_shards(shards, tokenizer, image_size=args.image_size, batch_size=args.batch_size,
                                   workers=args.workers, max_samples=args.max_samples, augment=args.augment,
                                   show=args.show)
    if args.show:
        if not shown:
            raise ConfigError("inspect: no sample to show")
        save_grid(shown, args.grid)
        report["grid"] = str(args.grid)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"shards: {report['shards']}")
    print(f"samples: {report['samples']} images, {report['captions']} captions")
    print(f"skipped: {report['skipped'] or 'none'}")
    print(f"caption words: {report['caption_words']}")
    print(f"caption tokens: {report['caption_tokens']} ({report['truncated_at_max_length']} at max length)")
    print(f"throughput: {report['samples_per_s']} samples/s ({report['seconds']} s)")
    if args.show:
        print(f"grid: {args.grid}")
    return 0
