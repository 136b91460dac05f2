"""`dlip-ds inspect`: report through the real pipeline, JSON keys, skipped reasons, the PNG grid."""

import io
import json

import webdataset as wds
from PIL import Image

from dlip_ds.cli import main
from dlip_ds.data.synth import synth
from dlip_ds.data.text import clean_caption


def test_inspect_json_and_grid(tmp_path, capsys):
    out = tmp_path / "set"
    synth(out, train=12, test=2, seed=1, image_size=16, shard_size=5)
    shards = sorted(str(p) for p in (out / "train").glob("*.tar"))
    broken = str(tmp_path / "broken.tar")
    with wds.TarWriter(broken) as w:
        w.write({"__key__": "b0", "png": b"\x89PNG broken", "txt": "a red circle"})
        w.write({"__key__": "b1", "txt": "no image"})
    expected = [json.loads(s["json"])["captions"] for s in wds.WebDataset(shards, shardshuffle=False)]

    grid = tmp_path / "grid.png"
    assert main(["inspect", *shards, broken, "--json", "--image-size", "16", "--batch-size", "5", "--show", "6",
                 "--grid", str(grid)]) == 0  # the tokenizer is found beside the shards
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 12 and report["captions"] == sum(len(c) for c in expected)
    assert report["skipped"] == {"bad_image": 1, "missing_image": 1}
    words = [len(clean_caption(c[0]).split()) for c in expected]  # evaluation order keeps the first caption
    assert report["caption_words"]["min"] == min(words) and report["caption_words"]["max"] == max(words)
    assert report["samples_per_s"] > 0
    img = Image.open(grid)
    assert img.size[0] == 4 * 160 and img.size[1] == 2 * (160 + 52)

    assert main(["inspect", str(out / "test"), "--image-size", "16"]) == 0
    text = capsys.readouterr().out
    assert "samples: 2 images, 6 captions" in text and "skipped: none" in text


def test_inspect_needs_a_tokenizer(tmp_path, capsys):
    shard = str(tmp_path / "s.tar")
    with wds.TarWriter(shard) as w:
        buf = io.BytesIO()
        Image.new("RGB", (4, 4)).save(buf, format="PNG")
        w.write({"__key__": "a", "png": buf.getvalue(), "txt": "x"})
    assert main(["inspect", shard]) == 2
    assert "data.tokenizer is empty" in capsys.readouterr().err
