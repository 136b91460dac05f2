"""Loader throughput: dlip_ds's training loader against a plain webdataset + torchvision pipeline
and open_clip's own webdataset pipeline, on the same shards, in one run.

    python benchmarks/loader.py                       # CPU: the table of benchmarks/README.md
    python benchmarks/loader.py --batches 8 --repeats 1 --sides 384   # a quick look
    python benchmarks/loader.py --device cuda         # GPU node: decode=cpu vs decode=gpu, 8 and 16 workers

Data: JPEGs of 384 and 512 px on the long side (img2dataset's usual sizes), quality 95
(img2dataset's default), photo-like content (a 1/f^1.3 colour spectrum plus a few solid shapes:
about 0.5 bytes per pixel, like a photo at that quality), each with a .txt caption and a .json of
five captions, in 8 shards per size. Every pipeline produces 224-px training crops (BLIP's
RandomResizedCrop, bicubic, scale (0.5, 1)), batch 32, after a shuffle buffer of 500:
- `baseline`: `webdataset.WebDataset(resampled) .shuffle .decode("pil") .to_tuple .map_tuple(
  RandomResizedCrop + RandomHorizontalFlip + ToTensor + Normalize, caption choice) .batched` with a
  collate that stacks the images and tokenises the same caption views as dlip_ds (`encode_captions`:
  ITC/ITM and LM views, the same fast tokenizer); a `WebLoader` with dlip_ds's prefetch depth.
- `open_clip`: `open_clip_train.data.get_wds_dataset` (resampled) with `open_clip.image_transform(
  is_train=True)` at scale (0.5, 1) and its per-sample tokenisation (`tokenizer(text)[0]`, here the
  same fast tokenizer, one view padded to 35), its shuffle buffer set to ours (500, initial 100), and
  webdataset's tar reader in place of its own copy, which fails on webdataset 1.0 (the line its code
  names as equivalent). Its training transform has no flip; it decodes with `decode("pilrgb")`.
- `dlip_ds`: `make_train_loader` (skips counted by reason, EXIF orientation, caption cleaning, flip
  with left/right swapped in the caption, tokenisation), RandAugment off and on (BLIP's op list,
  rand-n2-m5-mstd0; the baselines have none).
Throughput = pairs/s after a warm-up, per worker = / workers. Configs are interleaved within each
round, so a burst of load on a shared CPU hits all of them; the median over rounds is reported, the
load average before and after, and every run in the JSON.
Writes benchmarks/results/loader.json (or loader_cuda.json) and the Markdown table beside it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import io
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent
BATCH, SHUFFLE, MAX_LENGTH, PROMPT = 32, 500, 35, "a picture of "
WORDS = ["a", "red", "circle", "picture", "of", "blue", "square", "the", "left", "on", "dog", "runs", "beach"]
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def photo_like(rng: np.random.Generator, long_side: int) -> bytes:
    """A JPEG (q 95) whose long side is `long_side`, short side 0.6-1x of it: a 1/f^1.3 spectrum
    with correlated colour channels (natural images have roughly 1/f) and a few solid shapes."""
    short = int(rng.integers(int(long_side * 0.6), long_side + 1))
    h, w = (short, long_side) if rng.random() < 0.7 else (long_side, short)
    f = np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.rfftfreq(w)[None, :] ** 2)
    f[0, 0] = 1.0
    amp = f ** -1.3

    def field():
        return np.fft.irfft2(amp * np.exp(2j * np.pi * rng.random(amp.shape)), s=(h, w))

    base = field()
    arr = np.stack([base + 0.4 * field() for _ in range(3)], -1)
    arr = (arr - arr.mean()) / arr.std() * 50 + rng.uniform(90, 160, 3)
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x, y, x + int(rng.integers(20, w // 2)), y + int(rng.integers(20, h // 2))]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def make_data(root: Path, n_images: int, long_side: int) -> list[str]:
    from dlip_ds.data.shards import ShardSink

    rng = np.random.default_rng(long_side)
    folder = root / f"shards{long_side}"
    with ShardSink(folder, prefix="bench", shard_size=max(1, n_images // 8)) as sink:
        for i in range(n_images):
            caps = [" ".join(rng.choice(WORDS, int(rng.integers(5, 15)))) for _ in range(5)]
            sink.write({"__key__": f"{i:06d}", "jpg": photo_like(rng, long_side), "txt": caps[0],
                        "json": json.dumps({"captions": caps, "image_id": i})})
    return sorted(str(p) for p in folder.glob("*.tar"))


def make_vocab(root: Path) -> Path:
    vocab = root / "vocab"
    vocab.mkdir(exist_ok=True)
    (vocab / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return vocab


# --------------------------------------------------------------------------- pipelines


def ours(urls, tok, workers: int, *, randaugment: bool, size: int = 224, decode: str = "cpu"):
    from dlip_ds.config import DataConfig, VisionConfig
    from dlip_ds.data.stream import make_train_loader

    kw = {"decode": decode} if decode != "cpu" else {}  # the loader before issue 10 has no `decode`
    cfg = DataConfig(train_shards=urls, batch_size=BATCH, workers=workers, shuffle_buffer=SHUFFLE,
                     max_length=MAX_LENGTH, prompt=PROMPT, randaugment=randaugment, **kw)
    return make_train_loader(cfg, tok, VisionConfig(image_size=size), seed=0)


class BaselineCollate:
    """Stack the images, tokenise the chosen captions into dlip_ds's views (the same call)."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, samples):
        from dlip_ds.data.text import encode_captions

        images, captions = zip(*samples)
        batch = encode_captions(self.tok, list(captions), max_length=MAX_LENGTH, prompt=PROMPT)
        batch["pixel_values"] = torch.stack(images)
        return batch


def choose_caption(meta: dict) -> str:
    """One of the sample's captions (webdataset's decode has parsed the json), cleaned as BLIP does."""
    from dlip_ds.data.text import clean_caption

    return clean_caption(random.choice(meta["captions"]))


def baseline(urls, tok, workers: int, *, size: int = 224, **_):
    from torchvision import transforms as T

    tf = T.Compose([T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                    T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    ds = (wds.WebDataset(urls, resampled=True, shardshuffle=False, nodesplitter=wds.split_by_node)
          .shuffle(SHUFFLE).decode("pil").to_tuple("jpg", "json").map_tuple(tf, choose_caption)
          .batched(BATCH, collation_fn=BaselineCollate(tok)))
    # dlip_ds's prefetch depth, so neither side gets more batches ready ahead of the clock
    return wds.WebLoader(ds, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                         prefetch_factor=4 if workers > 0 else None)


class OpenClipTokens:
    """open_clip calls `tokenizer(text)[0]` per sample: one view, padded to a fixed length."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, text):
        return self.tok([text], padding="max_length", truncation=True, max_length=MAX_LENGTH,
                        return_tensors="pt").input_ids


def open_clip_loader(urls, tok, workers: int, *, size: int = 224, **_):
    import argparse as ap

    import open_clip
    import open_clip_train.data as ocd

    ocd._SAMPLE_SHUFFLE_SIZE, ocd._SAMPLE_SHUFFLE_INITIAL = SHUFFLE, 100  # dlip_ds's buffer (theirs: 5000/1000)
    # Its own tar reader (`tarfile_to_samples_nothrow`) expects webdataset < 1.0's file records and
    # fails on 1.0 (KeyError 'fname'); webdataset's reader with its handler is the line it replaces.
    ocd.tarfile_to_samples_nothrow = wds.tarfile_to_samples(handler=ocd.log_and_continue)
    preprocess = open_clip.image_transform(size, is_train=True, mean=MEAN, std=STD, aug_cfg={"scale": (0.5, 1.0)})
    args = ap.Namespace(train_data="::".join(urls), val_data=None, dataset_resampled=True, train_num_samples=10 ** 9,
                        train_data_upsampling_factors=None, seed=0, batch_size=BATCH, world_size=1, workers=workers)
    return ocd.get_wds_dataset(args, preprocess, is_train=True, tokenizer=OpenClipTokens(tok)).dataloader


PIPELINES = {"baseline": baseline, "open_clip": open_clip_loader, "dlip_ds": ours}


# --------------------------------------------------------------------------- measuring


def measure(loader, batches: int, warmup: int, finish=None) -> float:
    it = iter(loader)
    try:
        for _ in range(warmup):  # worker start-up and shuffle-buffer fill
            batch = next(it)
            if finish is not None:
                finish(batch)
        start = time.perf_counter()
        for _ in range(batches):
            batch = next(it)
            if finish is not None:
                finish(batch)
        return batches * BATCH / (time.perf_counter() - start)
    finally:
        it.close()
        shutdown(loader)


def shutdown(loader) -> None:
    """End the workers now, so they neither fill their prefetch queue while the next config runs nor
    outlive the shards (persistent workers live as long as their DataLoader)."""
    for stage in getattr(loader, "pipeline", [loader]):
        if isinstance(stage, torch.utils.data.DataLoader) and getattr(stage, "_iterator", None) is not None:
            stage._iterator._shutdown_workers()
            stage._iterator = None


def machine() -> dict:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
    except (OSError, subprocess.CalledProcessError):
        model = platform.processor()
    import dlip_ds

    info = {"cpu": model or platform.processor(), "cores": len(os.sched_getaffinity(0)),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "webdataset": wds.__version__, "python": platform.python_version(),
            "dlip_ds_tree": str(Path(dlip_ds.__file__).resolve().parents[1])}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def markdown(results: list[dict], info: dict) -> str:
    gpu = info.get("device") == "cuda"
    title = f"Loader throughput ({info.get('gpu', 'GPU') if gpu else 'CPU'})"
    lines = [
        f"### {title}",
        "",
        (f"{info['cpu']}, {info['cores']} cores, {info['date']}; torch {info['torch']}, webdataset "
         f"{info['webdataset']}. {info['images']} JPEGs per size in 8 shards -> training crops, batch {BATCH}; "
         f"median of {info['repeats']} interleaved rounds of {info['batches']} timed batches after {info['warmup']} "
         f"warm-up batches. 1-minute load average {info['load_average'][0]} before, {info['load_average'][1]} after, "
         f"on {info['cores']} cores. `python benchmarks/loader.py {info['argv']}`."),
        "",
        "| JPEG long side | crop px | pipeline | RandAugment | decode | workers | pairs/s | per worker | vs baseline |",
        "|---:|---:|---|---|---|---:|---:|---:|---:|",
    ]
    ref = "dlip_ds" if gpu else "baseline"
    base = {(r["side"], r["size"], r["workers"]): r["pairs_per_s"] for r in results
            if r["pipeline"] == ref and r["decode"] == "cpu" and not r["randaugment"]}
    for r in results:
        b = base.get((r["side"], r["size"], r["workers"]))
        ratio = f"{r['pairs_per_s'] / b:.2f}x" if b else "n/a"
        lines.append(f"| {r['side']} | {r['size']} | {r['pipeline']} | {'on' if r['randaugment'] else 'off'} | "
                     f"{r['decode']} | {r['workers']} | {r['pairs_per_s']:.0f} | {r['per_worker']:.0f} | {ratio} |")
    if gpu:
        lines += ["", "vs baseline: against dlip_ds with `data.decode: cpu` at the same size and workers."]
    return "\n".join(lines) + "\n"


def configs_for(args) -> list[dict]:
    """Every (JPEG size, crop size, workers, pipeline, RandAugment, decode) of one round."""
    out = []
    for side in args.sides:
        for size in args.sizes:
            for workers in args.workers:
                common = {"side": side, "size": size, "workers": workers}
                if args.device == "cuda":
                    out += [{**common, "pipeline": "dlip_ds", "randaugment": False, "decode": d} for d in ("cpu", "gpu")]
                    continue
                for name in args.pipelines:
                    for ra in ((False, True) if name == "dlip_ds" else (False,)):
                        out.append({**common, "pipeline": name, "randaugment": ra, "decode": "cpu"})
    return out


def device_finish(vision, device):
    """What the trainer does with a batch on the GPU: images decoded and cropped there (decode=gpu)
    or copied there (decode=cpu), synchronised so the clock sees the work."""
    from dlip_ds.data.gpu import finish_batch

    def finish(batch):
        batch = finish_batch(batch, vision, device)
        batch["pixel_values"].to(device, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return finish


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--workers", type=int, nargs="+", default=None, help="default 1 2 (cpu), 8 16 (cuda)")
    p.add_argument("--sides", type=int, nargs="+", default=[384, 512], help="JPEG long sides")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="crop sizes; default 224 (cpu), 224 384 (cuda)")
    p.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=list(PIPELINES))
    p.add_argument("--images", type=int, default=400, help="JPEGs per size")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="median of this many interleaved rounds")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    args.workers = args.workers or ([8, 16] if gpu else [1, 2])
    args.sizes = args.sizes or ([224, 384] if gpu else [224])
    out = args.out or ROOT / "results" / ("loader_cuda.json" if gpu else "loader.json")
    torch.set_num_threads(1)  # workers do the work; keep the main process from competing with them

    from dlip_ds.config import VisionConfig
    from dlip_ds.data.text import load_tokenizer

    if "open_clip" in args.pipelines and importlib.util.find_spec("open_clip_train") is None:
        print("open_clip's pipeline left out: open-clip-torch is not installed (pip install -e '.[bench]')")
        args.pipelines = [p for p in args.pipelines if p != "open_clip"]
    configs = configs_for(args)
    runs: list[list[float]] = [[] for _ in configs]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        urls = {side: make_data(Path(tmp), args.images, side) for side in args.sides}
        tok = load_tokenizer(make_vocab(Path(tmp)))
        for rep in range(args.repeats):
            for i, c in enumerate(configs):
                loader = PIPELINES[c["pipeline"]](urls[c["side"]], tok, c["workers"], randaugment=c["randaugment"],
                                                  size=c["size"], decode=c["decode"])
                finish = device_finish(VisionConfig(image_size=c["size"]), torch.device("cuda")) if gpu else None
                runs[i].append(measure(loader, args.batches, args.warmup, finish))
                print(f"[{rep + 1}/{args.repeats}] {c['side']}px->{c['size']} {c['pipeline']:9s} ra={c['randaugment']!s:5s} "
                      f"decode={c['decode']} workers={c['workers']}: {runs[i][-1]:7.1f} pairs/s "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
    results = [{**c, "pairs_per_s": round(float(np.median(r)), 1),
                "per_worker": round(float(np.median(r)) / max(1, c["workers"]), 1), "runs": [round(x, 1) for x in r]}
               for c, r in zip(configs, runs)]
    info = {**machine(), "device": args.device, "images": args.images, "batches": args.batches,
            "warmup": args.warmup, "repeats": args.repeats, "argv": " ".join(sys.argv[1:] if argv is None else argv),
            "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "results": results}, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(results, info))
    print(markdown(results, info))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
