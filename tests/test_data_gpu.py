"""The device-side image path (data/gpu.py, `data.decode: gpu`), run here with the device code on
CPU tensors (torchvision's libjpeg decoder instead of nvJPEG): the same draws and, for the same crop,
the same pixels as the CPU path within a JPEG-decoder tolerance; bad bytes counted, not fatal; the
choice of path and its errors. Set DLIP_TEST_DEVICE=cuda to run the pixel tests on nvJPEG."""

import dataclasses
import io
import json
import os

import numpy as np
import pytest
import torch
import webdataset as wds
from helpers import write_vocab
from PIL import Image

from dlip_ds.config import ConfigError, DataConfig, VisionConfig
from dlip_ds.data.gpu import (
    DeviceJob,
    DevicePrefetcher,
    collate_for_device,
    finish_batch,
    resized_crop,
    resolve_decode,
)
from dlip_ds.data.sample import load_image, open_image
from dlip_ds.data.stream import make_train_loader
from dlip_ds.data.text import load_tokenizer
from dlip_ds.data.transforms import TrainView, View, normalize_batch

DEVICE = os.environ.get("DLIP_TEST_DEVICE", "cpu")
# JPEG-decoder tolerance, in 8-bit levels: libjpeg-turbo against itself (CPU) differs only by the
# resize (PIL rounds to 8 bits between its two passes, torch does not): at most 2 levels; nvJPEG's
# IDCT and chroma upsampling differ from libjpeg-turbo's by a few more.
MAX_LEVELS, MEAN_LEVELS = (2, 0.35) if DEVICE == "cpu" else (8, 1.5)
WORDS = ["a", "red", "circle", "left", "right", "of", "the", "blue", "square"]


def photo(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8)).resize(
        (w, h), Image.Resampling.BICUBIC)


def encode(img, fmt="JPEG"):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def levels(a, b):
    d = (a.float().cpu() - b.float().cpu()).abs()
    return float(d.max()), float(d.mean())


@pytest.mark.parametrize("box", [(10, 20, 300, 260), (3, 4, 20, 30)])  # shrinking (antialiased), enlarging
def test_device_crop_is_the_cpu_crop(box):
    data = encode(photo(320, 330, seed=1))
    view = TrainView(VisionConfig(image_size=64), randaugment=False)
    cpu = view.render(load_image(open_image(data)), View(box, flip=False), 320, 330)
    from torchvision.io import decode_jpeg

    image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), device=DEVICE)
    dev = resized_crop(image, list(box), 64)
    worst, mean = levels(dev, cpu)
    assert worst <= MAX_LEVELS and mean <= MEAN_LEVELS, (worst, mean)


# --------------------------------------------------------------------------- through the loader


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(write_vocab(tmp_path_factory.mktemp("vocab"), WORDS))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """JPEGs (one greyscale) smaller than the crop size, so the CPU path decodes them in full too, a
    PNG (decoded in the worker on the device path), captions naming left and right."""
    d = tmp_path_factory.mktemp("gpu_shards")
    path = str(d / "s-000000.tar")
    with wds.TarWriter(path) as w:
        for i in range(12):
            img = photo(20 + i, 14 + i % 3, seed=i)
            ext, data = ("png", encode(img, "PNG")) if i == 5 else ("jpg", encode(img.convert("L") if i == 7 else img))
            w.write({"__key__": f"{i:04d}", ext: data,
                     "json": json.dumps({"captions": [f"a red circle left of the blue square {i}"], "image_id": i})})
    return [path]


def cfg(shards, **kw):
    return DataConfig(**{"train_shards": shards, "batch_size": 6, "workers": 0, "shuffle_buffer": 4,
                         "max_length": 16, "randaugment": False, **kw})


def test_device_path_draws_and_pixels_match_the_cpu_path(tok, shards):
    vision = VisionConfig(image_size=32)
    cpu = make_train_loader(cfg(shards), tok, vision, seed=3)
    gpu = make_train_loader(cfg(shards, decode="gpu"), tok, vision, seed=3)
    flips = 0
    for _, a, raw in zip(range(4), cpu, gpu):
        assert "pixel_values" not in raw and raw["jpeg_data"].dtype == torch.uint8
        assert raw["worker_rows"].tolist() == [r for r, i in enumerate(raw["image_ids"].tolist()) if i == 5]
        b = finish_batch(raw, vision, DEVICE)
        assert a["captions"] == b["captions"] and torch.equal(a["input_ids"], b["input_ids"])  # same draws
        flips += sum("right of" in c for c in a["captions"])
        std = torch.tensor(vision.std).view(1, 3, 1, 1)
        worst, mean = levels(a["pixel_values"] * std * 255, b["pixel_values"].cpu() * std * 255)
        assert worst <= MAX_LEVELS + 0.01 and mean <= MEAN_LEVELS, (worst, mean)
    assert 0 < flips < 24  # flips happened, and the same ones on both paths (the captions agree)


def test_bad_jpeg_on_the_device_is_counted_and_its_row_replaced():
    good = [DeviceJob(encode(photo(30, 20, seed=s)), View((0, 0, 20, 30), flip=False)) for s in range(3)]
    truncated = DeviceJob(good[0].data[: len(good[0].data) // 2], View((0, 0, 20, 30)))
    pixels = torch.full((3, 16, 16), 7, dtype=torch.uint8)
    batch = {"input_ids": torch.arange(5).view(5, 1), "captions": list("abcde"), "skipped": {"missing_image": 1},
             **collate_for_device([good[0], truncated, pixels, good[1], good[2]], 16)}
    vision = VisionConfig(image_size=16)
    out = finish_batch(batch, vision, DEVICE)
    assert out["skipped"] == {"missing_image": 1, "bad_image": 1}
    assert out["pixel_values"].shape == (5, 3, 16, 16) and torch.isfinite(out["pixel_values"]).all()
    src = out["input_ids"][1, 0].item()  # row 1 became a copy of a decoded row, image and text alike
    assert src != 1 and out["captions"][1] == "abcde"[src]
    assert torch.equal(out["pixel_values"][1], out["pixel_values"][src])
    grey = normalize_batch([pixels], vision.mean, vision.std)[0]  # the row decoded in the worker
    torch.testing.assert_close(out["pixel_values"][2].cpu(), grey, atol=1e-5, rtol=0)


def test_prefetcher_yields_every_batch_in_order():
    seen = list(DevicePrefetcher(iter([{"x": torch.tensor(i)} for i in range(4)]), lambda b: {"x": b["x"] + 10},
                                 torch.device("cpu")))
    assert [int(b["x"]) for b in seen] == [10, 11, 12, 13]


# --------------------------------------------------------------------------- choosing the path


def test_decode_choice_and_its_errors(tok, shards):
    c = cfg(shards, decode="gpu")
    with pytest.raises(ConfigError, match=r"data\.decode=gpu.*data\.randaugment=false"):
        make_train_loader(dataclasses.replace(c, randaugment=True), tok, VisionConfig(image_size=32))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"data\.decode=gpu: this run's device is cpu; set data\.decode=cpu"):
            resolve_decode(c, torch.device("cpu"))
        assert resolve_decode(dataclasses.replace(c, decode="auto"), torch.device("cpu")) == "cpu"
        batch = next(iter(make_train_loader(dataclasses.replace(c, decode="auto"), tok, VisionConfig(image_size=32))))
        assert "pixel_values" in batch  # auto without CUDA: the CPU path
    assert resolve_decode(dataclasses.replace(c, decode="auto", randaugment=True), torch.device("cuda")) == "cpu"
    from dlip_ds.recipe import recipe_from_dict

    with pytest.raises(ConfigError, match=r"data\.decode must be cpu\|gpu\|auto"):
        recipe_from_dict({"data": {"decode": "nvjpeg"}})


GPU_ON_CPU_SCRIPT = """
import sys
from dlip_ds import train
from dlip_ds.engine import trainer

trainer.resolve_decode = lambda cfg, device, supported=True: "gpu"  # the device path, its device the CPU
sys.exit(train.main(sys.argv[1:]))
"""


def test_training_run_with_the_device_path_on_cpu(shards, tmp_path):
    """The trainer's decode=gpu plumbing end to end (encoded batches from a worker process,
    DevicePrefetcher, finish_batch, the task's batch), the device code on CPU tensors, on the JPEG
    shards above (a PNG and a grey JPEG among them): a tiny run trains and exports."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo), "DS_ACCELERATOR": "cpu",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    (tmp_path / "vocab").mkdir()
    sets = [f"data.train_shards={shards[0]}", f"data.tokenizer={write_vocab(tmp_path / 'vocab', WORDS)}",
            "data.batch_size=4", "data.workers=1", "data.shuffle_buffer=8", "data.randaugment=false",
            "data.decode=gpu", "teacher.source=", "train.max_steps=2", "train.warmup_steps=1", "train.log_every=1",
            "train.ckpt_every=100"]
    cmd = [sys.executable, "-c", GPU_ON_CPU_SCRIPT, "--config", "tiny-pretrain", "--out", str(tmp_path / "run"),
           *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 2/2" in proc.stdout and (tmp_path / "run" / "student" / "model.safetensors").is_file()
