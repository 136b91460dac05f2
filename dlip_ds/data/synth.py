"""`dlip-ds synth`: a synthetic image-text set rendered locally, the embedded default.

Scenes of coloured shapes on varied backgrounds: one object (size, colour, shape, position), a
group (count), or two objects in a spatial relation. Every image gets several captions from
different templates (relations are also described from the other object's side). Some
(colour, shape) pairs never occur in training; every test scene contains at least one of them, so
the test set measures composition, not memory. Every image also gets about three VQAv2-style
questions with ten annotator answers each (`synth_qa`), in both splits, so one set serves
pretraining, retrieval, captioning and VQA. Sample i of a split depends only on (seed, split, i).

Layout: DIR/train/*.tar, DIR/test/*.tar (each with manifest.json; a sample's json holds "captions"
and "qa"), DIR/answer_list.json (every canonical answer, BLIP's format) and DIR/tokenizer/, a
WordPiece vocabulary trained on the training captions, questions and answers that `load_tokenizer`
reads with no download.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import logging
import math
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dlip_ds.data.shards import ShardSink, write_json_atomic
from dlip_ds.data.synth_qa import canonical_answers, scene_questions
from dlip_ds.data.synth_words import (
    COLOURS,
    HELD_OUT,
    NUMBERS,
    POSITIONS,
    an,
    pair_pool,
    plural,
)

SIZES = {"small": (0.07, 0.10), "large": (0.15, 0.20)}  # radius as a fraction of the image side
# Muted background tones (objects are saturated, or white/black, so they stay visible).
BACKGROUNDS = {"gray": (150, 150, 150), "beige": (215, 200, 165), "teal": (95, 150, 150),
               "pink": (220, 170, 180), "olive": (140, 140, 90), "slate": (100, 110, 130)}
TEXTURES = ("plain", "striped", "checkered", "noisy", "gradient")
ANSWER_LIST = "answer_list.json"
SUPERSAMPLE = 4  # draw large, then downsample: antialiased edges


@dataclass
class Obj:
    colour: str
    shape: str
    size: str
    x: float  # centre, fraction of the side
    y: float
    radius: float  # fraction of the side
    angle: float  # degrees


# --------------------------------------------------------------------------- scenes


def _new_obj(rng: random.Random, pair, size: str, x: float, y: float) -> Obj:
    lo, hi = SIZES[size]
    return Obj(pair[0], pair[1], size, x, y, rng.uniform(lo, hi), rng.uniform(-25, 25))


_AT = {"top": "at the top", "bottom": "at the bottom", "left": "on the left", "right": "on the right",
       "center": "in the center"}


def _scene_single(rng, pairs, bg):
    pair = rng.choice(pairs)
    size = rng.choice(list(SIZES))
    where = rng.choice(list(POSITIONS))
    cx, cy = POSITIONS[where]
    obj = _new_obj(rng, pair, size, cx + rng.uniform(-0.05, 0.05), cy + rng.uniform(-0.05, 0.05))
    c, s = pair
    at = _AT.get(where, f"in the {where} corner")
    templates = [
        f"a {size} {c} {s} {at}",
        f"{at} there is a {size} {c} {s}",
        f"{an(c)} {s} {at} of the picture",
        f"a {size} {c} {s} on {an(bg)} background",
        f"one {c} {s}, {size}, {at}",
    ]
    return [obj], templates


def _scene_count(rng, pairs, bg):
    pair = rng.choice(pairs)
    n = rng.choice(list(NUMBERS))
    size = "small" if n > 2 else rng.choice(list(SIZES))
    objs: list[Obj] = []
    while len(objs) < n:  # rejection sampling of non-overlapping centres; always succeeds quickly
        cand = _new_obj(rng, pair, size, rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8))
        if all(math.dist((cand.x, cand.y), (o.x, o.y)) > cand.radius + o.radius + 0.03 for o in objs):
            objs.append(cand)
    c, s, word = pair[0], plural(pair[1]), NUMBERS[n]
    templates = [
        f"{word} {size} {c} {s}",
        f"a group of {word} {c} {s}",
        f"there are {word} {c} {s} on {an(bg)} background",
        f"{word} {c} {s} scattered over the picture",
        f"exactly {word} {size} {c} {s}",
    ]
    return objs, templates


_RELATIONS = {"left of": ("to the left of", "to the right of"), "above": ("above", "below")}


def _scene_relation(rng, pairs, bg, need_held_out: bool):
    first = rng.choice(pairs)
    pool = [p for p in pair_pool(False) + sorted(HELD_OUT) if p != first] if need_held_out else \
        [p for p in pairs if p != first]
    second = rng.choice(pool)
    if rng.random() < 0.5:
        first, second = second, first
    relation = rng.choice(list(_RELATIONS))
    size_a, size_b = rng.choice(list(SIZES)), rng.choice(list(SIZES))
    # Along the relation's axis the objects sit in opposite halves; across it they stay close,
    # so "left of" never also reads as "above".
    lead, cross = rng.uniform(0.2, 0.3), rng.uniform(0.3, 0.7)
    trail, cross_b = rng.uniform(0.7, 0.8), cross + rng.uniform(-0.1, 0.1)
    if relation == "left of":
        a = _new_obj(rng, first, size_a, lead, cross)
        b = _new_obj(rng, second, size_b, trail, cross_b)
    else:
        a = _new_obj(rng, first, size_a, cross, lead)
        b = _new_obj(rng, second, size_b, cross_b, trail)
    fwd, back = _RELATIONS[relation]
    (ca, sa), (cb, sb) = first, second
    ref = sa if sa != sb else f"{ca} one"  # the pairs differ in shape or colour
    where = "on the left" if relation == "left of" else "at the top"
    templates = [
        f"{an(ca)} {sa} {fwd} {an(cb)} {sb}",
        f"{an(cb)} {sb} {back} {an(ca)} {sa}",
        f"a {size_a} {ca} {sa} {fwd} a {size_b} {cb} {sb}",
        f"{an(cb)} {sb} and {an(ca)} {sa}, the {ref} {where}",
        f"two shapes on {an(bg)} background: {an(ca)} {sa} {fwd} {an(cb)} {sb}",
    ]
    return [a, b], templates


# --------------------------------------------------------------------------- rendering


def _background(rng: random.Random, size: int, bg: str, texture: str) -> Image.Image:
    base = tuple(min(255, max(0, v + rng.randint(-12, 12))) for v in BACKGROUNDS[bg])
    img = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(img)
    shade = tuple(max(0, v - 35) for v in base)
    if texture == "striped":
        step, width = rng.randint(size // 10, size // 5), rng.randint(size // 40 + 1, size // 16 + 1)
        vertical = rng.random() < 0.5
        for p in range(0, size, step):
            box = (p, 0, p + width, size) if vertical else (0, p, size, p + width)
            draw.rectangle(box, fill=shade)
    elif texture == "checkered":
        step = rng.randint(size // 8, size // 4)
        for i in range(0, size, step):
            for j in range(0, size, step):
                if (i // step + j // step) % 2:
                    draw.rectangle((i, j, i + step - 1, j + step - 1), fill=shade)
    elif texture == "gradient":
        for y in range(size):
            t = y / size
            draw.line((0, y, size, y), fill=tuple(int(b * (1 - t) + s * t) for b, s in zip(base, shade)))
    elif texture == "noisy":
        # numpy noise from our rng (PIL's effect_noise has its own unseeded generator)
        noise = np.random.default_rng(rng.getrandbits(32)).normal(128, 40, (size, size)).clip(0, 255)
        mask = Image.fromarray(noise.astype(np.uint8), "L")
        img = Image.blend(img, Image.composite(img, Image.new("RGB", img.size, shade), mask), 0.5)
    return img


def _polygon(obj: Obj, scale: float) -> list[tuple[float, float]]:
    r = obj.radius * scale
    if obj.shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        r *= 0.85  # similar area to the circle
    elif obj.shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        r *= 1.15
    elif obj.shape == "diamond":
        pts = [(0, -1), (0.7, 0), (0, 1), (-0.7, 0)]
        r *= 1.15
    elif obj.shape == "star":
        pts = [((1.0 if k % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + k * math.pi / 5),
                (1.0 if k % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
        r *= 1.15
    elif obj.shape == "cross":
        w = 0.35
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w),
               (-w, -w)]
    else:
        raise ValueError(obj.shape)
    a = math.radians(obj.angle)
    cx, cy = obj.x * scale, obj.y * scale
    return [(cx + r * (px * math.cos(a) - py * math.sin(a)), cy + r * (px * math.sin(a) + py * math.cos(a)))
            for px, py in pts]


def render(rng: random.Random, objs: list[Obj], bg: str, texture: str, image_size: int) -> Image.Image:
    big = image_size * SUPERSAMPLE
    img = _background(rng, big, bg, texture)
    draw = ImageDraw.Draw(img)
    for obj in objs:
        fill = tuple(min(255, max(0, v + rng.randint(-15, 15))) for v in COLOURS[obj.colour])
        if obj.shape == "circle":
            r, cx, cy = obj.radius * big, obj.x * big, obj.y * big
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_polygon(obj, big), fill=fill)
    return img.resize((image_size, image_size), Image.Resampling.LANCZOS)


def make_sample(seed: int, split: str, index: int, image_size: int, n_captions: int = 3) -> dict:
    """Sample `index` of `split`: a PNG, its captions and its questions (`qa`, ids index * 10 + k);
    depends only on its arguments."""
    rng = random.Random(f"dlip-synth/{seed}/{split}/{index}")  # str seeds hash stably across runs
    test = split == "test"
    pairs = pair_pool(held_out=test)
    bg, texture = rng.choice(list(BACKGROUNDS)), rng.choice(TEXTURES)
    kind = rng.choices(("single", "count", "relation"), weights=(0.3, 0.3, 0.4))[0]
    if kind == "single":
        objs, templates = _scene_single(rng, pairs, bg)
    elif kind == "count":
        objs, templates = _scene_count(rng, pairs, bg)
    else:
        # Training pairs both come from the training pool; a test scene needs one held-out pair.
        objs, templates = _scene_relation(rng, pairs, bg, need_held_out=test)
    captions = rng.sample(templates, n_captions)
    buf = io.BytesIO()
    render(rng, objs, bg, texture, image_size).save(buf, format="PNG")
    # The questions draw from their own stream, so adding them left the images and captions as they were.
    qa_rng = random.Random(f"dlip-synth-qa/{seed}/{split}/{index}")
    qa = scene_questions(qa_rng, kind, objs, test=test, first_id=index * 10)
    return {"png": buf.getvalue(), "captions": captions, "kind": kind, "qa": qa}


# --------------------------------------------------------------------------- writing


def _rendered(seed: int, split: str, n: int, image_size: int, workers: int):
    """make_sample(seed, split, i) for i in range(n), in order; rendered by `workers` processes
    (each sample depends only on its arguments, so the shards are the same bytes for any count)."""
    make = functools.partial(make_sample, seed, split, image_size=image_size)
    if workers <= 1 or n < 32:
        yield from map(make, range(n))
        return
    import multiprocessing

    with multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork").Pool(workers) as pool:
        yield from pool.imap(make, range(n), chunksize=max(1, min(64, n // (4 * workers))))


def write_split(out: Path, split: str, n: int, *, seed: int, image_size: int, shard_size: int,
                workers: int = 1) -> list[str]:
    """Write the split's shards; returns its texts (captions, questions, answers) for the tokenizer."""
    from tqdm import tqdm

    texts: list[str] = []
    info = {"source": "synth", "options": {"split": split, "seed": seed, "image_size": image_size}}
    with ShardSink(out / split, prefix=split, shard_size=shard_size, info=info, mtime=0) as sink:
        samples = _rendered(seed, split, n, image_size, workers)
        for i, s in enumerate(tqdm(samples, total=n, desc=f"synth {split}", unit="img", mininterval=2.0)):
            meta = {"captions": s["captions"], "image_id": i, "kind": s["kind"], "qa": s["qa"]}
            sink.write({"__key__": f"{i:08d}", "png": s["png"], "txt": s["captions"][0], "json": json.dumps(meta)})
            texts.extend(s["captions"])
            for q in s["qa"]:
                texts.append(q["question"])
                texts.extend(dict.fromkeys(q["answers"]))
    return texts


def train_tokenizer(texts: list[str], out: Path, vocab_size: int = 1000) -> None:
    """A lowercase WordPiece vocabulary with BERT's special tokens ([PAD] = 0), saved as a
    `BertTokenizerFast` directory."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, show_progress=False,
                           special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    out.mkdir(parents=True, exist_ok=True)
    wp.save_model(str(out))  # vocab.txt, for tools that read BERT's plain vocabulary
    BertTokenizerFast(vocab=wp.get_vocab(), do_lower_case=True).save_pretrained(str(out))


def synth(out: str | Path, *, train: int = 10000, test: int = 1000, seed: int = 0, image_size: int = 64,
          shard_size: int = 1000, workers: int | None = None) -> dict:
    """Render the set under `out` (with `workers` processes, default one per CPU); returns
    {"train": n, "test": m, "vocab": size}."""
    out = Path(out)
    workers = workers or os.cpu_count() or 1
    split = functools.partial(write_split, out, seed=seed, image_size=image_size, shard_size=shard_size, workers=workers)
    texts = split("train", train)
    split("test", test)
    answers = canonical_answers()
    write_json_atomic(out / ANSWER_LIST, answers)
    train_tokenizer(texts + answers, out / "tokenizer")
    from dlip_ds.data.text import load_tokenizer

    return {"train": train, "test": test, "vocab": len(load_tokenizer(out / "tokenizer"))}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory (train/, test/, tokenizer/)")
    p.add_argument("--train", type=int, default=10000, help="training pairs (default 10000)")
    p.add_argument("--test", type=int, default=1000, help="held-out test pairs (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64, help="side in pixels (default 64)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--workers", type=int, default=None,
                   help="rendering processes (default: one per CPU; the shards are the same for any count)")


def run(args: argparse.Namespace) -> int:
    from dlip_ds.config import ConfigError

    if args.train < 1 or args.test < 0 or args.image_size < 16 or args.shard_size < 1:
        raise ConfigError("synth: need --train >= 1, --test >= 0, --image-size >= 16, --shard-size >= 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    info = synth(args.out, train=args.train, test=args.test, seed=args.seed, image_size=args.image_size,
                 shard_size=args.shard_size, workers=args.workers)
    print(f"synth: {info['train']} train + {info['test']} test pairs, vocabulary {info['vocab']} tokens -> {args.out}")
    return 0
