"""`dlip-ds prepare`: image-text data in common layouts -> webdataset shards + manifest.

SOURCE is a Karpathy/BLIP annotation JSON (`[{"image", "caption" or [...], "image_id"}]`, images
under --images), a CSV/TSV table (path and caption columns), a folder of images with sidecar .txt
captions, or existing shards (a directory, a .tar, a brace pattern; e.g. img2dataset output).

Every usable image becomes one sample `<key>.jpg|png|webp` + `<key>.txt` (first caption) +
`<key>.json` ({"captions", "image_id", "source"}); captions of one image are grouped. Unusable
inputs are skipped and listed in rejects.jsonl with a reason; input that cannot be read at all (a
missing annotation file, a wrong column name) is an error before any work starts.

BLIP's VQA files (vqa_train.json, vqa_val.json, vg_qa.json, vqa_test.json: entries with "question")
are grouped by image instead: `<key>.json` holds {"qa": [...], "image_id", "source"} (see `qa.py`)
and there is no .txt. Answer and question types come from VQAv2's official annotations when given
(--vqa-annotations), else are inferred (`qa.answer_type_of`, `qa.question_type_of`); the image id
is the official one, else the image's relative path.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from dlip_ds.config import ConfigError
from dlip_ds.data.evalset import read_annotations
from dlip_ds.data.qa import group_vqa, is_vqa_annotation, load_json, official_types
from dlip_ds.data.sample import (
    IMAGE_EXTS,
    BadSample,
    decode_image,
    decode_text,
    parse_captions,
    sample_fields,
)
from dlip_ds.data.shards import (
    MANIFEST,
    ShardSink,
    expand_shards,
    is_remote,
)

log = logging.getLogger(__name__)

_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass
class Options:
    max_side: int = 0  # 0: keep the size
    quality: int = 95
    max_pixels: int | None = None  # None: PIL.Image.MAX_IMAGE_PIXELS


@dataclass
class Item:
    """One image to write: where its bytes are (a path, or the bytes themselves for shard input)."""

    source: str
    captions: list  # str or bytes (decoded in the worker, so a bad byte rejects only this item)
    image_id: object = None
    path: str | None = None
    data: bytes | None = None
    qa: list | None = None  # a VQA sample's questions (then there are no captions)


# --------------------------------------------------------------------------- inputs


def detect_kind(source: str) -> str:
    if is_remote(source) or "{" in source or source.endswith(".tar"):
        return "shards"
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"prepare: source not found: {source}")
    if path.is_dir():
        if any(path.glob("*.tar")):
            return "shards"
        return "folder"
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix in (".csv", ".tsv"):
        return "table"
    raise ConfigError(f"prepare: cannot tell what {source} is; expected .json, .csv, .tsv, a folder or shards")


def _group(entries: Iterator[tuple[str, str, list, object]]) -> list[Item]:
    """(source, path, captions, image_id) rows -> one Item per path with all its captions."""
    items: dict[str, Item] = {}
    for source, path, captions, image_id in entries:
        if path in items:
            items[path].captions.extend(captions)
        else:
            items[path] = Item(source=source, path=path, captions=list(captions), image_id=image_id)
    return list(items.values())


def json_items(path: Path, image_root: Path) -> list[Item]:
    def rows():
        for e in read_annotations(path):
            cap = e.get("caption", e.get("captions"))
            yield e["image"], str(image_root / e["image"]), cap if isinstance(cap, list) else [cap], \
                e.get("image_id", e["image"])
    return _group(rows())


def vqa_items(entries: list, image_root: Path, annotations: list[str]) -> tuple[list[Item], list[dict]]:
    """BLIP VQA entries -> (one Item per image with its questions, rejected entries)."""
    official: dict = {}
    for a in annotations:
        official.update(official_types(Path(a)))
    groups, rejects = group_vqa(entries, official)
    items = [Item(source=rel, captions=[], image_id=g["image_id"], path=str(image_root / rel), qa=g["qa"])
             for rel, g in groups.items()]
    return items, rejects


def table_items(path: Path, image_root: Path, path_column: str, caption_column: str) -> list[Item]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    # surrogateescape: a row with bad bytes is rejected alone (in the worker), not the whole file
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        columns = reader.fieldnames or []
        for flag, col in (("--path-column", path_column), ("--caption-column", caption_column)):
            if col not in columns:
                raise ConfigError(f"{path}: no column '{col}' ({flag}); columns are {columns}")
        rows = [(r[path_column] or "", r[caption_column] or "") for r in reader]

    def entries():
        for rel, cap in rows:
            raw = cap.encode("utf-8", errors="surrogateescape")
            yield rel, str(image_root / rel), [raw], rel
    return _group(entries())


def folder_items(root: Path) -> list[Item]:
    items = []
    for p in sorted(root.rglob("*")):
        if p.suffix.lower().lstrip(".") in IMAGE_EXTS:
            txt = p.with_suffix(".txt")
            captions = [txt.read_bytes()] if txt.is_file() else []
            rel = p.relative_to(root).as_posix()
            items.append(Item(source=rel, path=str(p), captions=captions, image_id=rel))
    if not items:
        raise ConfigError(f"prepare: folder {root} holds no images ({', '.join(IMAGE_EXTS)})")
    return items


def shard_items(spec: str, rejects: list) -> Iterator[Item]:
    import webdataset as wds

    def on_error(exn: Exception) -> bool:
        # webdataset appends the shard's url to the exception's args
        url = exn.args[-1] if exn.args and isinstance(exn.args[-1], str) else spec
        rejects.append({"source": url, "reason": "shard_error", "detail": str(exn.args[0] if exn.args else exn)[:300]})
        return True

    for s in wds.DataPipeline(wds.SimpleShardList(expand_shards(spec)), wds.tarfile_to_samples(handler=on_error)):
        where = f"{s['__url__']}:{s['__key__']}"
        try:
            ext, captions, meta = sample_fields(s)
        except BadSample as e:
            rejects.append({"source": where, "reason": e.reason, "detail": str(e)})
            continue
        yield Item(source=where, captions=captions, image_id=meta.get("image_id", s["__key__"]), data=s[ext])


# --------------------------------------------------------------------------- per-image work (worker processes)


def _clean(captions: list) -> tuple[list[str], list[BadSample]]:
    """-> (non-blank captions with whitespace collapsed, captions dropped for bad bytes). A caption
    with bad bytes is dropped alone; the image goes when no caption is left."""
    if not captions:
        raise BadSample("missing_caption")
    out, dropped = [], []
    for c in captions:
        try:
            out.extend(" ".join(t.split()) for t in parse_captions(decode_text(c) if isinstance(c, bytes) else c))
        except BadSample as e:
            dropped.append(e)
    if not out:
        raise dropped[0] if dropped else BadSample("empty_caption")
    return out, dropped


def process(item: Item, opts: Options) -> dict:
    """Item -> {"sample": {...} or None, "rejects": [...]}; never raises for bad input."""
    try:
        captions, dropped = _clean(item.captions) if item.qa is None else ([], [])
        data = item.data
        if data is None:
            try:
                data = Path(item.path).read_bytes()
            except FileNotFoundError:
                raise BadSample("missing_file", item.path) from None
            except OSError as e:
                raise BadSample("unreadable_file", str(e)) from None
        img = decode_image(data, max_pixels=opts.max_pixels)
        ext, data = _encode(data, img, opts)
    except BadSample as e:
        return {"sample": None, "rejects": [{"source": item.source, "reason": e.reason, "detail": str(e)[:300]}]}
    if item.qa is not None:
        meta = {"qa": item.qa, "image_id": item.image_id, "source": item.source}
        sample = {ext: data, "json": json.dumps(meta, ensure_ascii=False)}
    else:
        meta = {"captions": captions, "image_id": item.image_id, "source": item.source}
        sample = {ext: data, "txt": captions[0], "json": json.dumps(meta, ensure_ascii=False)}
    rejects = [{"source": item.source, "reason": e.reason, "detail": f"caption dropped: {e}"[:300]} for e in dropped]
    return {"sample": sample, "rejects": rejects}


def _encode(data: bytes, img: Image.Image, opts: Options) -> tuple[str, bytes]:
    """Keep the original bytes when they decode to this very image (RGB, upright, small enough);
    else resize so the long side is at most max_side and write a JPEG."""
    with Image.open(io.BytesIO(data)) as orig:
        fmt, mode, orientation = orig.format, orig.mode, orig.getexif().get(0x0112, 1)
    if opts.max_side and max(img.size) > opts.max_side:
        scale = opts.max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.BICUBIC)
    elif fmt in _FORMATS and mode == "RGB" and orientation == 1:
        return _FORMATS[fmt], data
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=opts.quality)
    return "jpg", buf.getvalue()


def _process_star(args: tuple[Item, Options]) -> dict:
    return process(*args)


# --------------------------------------------------------------------------- driver


def prepare(source: str, out: str | Path, *, images: str | None = None, shard_size: int = 1000, max_side: int = 0,
            quality: int = 95, workers: int = 1, path_column: str = "filepath", caption_column: str = "caption",
            prefix: str = "shard", max_pixels: int | None = None, vqa_annotations: list[str] | None = None) -> dict:
    """Write shards of `source` to `out`; returns the manifest. `vqa_annotations`: VQAv2's official
    annotation files, for the types of a BLIP VQA source's questions."""
    from tqdm import tqdm

    if shard_size < 1 or not 1 <= quality <= 100 or max_side < 0 or workers < 1:
        raise ConfigError("prepare: need --shard-size >= 1, 1 <= --quality <= 100, --max-side >= 0, --workers >= 1")
    kind = detect_kind(source)
    root = Path(images) if images else Path(source).parent
    if images and not root.is_dir():
        raise ConfigError(f"prepare: --images {images} is not a directory")
    rejects: list[dict] = []
    entries = load_json(Path(source)) if kind == "json" else None
    if is_vqa_annotation(entries):
        kind = "vqa"
        items, rejects = vqa_items(entries, root, vqa_annotations or [])
    elif vqa_annotations:
        raise ConfigError(f"prepare: --vqa-annotations is for BLIP's VQA files; {source} holds no questions")
    elif kind == "json":
        items = json_items(Path(source), root)
    elif kind == "table":
        items = table_items(Path(source), root, path_column, caption_column)
    elif kind == "folder":
        items = folder_items(Path(source))
    else:
        items = shard_items(source, rejects)  # a stream: its length is unknown
    total = len(items) if isinstance(items, list) else None
    opts = Options(max_side=max_side, quality=quality, max_pixels=max_pixels)
    out = Path(out)
    info = {"source": str(source), "kind": kind,
            "options": {"shard_size": shard_size, "max_side": max_side, "quality": quality, "images": images}}

    bar = tqdm(total=total, desc="prepare", unit="img", mininterval=2.0)
    index = 0
    with ShardSink(out, prefix=prefix, shard_size=shard_size, info=info) as sink:
        pool = None
        if workers > 1:
            import multiprocessing as mp

            pool = mp.get_context("fork" if sys.platform == "linux" else "spawn").Pool(workers)
        try:
            it = iter(items)
            # Bounded blocks: shard input streams from a generator, so never queue all of it at once.
            while block := list(itertools.islice(it, max(64, 64 * workers))):
                args = [(item, opts) for item in block]
                results = pool.imap(_process_star, args, chunksize=8) if pool else map(_process_star, args)
                for r in results:
                    rejects.extend(r["rejects"])
                    if r["sample"] is not None:
                        sink.write({"__key__": f"{index:09d}", **r["sample"]})
                        index += 1
                    bar.update(1)
                    bar.set_postfix(written=index, rejected=len(rejects), refresh=False)
        finally:
            if pool is not None:
                pool.close()
                pool.join()
            bar.close()
        by_reason = Counter(r["reason"] for r in rejects)
        sink.info.update({"rejected": len(rejects), "rejected_by_reason": dict(by_reason)})
    _write_rejects(out / "rejects.jsonl", rejects)
    manifest = json.loads((out / MANIFEST).read_text())
    log.info("prepare: %d samples in %d shards, %d rejected %s -> %s", manifest["samples"],
             len(manifest["shards"]), len(rejects), dict(by_reason), out)
    return manifest


def _write_rejects(path: Path, rejects: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects)
    os.replace(tmp, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE", help="annotation .json (captions, or BLIP's VQA questions), .csv/.tsv table, image folder, or shards")
    p.add_argument("--out", required=True, help="output directory for shards, manifest.json, rejects.jsonl")
    p.add_argument("--images", metavar="ROOT", help="image root for .json/.csv paths (default: the file's folder)")
    p.add_argument("--shard-size", type=int, default=1000, metavar="N", help="samples per shard (default 1000)")
    p.add_argument("--max-side", type=int, default=0, metavar="S", help="resize so the long side is at most S")
    p.add_argument("--quality", type=int, default=95, metavar="Q", help="JPEG quality when re-encoding (default 95)")
    p.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)), metavar="W")
    p.add_argument("--path-column", default="filepath", metavar="C", help="image path column (default filepath)")
    p.add_argument("--caption-column", default="caption", metavar="C", help="caption column (default caption)")
    p.add_argument("--prefix", default="shard", help="shard names: PREFIX-000000.tar (default shard)")
    p.add_argument("--vqa-annotations", action="append", metavar="FILE",
                   help="VQAv2 mscoco_*_annotations.json with the answer/question types of a VQA source (repeatable)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="skip larger images (default PIL.Image.MAX_IMAGE_PIXELS, a decompression-bomb guard)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    prepare(args.source, args.out, images=args.images, shard_size=args.shard_size, max_side=args.max_side,
                quality=args.quality, workers=args.workers, path_column=args.path_column,
                caption_column=args.caption_column, prefix=args.prefix, max_pixels=args.max_pixels,
                vqa_annotations=args.vqa_annotations)
    return 0

