"""`dlip-ds synth`: layout, determinism, held-out combinations, a tokenizer that covers the captions."""

import hashlib
import io
import json
import re

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from dlip_ds.cli import main
from dlip_ds.data.synth import make_sample
from dlip_ds.data.synth_words import COLOURS, HELD_OUT, SHAPES
from dlip_ds.data.text import load_tokenizer

PAIR = re.compile(rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})(e?s)?\b")


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    assert main(["synth", "--out", str(out), "--train", "120", "--test", "40", "--seed", "3", "--image-size", "32",
                 "--shard-size", "50", "--workers", "2"]) == 0
    return out


def _read(split_dir):
    return list(wds.WebDataset(sorted(str(p) for p in split_dir.glob("*.tar")), shardshuffle=False))


def test_layout_and_manifest(synth_dir):
    for split, n, shards in (("train", 120, [50, 50, 20]), ("test", 40, [40])):
        m = json.loads((synth_dir / split / "manifest.json").read_text())
        assert m["samples"] == n and [s["samples"] for s in m["shards"]] == shards
        samples = _read(synth_dir / split)
        assert len(samples) == n
        assert sorted(p.name for p in (synth_dir / split).glob("*.tar")) == [s["name"] for s in m["shards"]]
        for s in samples[:5]:
            meta = json.loads(s["json"])
            assert len(meta["captions"]) == 3 and len(set(meta["captions"])) == 3
            assert s["txt"].decode() == meta["captions"][0]
            img = Image.open(io.BytesIO(s["png"]))
            assert img.size == (32, 32) and img.mode == "RGB"
    assert not list(synth_dir.rglob("*.tmp"))


def test_held_out_pairs_only_in_test(synth_dir):
    def pairs(split):
        out = []
        for s in _read(synth_dir / split):
            found = {(m.group(1), m.group(2)) for c in json.loads(s["json"])["captions"] for m in PAIR.finditer(c)}
            out.append(found)
        return out

    train, test = pairs("train"), pairs("test")
    assert all(p and not p & HELD_OUT for p in train)
    assert all(p & HELD_OUT for p in test)
    # every colour and every shape is still seen in training, only the combinations are new
    seen = set().union(*train)
    assert {c for c, _ in seen} == set(COLOURS) and {s for _, s in seen} == set(SHAPES)


def test_tokenizer_covers_captions(synth_dir):
    tok = load_tokenizer(synth_dir / "tokenizer")
    assert tok.pad_token_id == 0 and tok.bos_token == "[DEC]" and tok.enc_token_id == len(tok) - 1
    for s in _read(synth_dir / "test"):
        for c in json.loads(s["json"])["captions"]:
            assert tok.unk_token_id not in tok(c).input_ids, c


def test_deterministic_per_seed(synth_dir, tmp_path):
    # the fixture rendered with two processes (more than 32 samples each split), this in one: the same bytes
    main(["synth", "--out", str(tmp_path), "--train", "120", "--test", "40", "--seed", "3", "--image-size", "32",
          "--shard-size", "50", "--workers", "1"])

    def digest(d):
        return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(d.rglob("*.tar"))}

    assert digest(tmp_path) == digest(synth_dir)  # byte-identical shards
    a, b = make_sample(3, "train", 7, 32), make_sample(4, "train", 7, 32)
    assert a["captions"] != b["captions"] or a["png"] != b["png"]


def test_images_show_what_captions_say():
    """A one-object scene: the object's pixels have the named colour, in the named part of the image."""
    checked = 0
    for i in range(100):
        s = make_sample(0, "train", i, 64)
        m = next(filter(None, (re.fullmatch(r"a (small|large) (\w+) (\w+) (in|on|at) the (.*)", c) for c in s["captions"])),
                 None)
        if s["kind"] != "single" or not m or m.group(5).endswith("background"):
            continue
        colour, where = m.group(2), m.group(5).replace(" corner", "")
        arr = np.asarray(Image.open(io.BytesIO(s["png"])), dtype=np.int32)
        near = (np.abs(arr - np.array(COLOURS[colour])).sum(-1) < 60)
        ys, xs = np.nonzero(near)
        assert len(xs) > 10, s["captions"]
        cx, cy = xs.mean() / 64, ys.mean() / 64
        if "left" in where:
            assert cx < 0.4
        if "right" in where:
            assert cx > 0.6
        if "top" in where:
            assert cy < 0.4
        if "bottom" in where:
            assert cy > 0.6
        checked += 1
    assert checked >= 5
