"""The streaming loader: batch contract, bad input counted, truncated shards, rank/worker splitting,
determinism, resume, mixing, shard specs, transforms, evaluation sets."""

import io
import json
import random
import struct
import zlib

import numpy as np
import pytest
import torch
import webdataset as wds
from helpers import write_vocab
from PIL import Image

from dlip_ds.config import DataConfig, VisionConfig
from dlip_ds.data.evalset import load_eval_set
from dlip_ds.data.stream import make_epoch_loader, make_train_loader
from dlip_ds.data.text import load_tokenizer
from dlip_ds.data.transforms import eval_transform, hflip_pair, train_transform

WORDS = ["a", "red", "circle", "picture", "of", "blue", "square", "the", "left", "right", "to", "on"]
VISION = VisionConfig(image_size=16)


# --------------------------------------------------------------------------- helpers


def colour(i):
    return (i * 37 % 256, i * 91 % 256, i * 53 % 256)


def encode(img, fmt="PNG", **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def good(i, captions=None):
    caps = captions or [f"a red circle {i}", f"the blue square {i}"]
    return {"__key__": f"{i:06d}", "png": encode(Image.new("RGB", (20, 12), colour(i))),
            "json": json.dumps({"captions": caps, "image_id": i})}


def write_shard(path, samples):
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)
    return str(path)


def huge_png_header():
    """A valid 8x8 PNG whose header claims 20000x20000 pixels (a decompression bomb, cheaply)."""
    data = bytearray(encode(Image.new("L", (8, 8))))
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", 20000, 20000)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(write_vocab(tmp_path_factory.mktemp("vocab"), WORDS))


def cfg(**kw):
    return DataConfig(**{"batch_size": 4, "workers": 0, "shuffle_buffer": 8, "max_length": 12, "randaugment": False,
                         **kw})


def collect(loader, n_batches=None):
    ids, skipped = [], {}
    for i, b in enumerate(loader):
        if n_batches is not None and i >= n_batches:
            break
        ids += b["image_ids"].tolist() if "image_ids" in b else []
        for k, v in b["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    return ids, skipped


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Five good shards of 5 samples: image ids 0..24."""
    d = tmp_path_factory.mktemp("shards")
    return [write_shard(d / f"s-{k:06d}.tar", [good(5 * k + j) for j in range(5)]) for k in range(5)]


# --------------------------------------------------------------------------- batch contract


def test_batch_contract(tok, shards):
    batch = next(iter(make_train_loader(cfg(train_shards=shards, prompt="a picture of "), tok, VISION)))
    B = 4
    assert batch["pixel_values"].shape == (B, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    L = batch["input_ids"].shape[1]
    for k in ("input_ids", "attention_mask", "itm_input_ids", "lm_input_ids", "lm_attention_mask", "lm_labels"):
        assert batch[k].shape == (B, L) and batch[k].dtype == torch.long, k
    assert (batch["input_ids"][:, 0] == tok.cls_token_id).all()
    assert (batch["itm_input_ids"][:, 0] == tok.enc_token_id).all()
    assert torch.equal(batch["itm_input_ids"][:, 1:], batch["input_ids"][:, 1:])
    assert (batch["lm_input_ids"][:, 0] == tok.bos_token_id).all()
    assert (batch["lm_labels"][:, :4] == -100).all()  # [DEC] a picture of
    assert torch.equal(batch["lm_labels"] == -100, (batch["lm_attention_mask"] == 0) | (torch.arange(L) < 4))
    assert batch["image_ids"].shape == (B,) and batch["skipped"] == {}
    for cap, ids in zip(batch["captions"], batch["image_ids"].tolist()):
        assert cap.split()[-1] == str(ids)  # the caption belongs to the image
    assert (batch["num_captions"] == 2).all()


def test_eval_transform_reference():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 20, 3), dtype=np.uint8))
    got = eval_transform(VISION)(img)
    ref = np.asarray(img.resize((16, 16), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    ref = (ref - np.array(VISION.mean, dtype=np.float32)) / np.array(VISION.std, dtype=np.float32)
    torch.testing.assert_close(got, torch.from_numpy(ref).permute(2, 0, 1), atol=1e-5, rtol=0)


def test_train_transform_and_flip():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    out = train_transform(VISION, min_scale=0.5, randaugment=True)(img)
    assert out.shape == (3, 16, 16) and torch.isfinite(out).all()
    flipped, cap = hflip_pair(img, "a red circle to the left of a blue square, top left, not leftover")
    assert cap == "a red circle to the right of a blue square, top right, not leftover"
    assert np.array_equal(np.asarray(flipped), np.asarray(img)[:, ::-1])


# --------------------------------------------------------------------------- bad input


def bad_samples(tmp_path):
    """(samples, expected skip reasons, ids that must be kept)."""
    cmyk = encode(Image.new("CMYK", (10, 10), (0, 255, 255, 0)), "JPEG")
    deep = encode(Image.fromarray(np.full((6, 6), 40000, dtype=np.uint16)))
    pal = Image.new("P", (6, 6))
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    pal.paste(1, (0, 0, 6, 6))
    rgba = encode(Image.new("RGBA", (6, 6), (10, 200, 10, 0)))
    exif = Image.new("RGB", (12, 6), (1, 2, 3)).getexif()
    exif[0x0112] = 6  # rotate 90 degrees
    rotated = encode(Image.new("RGB", (12, 6), (1, 2, 3)), "JPEG", exif=exif.tobytes())
    truncated = encode(Image.new("RGB", (64, 64), (9, 9, 9)), "JPEG")[:200]
    long_caption = " ".join(["red"] * 3000)
    meta = json.dumps({"caption": "a red circle", "image_id": 100})

    def s(k, **parts):
        return {"__key__": f"x{k:05d}", **parts}

    samples = [
        good(100),
        s(1, json=meta),                                                   # missing_image
        s(2, jpg=b"this is not an image", txt="a red circle"),             # bad_image
        s(3, png=b"", txt="a red circle"),                                 # empty_image
        s(4, jpg=truncated, txt="a red circle"),                           # bad_image (truncated)
        s(5, png=huge_png_header(), txt="a red circle"),                   # image_too_large
        s(6, png=encode(Image.new("RGB", (4, 4))), txt="  \t "),           # empty_caption
        s(7, png=encode(Image.new("RGB", (4, 4))), txt="..!"),             # empty_caption (after cleaning)
        s(8, png=encode(Image.new("RGB", (4, 4)))),                        # missing_caption
        s(9, png=encode(Image.new("RGB", (4, 4))), json="{not json"),      # bad_json
        s(10, png=encode(Image.new("RGB", (4, 4))), txt=b"red \xff\xfe"),   # caption_not_utf8
        s(11, jpg=cmyk, json=json.dumps({"caption": "a red square", "image_id": 101})),
        s(12, png=deep, json=json.dumps({"caption": "a blue square", "image_id": 102})),
        s(13, png=encode(pal, transparency=0), json=json.dumps({"caption": "a red circle", "image_id": 103})),
        s(14, png=rgba, json=json.dumps({"caption": "a red circle", "image_id": 104})),
        s(15, jpg=rotated, json=json.dumps({"caption": "a red circle", "image_id": 105})),
        s(16, png=encode(Image.new("RGB", (4, 4))), json=json.dumps({"caption": long_caption, "image_id": 106})),
    ]
    reasons = {"missing_image": 1, "bad_image": 2, "empty_image": 1, "image_too_large": 1, "empty_caption": 2,
               "missing_caption": 1, "bad_json": 1, "caption_not_utf8": 1}
    return samples, reasons, [100, 101, 102, 103, 104, 105, 106]


def test_loader_skips_and_counts_bad_input(tok, tmp_path):
    samples, reasons, kept = bad_samples(tmp_path)
    bad = write_shard(tmp_path / "bad.tar", samples)
    ids, skipped = collect(make_epoch_loader(bad, cfg(), tok, VISION, batch_size=3))
    assert sorted(ids) == kept
    assert skipped == reasons
    # skips after the last batch are reported too (a final batch holding only `skipped`)
    tail = write_shard(tmp_path / "tail.tar", [{"__key__": "t0", "txt": "a red circle"}])
    ids, skipped = collect(make_epoch_loader([bad, tail], cfg(), tok, VISION, batch_size=7))
    assert sorted(ids) == kept and skipped == {**reasons, "missing_image": 2}


def test_truncated_shard(tok, tmp_path):
    full = write_shard(tmp_path / "a.tar", [good(i) for i in range(10)])
    with open(full, "rb") as f:
        data = f.read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 300])
    other = write_shard(tmp_path / "b.tar", [good(i) for i in range(20, 25)])
    ids, skipped = collect(make_epoch_loader([str(cut), other], cfg(), tok, VISION))
    assert skipped.get("shard_error", 0) >= 1
    head = [i for i in ids if i < 10]
    assert head == list(range(len(head))) and 2 <= len(head) < 10  # a prefix of the cut shard survives
    assert [i for i in ids if i >= 20] == list(range(20, 25))  # and the next shard is read in full


# --------------------------------------------------------------------------- splitting, determinism, resume


def test_two_ranks_two_workers_exact_epoch(tok, shards, tmp_path):
    extra = write_shard(tmp_path / "bad.tar", [good(25), {"__key__": "nope", "txt": "a red circle"}, good(26)])
    all_ids, skipped_total = [], 0
    for rank in range(2):
        loader = make_epoch_loader(shards + [extra], cfg(workers=2), tok, VISION, rank=rank, world_size=2,
                                   batch_size=2)
        ids, skipped = collect(loader)
        all_ids += ids
        skipped_total += sum(skipped.values())
    assert sorted(all_ids) == list(range(27))  # no duplicate, no missing sample
    assert skipped_total == 1


def test_deterministic_for_seed_and_rank(tok, shards):
    c = cfg(train_shards=shards, randaugment=True)

    def first(seed, rank=0, workers=0):
        batches = []
        for i, b in enumerate(make_train_loader(DataConfig(**{**c.__dict__, "workers": workers}), tok, VISION,
                                                rank=rank, world_size=2, seed=seed)):
            batches.append(b)
            if i == 3:
                return batches

    state = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    a, b = first(5), first(5)
    assert torch.equal(torch.get_rng_state(), state[0]) and random.getstate() == state[1]  # global RNG untouched
    assert np.array_equal(np.random.get_state()[1], state[2])
    for x, y in zip(a, b):
        for k in ("pixel_values", "input_ids", "image_ids"):
            assert torch.equal(x[k], y[k])
    other_seed, other_rank = first(6), first(5, rank=1)
    ids = [torch.cat([x["image_ids"] for x in run]).tolist() for run in (a, other_seed, other_rank)]
    assert ids[0] != ids[1] and ids[0] != ids[2]
    w1, w2 = first(5, workers=2), first(5, workers=2)
    assert all(torch.equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(w1, w2))


def test_resume_does_not_replay(tok, shards):
    c = cfg(train_shards=shards)

    def ids(start_step, n=6):
        return collect(make_train_loader(c, tok, VISION, seed=1, start_step=start_step), n)[0]

    fresh, resumed, again = ids(0), ids(100), ids(100)
    assert resumed == again  # deterministic for a given step
    assert resumed != fresh  # a restarted job draws a new sequence instead of replaying the first batches


def test_weighted_mix(tok, tmp_path):
    a = write_shard(tmp_path / "a.tar", [good(i) for i in range(10)])
    b = write_shard(tmp_path / "b.tar", [good(1000 + i) for i in range(10)])
    ids = collect(make_train_loader(cfg(train_shards=[a, b], weights=[3.0, 1.0], batch_size=20), tok, VISION), 20)[0]
    share = sum(i < 1000 for i in ids) / len(ids)
    assert 0.68 < share < 0.82


# --------------------------------------------------------------------------- shard specs


def test_shard_specs(tok, shards, tmp_path):
    folder = shards[0].rsplit("/", 1)[0]
    want = list(range(25))
    for spec in (shards, f"{folder}/s-{{000000..000004}}.tar", folder,
                 [f"pipe:cat {s}" for s in shards], f"file:{shards[0]}"):
        ids = collect(make_epoch_loader(spec, cfg(), tok, VISION))[0]
        assert sorted(ids) == (want[:5] if isinstance(spec, str) and spec.startswith("file:") else want), spec
    from dlip_ds.config import ConfigError

    with pytest.raises(ConfigError, match="do not exist"):
        make_epoch_loader(f"{folder}/s-{{000000..000009}}.tar", cfg(), tok, VISION)


# --------------------------------------------------------------------------- evaluation sets


def test_eval_set_from_shards_groups_captions(tmp_path):
    per_caption = [dict(good(i // 2, [f"caption {i}"]), __key__=f"k{i}") for i in range(8)]  # 2 samples per image
    bad = {"__key__": "bad", "jpg": b"junk", "txt": "a red circle"}
    path = write_shard(tmp_path / "e.tar", per_caption[:5] + [bad] + per_caption[5:])
    es = load_eval_set(path)
    assert es.image_ids == [0, 1, 2, 3] and len(es) == 4
    assert es.captions == [f"caption {i}" for i in range(8)]
    assert es.img2txt == [[0, 1], [2, 3], [4, 5], [6, 7]] and es.txt2img == [0, 0, 1, 1, 2, 2, 3, 3]
    assert es.skipped == {"bad_image": 1}
    to_tensor = eval_transform(VisionConfig(image_size=4, mean=(0, 0, 0), std=(1, 1, 1)))
    pixels = torch.cat(list(es.image_batches(3, to_tensor)))
    assert pixels.shape == (4, 3, 4, 4)
    for i, img in zip(es.image_ids, pixels):
        torch.testing.assert_close(img.mean((1, 2)), torch.tensor(colour(i)) / 255, atol=2 / 255, rtol=0)


def test_eval_set_from_annotations(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        Image.new("RGB", (5, 5), colour(i)).save(tmp_path / "img" / f"{i}.png")
    ann = [{"image": "0.png", "caption": ["A Red Circle.", "one"], "image_id": 7},
           {"image": "1.png", "caption": "two", "image_id": 8},
           {"image": "missing.png", "caption": "gone"},
           {"image": "2.png", "caption": "three"},
           {"image": "1.png", "caption": "two again", "image_id": 8}]
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    es = load_eval_set(str(tmp_path / "ann.json"), image_root=str(tmp_path / "img"))
    assert es.image_ids == [7, 8, "2.png"]
    assert es.captions == ["a red circle", "one", "two", "three", "two again"]
    assert es.img2txt == [[0, 1], [2, 4], [3]] and es.skipped == {"missing_file": 1}
    pixels = torch.cat(list(es.image_batches(2, eval_transform(VisionConfig(image_size=4, mean=(0, 0, 0),
                                                                               std=(1, 1, 1))))))
    torch.testing.assert_close(pixels[:, :, 0, 0], torch.tensor([colour(i) for i in range(3)]) / 255, atol=1e-3,
                               rtol=0)
