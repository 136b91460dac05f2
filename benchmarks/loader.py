"""Loader throughput: dlip_ds's training loader against a plain webdataset + torchvision pipeline.

    python benchmarks/loader.py                 # CPU, about two minutes on 2 cores
    python benchmarks/loader.py --workers 1 2 4 --images 800

Both read the same shards of 500-px JPEGs (smooth colour fields with noise, about photo-sized files)
and produce 224-px training crops in batches of 32, in the same run:
- `dlip_ds`: `make_train_loader` (resampled shards, shuffle buffer, decode with skip counting, BLIP
  transform, caption cleaning, tokenisation of the ITC/ITM/LM views), with RandAugment on and off;
- `baseline`: `webdataset.WebDataset(resampled) .shuffle .decode("pil") .to_tuple .map_tuple(
  RandomResizedCrop + flip + ToTensor + Normalize) .batched` in a `WebLoader` (same prefetch depth),
  no tokenisation.
Throughput = samples/s after a warm-up, divided by the worker count for the per-worker figure.
Writes benchmarks/results/loader.json and the Markdown table benchmarks/results/loader.md.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

ROOT = Path(__file__).resolve().parent
SIDE, SIZE, BATCH = 500, 224, 32
WORDS = ["a", "red", "circle", "picture", "of", "blue", "square", "the", "left", "on", "dog", "runs", "beach"]


def photo_like(rng: np.random.Generator) -> bytes:
    """A 500x375..500 JPEG: a bicubic-upsampled 6x6 colour field plus noise (q 90, ~40-70 KB)."""
    h = int(rng.integers(375, 501))
    field = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((SIDE, h), Image.BICUBIC)
    arr = np.asarray(field, dtype=np.int16) + rng.normal(0, 12, (h, SIDE, 3)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_data(root: Path, n_images: int) -> tuple[list[str], Path]:
    from dlip_ds.data.shards import ShardSink

    rng = np.random.default_rng(0)
    with ShardSink(root / "shards", prefix="bench", shard_size=max(1, n_images // 8)) as sink:
        for i in range(n_images):
            caps = [" ".join(rng.choice(WORDS, int(rng.integers(5, 15)))) for _ in range(5)]
            sink.write({"__key__": f"{i:06d}", "jpg": photo_like(rng), "json": json.dumps({"captions": caps,
                                                                                        "image_id": i})})
    vocab = root / "vocab"
    vocab.mkdir()
    (vocab / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return sorted(str(p) for p in (root / "shards").glob("*.tar")), vocab


def ours(urls, vocab, workers: int, randaugment: bool):
    from dlip_ds.config import DataConfig, VisionConfig
    from dlip_ds.data.stream import make_train_loader
    from dlip_ds.data.text import load_tokenizer

    cfg = DataConfig(train_shards=urls, batch_size=BATCH, workers=workers, shuffle_buffer=500,
                     randaugment=randaugment)
    return make_train_loader(cfg, load_tokenizer(vocab), VisionConfig(image_size=SIZE), seed=0)


def baseline(urls, vocab, workers: int, randaugment: bool = False):
    from torchvision import transforms as T

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    tf = T.Compose([T.RandomResizedCrop(SIZE, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                    T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    ds = (wds.WebDataset(urls, resampled=True, shardshuffle=False, nodesplitter=wds.split_by_node)
          .shuffle(500).decode("pil").to_tuple("jpg", "json").map_tuple(tf, lambda x: x).batched(BATCH))
    # the prefetch depth of make_train_loader, so neither side gets more batches ready ahead of the clock
    return wds.WebLoader(ds, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                         prefetch_factor=4 if workers > 0 else None)


def measure(loader, batches: int, warmup: int) -> float:
    it = iter(loader)
    for _ in range(warmup):  # worker start-up and shuffle-buffer fill
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * BATCH / (time.perf_counter() - start)


def machine() -> dict:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
    except (OSError, subprocess.CalledProcessError):
        model = platform.processor()
    return {"cpu": model or platform.processor(), "cores": len(os.sched_getaffinity(0)),
            "date": datetime.date.today().isoformat(), "torch": torch.__version__, "webdataset": wds.__version__,
            "python": platform.python_version()}


def markdown(results: list[dict], info: dict) -> str:
    lines = [
        "### Loader throughput (CPU)",
        "",
        (f"{info['cpu']}, {info['cores']} cores, {info['date']}; torch {info['torch']}, webdataset "
        f"{info['webdataset']}. {info['images']} JPEGs of 500 px in {info['shards']} shards -> 224-px training "
        f"crops, batch {BATCH}; median of {info['repeats']} interleaved runs of {info['batches']} timed batches "
         f"after {info['warmup']} warm-up batches. "
        "`python benchmarks/loader.py`."),
        "",
        "| pipeline | RandAugment | workers | samples/s | samples/s per worker | vs baseline |",
        "|---|---|---:|---:|---:|---:|",
    ]
    base = {r["workers"]: r["samples_per_s"] for r in results if r["pipeline"] == "baseline"}
    for r in results:
        ratio = r["samples_per_s"] / base[r["workers"]] if base.get(r["workers"]) else float("nan")
        lines.append(f"| {r['pipeline']} | {'on' if r['randaugment'] else 'off'} | {r['workers']} | "
                     f"{r['samples_per_s']:.0f} | {r['per_worker']:.0f} | {ratio:.2f}x |")
    lines += ["", ("`dlip_ds` also tokenises three text views per sample and counts skipped samples; the "
              "baseline does neither. The CPU was shared with other jobs (1-minute load average "
              f"{info['load_average'][0]} before, {info['load_average'][1]} after, on {info['cores']} cores), so "
              "the ratios are rough; `runs` in results/loader.json shows the spread."), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="median of this many interleaved runs")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "loader.json")
    p.add_argument("--md", type=Path, default=ROOT / "results" / "loader.md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # workers do the work; keep the main process from competing with them

    configs = [(workers, name, build, randaug) for workers in args.workers
               for name, build, randaug in (("baseline", baseline, False), ("dlip_ds", ours, False),
                                            ("dlip_ds", ours, True))]
    runs: dict[int, list[float]] = {i: [] for i in range(len(configs))}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        urls, vocab = make_data(Path(tmp), args.images)
        for rep in range(args.repeats):  # interleaved, so a burst of load on the shared CPU hits every config
            for i, (workers, name, build, randaug) in enumerate(configs):
                runs[i].append(measure(build(urls, vocab, workers, randaug), args.batches, args.warmup))
                print(f"[{rep + 1}/{args.repeats}] {name:9s} randaugment={randaug!s:5s} workers={workers}: "
                      f"{runs[i][-1]:7.1f} samples/s", flush=True)
    results = []
    for i, (workers, name, _, randaug) in enumerate(configs):
        sps = float(np.median(runs[i]))
        results.append({"pipeline": name, "randaugment": randaug, "workers": workers, "samples_per_s": round(sps, 1),
                        "per_worker": round(sps / max(1, workers), 1), "runs": [round(r, 1) for r in runs[i]]})
    info = {**machine(), "images": args.images, "shards": len(urls), "batches": args.batches, "warmup": args.warmup,
            "repeats": args.repeats, "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": info, "results": results}, indent=1) + "\n")
    args.md.write_text(markdown(results, info))
    print(f"wrote {args.out} and {args.md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
