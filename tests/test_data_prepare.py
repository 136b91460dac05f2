"""`dlip-ds prepare`: each input kind, each bad-input kind skipped and counted, conversions, atomic re-runs."""

import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from dlip_ds.cli import main
from dlip_ds.config import ConfigError
from dlip_ds.data.prepare import prepare
from dlip_ds.data.sample import decode_image


def encode(img, fmt="PNG", **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def read_out(out):
    samples = list(wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False))
    manifest = json.loads((out / "manifest.json").read_text())
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    return samples, manifest, rejects


def image_of(sample):
    ext = next(e for e in ("jpg", "png", "webp") if e in sample)
    return Image.open(io.BytesIO(sample[ext]))


# --------------------------------------------------------------------------- decoding and conversion


def test_decode_image_conversions():
    red = decode_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"))
    assert red.mode == "RGB" and np.abs(np.asarray(red, int) - [255, 0, 0]).max() < 40
    deep = decode_image(encode(Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16))))
    assert deep.mode == "RGB" and np.asarray(deep)[0, 0].tolist() == [155] * 3  # 40000 / 65535 * 255, not clipped
    pal = Image.new("P", (4, 4))
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    pal.paste(1, (0, 0, 2, 4))
    rgb = np.asarray(decode_image(encode(pal, transparency=0)))
    assert rgb[0, 0].tolist() == [200, 10, 10] and rgb[0, 3].tolist() == [255, 255, 255]  # transparent -> white
    rgba = np.asarray(decode_image(encode(Image.new("RGBA", (4, 4), (10, 200, 10, 0)))))
    assert rgba[0, 0].tolist() == [255, 255, 255]
    exif = Image.new("RGB", (12, 6)).getexif()
    exif[0x0112] = 6
    assert decode_image(encode(Image.new("RGB", (12, 6)), "JPEG", exif=exif.tobytes())).size == (6, 12)


# --------------------------------------------------------------------------- inputs


@pytest.fixture
def annotated(tmp_path):
    """An image root with good and bad images and a BLIP/Karpathy annotation JSON over it."""
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (30, 20), (200, 0, 0)).save(root / "a.jpg", quality=90)
    Image.new("RGB", (10, 10), (0, 0, 200)).save(root / "b.png")
    Image.new("CMYK", (10, 10), (0, 255, 255, 0)).save(root / "cmyk.jpg")
    exif = Image.new("RGB", (12, 6)).getexif()
    exif[0x0112] = 6
    Image.new("RGB", (12, 6), (5, 5, 5)).save(root / "rot.jpg", exif=exif.tobytes())
    Image.new("RGB", (40, 40)).save(root / "giant.png")
    (root / "zero.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("not an image")
    (root / "trunc.jpg").write_bytes(encode(Image.new("RGB", (64, 64), (9, 9, 9)), "JPEG")[:150])
    long_caption = " ".join(["word"] * 3000)
    ann = [
        {"image": "a.jpg", "caption": "A red thing.", "image_id": 1},
        {"image": "b.png", "caption": ["blue one", "a blue square"], "image_id": 2},
        {"image": "a.jpg", "caption": "the same red thing", "image_id": 1},  # grouped with the first
        {"image": "cmyk.jpg", "caption": "cmyk", "image_id": 3},
        {"image": "rot.jpg", "caption": "rotated", "image_id": 4},
        {"image": "b.png", "caption": long_caption, "image_id": 2},
        {"image": "missing.jpg", "caption": "missing", "image_id": 5},
        {"image": "zero.jpg", "caption": "zero", "image_id": 6},
        {"image": "text.jpg", "caption": "text", "image_id": 7},
        {"image": "trunc.jpg", "caption": "truncated", "image_id": 8},
        {"image": "giant.png", "caption": "giant", "image_id": 9},
        {"image": "rot.jpg", "caption": "", "image_id": 4},  # an empty caption adds nothing
        {"image": "empty.jpg", "caption": "   \n", "image_id": 10},
    ]
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    return tmp_path


@pytest.mark.parametrize("workers", [1, 2])
def test_annotation_json(annotated, workers):
    out = annotated / f"out{workers}"
    prepare(str(annotated / "ann.json"), out, images=str(annotated / "images"), shard_size=2, workers=workers,
            max_pixels=1000)
    samples, manifest, rejects = read_out(out)
    metas = [json.loads(s["json"]) for s in samples]
    assert [m["image_id"] for m in metas] == [1, 2, 3, 4]
    assert metas[0]["captions"] == ["A red thing.", "the same red thing"]
    assert metas[1]["captions"][:2] == ["blue one", "a blue square"]
    assert len(metas[1]["captions"][2].split()) == 3000  # kept whole; truncation happens at tokenization
    assert [s["txt"].decode() for s in samples] == [m["captions"][0] for m in metas]
    assert manifest["samples"] == 4 and [s["samples"] for s in manifest["shards"]] == [2, 2]
    assert {r["source"]: r["reason"] for r in rejects} == {
        "missing.jpg": "missing_file", "zero.jpg": "empty_image", "text.jpg": "bad_image",
        "trunc.jpg": "bad_image", "giant.png": "image_too_large", "empty.jpg": "empty_caption"}
    assert manifest["rejected"] == 6 and manifest["rejected_by_reason"]["bad_image"] == 2
    # an RGB PNG is kept byte for byte; CMYK and EXIF-rotated images are re-encoded as upright RGB JPEGs
    assert samples[1]["png"] == (annotated / "images" / "b.png").read_bytes()
    assert image_of(samples[2]).mode == "RGB" and "jpg" in samples[2]
    assert image_of(samples[3]).size == (6, 12)
    assert not list(out.glob(".*"))  # no temporary file left


def test_workers_do_not_change_the_output(annotated):
    outs = []
    for w in (1, 2):
        prepare(str(annotated / "ann.json"), annotated / f"w{w}", images=str(annotated / "images"), workers=w)
        outs.append([{k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")}
                     for s in read_out(annotated / f"w{w}")[0]])
    assert outs[0] == outs[1]


@pytest.mark.parametrize("sep", [",", "\t"])
def test_table(tmp_path, sep):
    root = tmp_path / "img"
    root.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(root / f"{i}.png")
    lines = [f"file{sep}text", f"0.png{sep}zero", f"1.png{sep}one", f"2.png{sep}", f"0.png{sep}nought"]
    data = ("\n".join(lines) + "\n").encode() + f"1.png{sep}bad \xff byte\n".encode("latin-1")
    table = tmp_path / ("t.tsv" if sep == "\t" else "t.csv")
    table.write_bytes(data)
    out = tmp_path / "out"
    assert main(["prepare", str(table), "--out", str(out), "--images", str(root), "--path-column", "file",
                 "--caption-column", "text", "--workers", "1"]) == 0
    samples, _, rejects = read_out(out)
    assert [json.loads(s["json"])["captions"] for s in samples] == [["zero", "nought"], ["one"]]
    assert sorted(r["reason"] for r in rejects) == ["caption_not_utf8", "empty_caption"]


def test_errors_before_any_work(tmp_path, capsys):
    table = tmp_path / "t.csv"
    table.write_text("path,caption\nx.png,hello\n")
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"no column 'filepath' \(--path-column\); columns are \['path', 'caption'\]"):
        prepare(str(table), out)
    with pytest.raises(ConfigError, match="not found"):
        prepare(str(tmp_path / "nope.json"), out)
    (tmp_path / "bad.json").write_text(json.dumps([{"img": "x.png", "caption": "c"}]))
    with pytest.raises(ConfigError, match="entry 0 needs 'image'"):
        prepare(str(tmp_path / "bad.json"), out)
    assert not out.exists()
    assert main(["prepare", str(table), "--out", str(out)]) == 2
    assert "no column 'filepath'" in capsys.readouterr().err


def test_folder_with_sidecars(tmp_path):
    src = tmp_path / "src" / "sub"
    src.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8)).save(src / f"{i}.jpg")
    (src / "0.txt").write_text("zero")
    (src / "1.txt").write_bytes(b"one \xff")
    (src / "notes.md").write_text("ignored")
    prepare(str(tmp_path / "src"), tmp_path / "out")
    samples, _, rejects = read_out(tmp_path / "out")
    assert [json.loads(s["json"])["image_id"] for s in samples] == ["sub/0.jpg"]
    assert {r["source"]: r["reason"] for r in rejects} == {"sub/1.jpg": "caption_not_utf8",
                                                          "sub/2.jpg": "missing_caption"}


def test_karpathy_files(tmp_path):
    """BLIP's coco_karpathy_train.json (one entry per caption, string image ids) and
    coco_karpathy_test.json (a caption list per image, no image id)."""
    images = tmp_path / "coco" / "val2014"
    images.mkdir(parents=True)
    for n in (391895, 522418):
        Image.new("RGB", (8, 8), (n % 255, 0, 0)).save(images / f"COCO_val2014_{n:012d}.jpg")
    rel = [f"val2014/COCO_val2014_{n:012d}.jpg" for n in (391895, 522418)]
    train = [{"caption": "A man riding a bike.", "image": rel[0], "image_id": "coco_391895"},
             {"caption": "A woman with a cake.", "image": rel[1], "image_id": "coco_522418"},
             {"caption": "Someone on a bicycle", "image": rel[0], "image_id": "coco_391895"}]
    test = [{"image": rel[0], "caption": ["a man on a bike", "a cyclist"]}, {"image": rel[1], "caption": ["cake"]}]
    for name, entries in (("train", train), ("test", test)):
        (tmp_path / f"coco_karpathy_{name}.json").write_text(json.dumps(entries))
        prepare(str(tmp_path / f"coco_karpathy_{name}.json"), tmp_path / name, images=str(tmp_path / "coco"))
    metas = {name: [json.loads(s["json"]) for s in read_out(tmp_path / name)[0]] for name in ("train", "test")}
    assert [(m["image_id"], m["captions"]) for m in metas["train"]] == [
        ("coco_391895", ["A man riding a bike.", "Someone on a bicycle"]), ("coco_522418", ["A woman with a cake."])]
    assert [(m["image_id"], m["captions"]) for m in metas["test"]] == [
        (rel[0], ["a man on a bike", "a cyclist"]), (rel[1], ["cake"])]


def test_reshard_existing_shards_and_rerun(annotated):
    first = annotated / "first"
    prepare(str(annotated / "ann.json"), first, images=str(annotated / "images"), shard_size=1, max_pixels=1000)
    # an img2dataset-like shard with a bad sample, and a truncated copy of a good shard
    with wds.TarWriter(str(first / "extra.tar")) as w:
        w.write({"__key__": "e0", "jpg": encode(Image.new("RGB", (50, 20)), "JPEG"), "txt": "wide"})
        w.write({"__key__": "e1", "jpg": b"junk", "txt": "junk"})
    (first / "cut.tar").write_bytes((first / "shard-000000.tar").read_bytes()[:700])
    out = annotated / "second"
    prepare(str(first), out, shard_size=10, max_side=16)  # the manifest lists only the four shards
    samples, manifest, rejects = read_out(out)
    assert manifest["samples"] == 4 and len(manifest["shards"]) == 1 and not rejects
    assert max(image_of(samples[0]).size) == 16 and image_of(samples[0]).size == (16, 11)  # 30x20, aspect kept
    spec = f"{first}/{{shard-000000,shard-000001,extra,cut}}.tar"
    prepare(spec, out, shard_size=10, max_side=16)
    samples, manifest, rejects = read_out(out)
    assert manifest["samples"] == 3 and image_of(samples[2]).size == (16, 6)
    assert {r["reason"]: r["source"] for r in rejects} == {"shard_error": str(first / "cut.tar"),
                                                           "bad_image": f"{first}/extra.tar:e1"}
    # re-running with smaller shards replaces the set; shards of the earlier run do not linger
    prepare(str(annotated / "ann.json"), out, images=str(annotated / "images"), shard_size=3)
    prepare(str(annotated / "ann.json"), out, images=str(annotated / "images"), shard_size=100)
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar"]
