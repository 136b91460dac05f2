"""VQA data: synth questions (ten answers, held-out pairs, answers true to the picture), `prepare` of
BLIP's VQA files, the VQA batch against hand-computed values, flips, determinism, skips counted."""

import io
import json
import re
import zlib
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from helpers import write_vocab
from PIL import Image
from torchvision import transforms as T

from dlip_ds.cli import main
from dlip_ds.config import ConfigError, DataConfig, VisionConfig
from dlip_ds.data.prepare import prepare
from dlip_ds.data.qa import answer_type_of, clean_question, question_type_of
from dlip_ds.data.sample import SkipCounter
from dlip_ds.data.synth import make_sample, synth
from dlip_ds.data.synth_words import COLOURS, HELD_OUT, SHAPES
from dlip_ds.data.text import load_tokenizer
from dlip_ds.data.vqa import (
    ToVQAExamples,
    VQACollate,
    load_answer_list,
    make_vqa_epoch_loader,
    make_vqa_train_loader,
)

PAIR = re.compile(rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})(e?s)?\b")
VISION = VisionConfig(image_size=16)
WORDS = ["what", "color", "is", "the", "circle", "red", "how", "many", "two", "2", "3", "left", "right", "of",
         "to", "blue", "square", "yes", "no", "where", "there", "a", "##s"]


def encode(img, fmt="PNG"):
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write_shard(path, samples):
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)
    return str(path)


def vqa_sample(key, qa, image=None, **meta):
    img = image if image is not None else Image.new("RGB", (12, 12), (zlib.crc32(key.encode()) % 256, 40, 90))
    return {"__key__": key, "png": encode(img), "json": json.dumps({"qa": qa, **meta})}


def q(qid, question, answers, dataset="vqa"):
    return {"question_id": qid, "question": question, "answers": answers, "answer_type": answer_type_of(answers, question),
            "question_type": question_type_of(question), "dataset": dataset}


def cfg(**kw):
    return DataConfig(**{"batch_size": 4, "workers": 0, "shuffle_buffer": 8, "max_length": 12, "randaugment": False,
                         **kw})


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(write_vocab(tmp_path_factory.mktemp("vocab"), WORDS))


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synth(out, train=90, test=30, seed=5, image_size=32, shard_size=50)
    return out


def read_qa(split_dir):
    return [json.loads(s["json"]) for s in wds.WebDataset(sorted(str(p) for p in split_dir.glob("*.tar")),
                                                          shardshuffle=False)]


def majority(answers):
    return Counter(answers).most_common(1)[0][0]


# --------------------------------------------------------------------------- synth


def test_synth_questions(synth_dir):
    canonical = load_answer_list(synth_dir / "test")  # DIR/answer_list.json beside DIR/test
    assert canonical == json.loads((synth_dir / "answer_list.json").read_text())
    tok = load_tokenizer(synth_dir / "tokenizer")
    yes_no = Counter()
    for split in ("train", "test"):
        for meta in read_qa(synth_dir / split):
            assert len(meta["qa"]) == 3 and len({x["question"] for x in meta["qa"]}) == 3
            assert sum(x["answer_type"] == "yes/no" for x in meta["qa"]) == 1
            for x in meta["qa"]:
                assert len(x["answers"]) == 10 and x["dataset"] == "vqa"
                top, n = Counter(x["answers"]).most_common(1)[0]
                assert n >= 7 and top in canonical  # noise never outvotes the truth
                assert x["answer_type"] == answer_type_of(x["answers"]) and x["question_type"]
                yes_no[top] += x["answer_type"] == "yes/no"
                for text in (x["question"], *x["answers"]):
                    assert tok.unk_token_id not in tok(text).input_ids, text
                pairs = {(m.group(1), m.group(2)) for m in PAIR.finditer(" ".join([x["question"], *x["answers"]]))}
                assert split == "test" or not pairs & HELD_OUT, x  # training never names a held-out pair
    assert yes_no["yes"] + yes_no["no"] == 120 and 35 <= yes_no["yes"] <= 85  # balanced (binomial, seed fixed)
    qtypes = {x["question_type"] for meta in read_qa(synth_dir / "train") for x in meta["qa"]}
    assert {"what color is the", "how many", "is there a"} <= qtypes


# Answered by looking at the pictures (train split, seed 0): four orange squares; a green diamond left of an
# orange circle; a purple circle at the bottom; a black triangle left of an orange cross; four blue crosses;
# two red stars.
HAND_CHECKED = {
    0: {"what color are the squares?": "orange", "how many circles are there?": "0", "are there four squares?": "yes"},
    1: {"is the orange circle to the left of the green diamond?": "no", "which side is the green diamond on?": "left",
        "how many shapes are there?": "2"},
    2: {"is there an orange circle?": "no", "where is the purple circle?": "bottom", "what color is the circle?": "purple"},
    3: {"is there a black triangle?": "yes", "what color is the shape on the left?": "black",
        "how many triangles are there?": "1"},
    4: {"how many crosses are there?": "4", "how many stars are there?": "0", "is there a blue star?": "no"},
    5: {"are there four stars?": "no", "what shape are the red objects?": "star", "how many circles are there?": "0"},
}


WHERE_QUESTIONS = (r"where is the (\w+) \w+\?", r"which side is the (\w+) \w+ on\?",
                   r"is the (\w+) \w+ at the top or the bottom\?")


def test_synth_answers_match_the_picture():
    for i, expected in HAND_CHECKED.items():
        s = make_sample(0, "train", i, 32)
        assert {x["question"]: majority(x["answers"]) for x in s["qa"]} == expected
    # Beyond those: colour, position and side answers checked against the pixels of the rendered image.
    checked = Counter()
    for i in range(150):
        s = make_sample(1, "train", i, 64)
        arr = np.asarray(Image.open(io.BytesIO(s["png"])), dtype=np.int32)
        # a relation of two objects of one colour: the colour does not tell them apart
        one_colour = len({m.group(1) for c in s["captions"] for m in PAIR.finditer(c)}) < 2
        for x in s["qa"]:
            answer = majority(x["answers"])
            m = next(filter(None, (re.fullmatch(p, x["question"]) for p in WHERE_QUESTIONS)), None)
            if m and s["kind"] != "count" and not (s["kind"] == "relation" and one_colour):
                ys, xs = np.nonzero(np.abs(arr - COLOURS[m.group(1)]).sum(-1) < 60)
                cx, cy = xs.mean() / 64, ys.mean() / 64
                assert ("left" not in answer or cx < 0.4) and ("right" not in answer or cx > 0.6), (i, x)
                assert ("top" not in answer or cy < 0.4) and ("bottom" not in answer or cy > 0.6), (i, x)
                checked["where"] += 1
            if x["question"].startswith("what color is the ") and s["kind"] == "single":
                assert (np.abs(arr - COLOURS[answer]).sum(-1) < 60).sum() > 20, (i, x)
                checked["colour"] += 1
    assert checked["where"] >= 10 and checked["colour"] >= 5


def test_synth_questions_depend_only_on_seed_split_index():
    a, b = make_sample(2, "test", 4, 32), make_sample(2, "test", 4, 64)
    assert a["qa"] == b["qa"] and [x["question_id"] for x in a["qa"]] == [40, 41, 42]
    assert make_sample(3, "test", 4, 32)["qa"] != a["qa"]


# --------------------------------------------------------------------------- question text


def test_question_cleaning_and_types():
    assert clean_question("  What's the man-made thing, on the left/right?! ", 30) == "whats the man made thing on the left right"
    assert clean_question("How many dogs are there?", 2) == "how many"
    assert question_type_of("What color is the bus?") == "what color is the"
    assert question_type_of("How many people are in the room?") == "how many people are in"
    assert question_type_of("Isn't it late?") == "isnt it late"  # "is" must match a whole word
    assert question_type_of("Why?") == "why"
    assert answer_type_of(["yes"] * 6 + ["no"] * 4) == "yes/no"
    assert answer_type_of(["2", "two", "two", "two"]) == "number" and answer_type_of(["1,000"]) == "number"
    assert answer_type_of(["red", "2", "red"]) == "other"
    assert answer_type_of([], "How many cats?") == "number" and answer_type_of([], "Does it fly?") == "yes/no"


# --------------------------------------------------------------------------- the batch


def test_collate_against_hand_computed_values(tok):
    counter = SkipCounter()
    to_examples = ToVQAExamples(T.ToTensor(), counter, max_words=30, train=False, seed=0)
    sample = vqa_sample("k", [
        q(7, "What color is the circle?", ["red"] * 7 + ["blue"] * 2 + ["red circle"]),
        q("vg-12", "How many squares?", ["2", "two"], dataset="vg"),
        q(9, "Is the circle blue?", []),  # unanswered: kept by the epoch loader, with no answer rows
    ], image_id=31)
    batch = VQACollate(tok, counter, max_length=12)(to_examples(sample))
    ids = tok.convert_tokens_to_ids
    enc, dec, sep, pad = tok.enc_token_id, tok.bos_token_id, tok.sep_token_id, tok.pad_token_id
    assert batch["question_input_ids"].tolist() == [
        [enc, *ids(["what", "color", "is", "the", "circle"]), sep],
        [enc, *ids(["how", "many", "square", "##s"]), sep, pad],
        [enc, *ids(["is", "the", "circle", "blue"]), sep, pad],
    ]
    assert batch["question_attention_mask"].tolist() == [[1] * 7, [1] * 6 + [0], [1] * 6 + [0]]
    # answers: question 0 -> red, blue, red circle; question 1 -> 2, two; question 2 -> none
    assert batch["answer_input_ids"].tolist() == [
        [dec, ids("red"), sep, pad], [dec, ids("blue"), sep, pad], [dec, ids("red"), ids("circle"), sep],
        [dec, ids("2"), sep, pad], [dec, ids("two"), sep, pad]]
    assert batch["answer_attention_mask"].tolist() == [[1, 1, 1, 0]] * 2 + [[1] * 4] + [[1, 1, 1, 0]] * 2
    assert batch["answer_labels"].tolist() == [[dec, ids("red"), sep, -100], [dec, ids("blue"), sep, -100],
                                               [dec, ids("red"), ids("circle"), sep], [dec, ids("2"), sep, -100],
                                               [dec, ids("two"), sep, -100]]
    assert batch["answer_weights"].dtype == torch.float32
    assert torch.allclose(batch["answer_weights"], torch.tensor([0.7, 0.2, 0.1, 0.2, 0.2]))  # BLIP: n/10; VG 0.2
    assert batch["answer_counts"].tolist() == [3, 2, 0]
    assert batch["question_ids"].tolist() == [7, zlib.crc32(b"vg-12") & 0x7FFFFFFF, 9]
    assert batch["image_ids"].tolist() == [31, 31, 31]
    assert batch["question_keys"] == [7, "vg-12", 9]
    assert batch["questions"] == ["what color is the circle", "how many squares", "is the circle blue"]
    assert batch["answers"] == [["red", "blue", "red circle"], ["2", "two"], []]
    assert batch["gt_answers"][0] == ["red"] * 7 + ["blue"] * 2 + ["red circle"] and batch["gt_answers"][2] == []
    assert batch["answer_types"] == ["other", "number", "yes/no"]
    assert batch["question_types"] == ["what color is the", "how many", "is the"]
    assert batch["pixel_values"].shape == (3, 3, 12, 12) and batch["skipped"] == {}
    # a batch of unanswered questions only
    empty = VQACollate(tok, counter, max_length=12)(to_examples(vqa_sample("e", [q(1, "is it red", [])])))
    for k in ("answer_input_ids", "answer_attention_mask", "answer_labels"):
        assert empty[k].shape == (0, 1) and empty[k].dtype == torch.long
    assert empty["answer_weights"].shape == (0,) and empty["answer_counts"].tolist() == [0]


def test_flip_swaps_left_and_right_in_question_and_answers(tok):
    left_red = Image.new("RGB", (8, 8), (0, 0, 255))
    left_red.paste((255, 0, 0), (0, 0, 4, 8))
    qa = [q(k, "Is the red square to the left of the blue one?", ["left", "top left", "lefty", "right"])
          for k in range(40)]
    examples = ToVQAExamples(T.ToTensor(), SkipCounter(), max_words=30, train=True, seed=3)(vqa_sample("f", qa, left_red))
    flipped = 0
    for e in examples:
        red_on_left = e["image"][0, :, :4].mean() > e["image"][0, :, 4:].mean()
        if red_on_left:
            assert e["question"] == "is the red square to the left of the blue one"
            assert e["gt_answers"] == ["left", "top left", "lefty", "right"]
        else:
            flipped += 1
            assert e["question"] == "is the red square to the right of the blue one"
            assert e["gt_answers"] == ["right", "top right", "lefty", "left"] and e["answers"] == e["gt_answers"]
    assert 5 <= flipped <= 35


# --------------------------------------------------------------------------- loaders


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two shards: 6 images with 2 questions each (one unanswered), plus bad samples."""
    d = tmp_path_factory.mktemp("vqa")
    good = [vqa_sample(f"{i:04d}", [q(10 * i, f"how many {i}", ["2"] * 9 + ["3"]), q(10 * i + 1, "is it red", [])],
                       image_id=i) for i in range(6)]
    bad = [
        {"__key__": "nojson", "png": encode(Image.new("RGB", (4, 4)))},
        {"__key__": "badjson", "png": encode(Image.new("RGB", (4, 4))), "json": b"{"},
        {"__key__": "noimage", "json": json.dumps({"qa": [q(1, "what", ["a"])]})},
        {**vqa_sample("brokenimg", [q(2, "what", ["a"])]), "png": b"not a png"},
        vqa_sample("qanotlist", {"x": 1}),
        vqa_sample("badq", [{"question": "no id", "answers": ["a"]}, q(3, "?!", ["a"]), q(500, "what color", ["red"])],
                   image_id=50),
    ]
    return [write_shard(d / "a.tar", good[:3] + bad[:3]), write_shard(d / "b.tar", good[3:] + bad[3:])]


BAD = {"missing_qa": 1, "bad_json": 1, "missing_image": 1, "bad_image": 1, "bad_qa": 1, "bad_question": 1,
       "empty_question": 1}


def collect(loader, n=None):
    keys, skipped, batches = [], Counter(), []
    for i, b in enumerate(loader):
        if n is not None and i >= n:
            break
        keys += b.get("question_keys", [])
        skipped.update(b["skipped"])
        batches.append(b)
    return keys, dict(skipped), batches


def test_epoch_loader_every_question_once(tok, shards):
    keys, skipped, batches = collect(make_vqa_epoch_loader(shards, cfg(), tok, VISION, batch_size=5))
    assert sorted(keys) == sorted([10 * i + j for i in range(6) for j in (0, 1)] + [500])
    assert skipped == BAD
    for b in batches:
        if "question_keys" in b:
            assert b["answer_counts"].tolist() == [0 if k % 10 == 1 else (1 if k == 500 else 2)
                                                   for k in b["question_keys"]]
            assert b["answer_input_ids"].shape[0] == int(b["answer_counts"].sum()) == b["answer_weights"].numel()
    # split over two ranks: disjoint halves of the same questions
    halves = [collect(make_vqa_epoch_loader(shards, cfg(), tok, VISION, rank=r, world_size=2))[0] for r in (0, 1)]
    assert sorted(halves[0] + halves[1]) == sorted(keys) and not set(halves[0]) & set(halves[1])


def test_train_loader_deterministic_answered_only_and_counts_skips(tok, shards):
    c = cfg(train_shards=shards, batch_size=3)
    run = [collect(make_vqa_train_loader(c, tok, VISION, seed=s), n=12) for s in (1, 1, 2)]
    (keys, skipped, batches), (keys2, _, batches2), (keys3, _, _) = run
    assert keys == keys2 and keys != keys3
    for a, b in zip(batches, batches2):
        assert a["loader_seconds"] > 0  # the worker's time for the batch: a measurement, the one key that differs
        for k, v in a.items():
            if k != "loader_seconds":
                assert torch.equal(v, b[k]) if torch.is_tensor(v) else v == b[k], k
    assert set(keys) <= {10 * i for i in range(6)} | {500} and len(keys) == 36
    # unanswered questions skipped and counted as such; the bad samples were met too (shards are resampled)
    assert skipped.get("no_answer", 0) >= 6 and set(skipped) <= set(BAD) | {"no_answer"}
    assert skipped.keys() & BAD.keys()
    b = batches[0]
    assert b["answer_counts"].tolist() == [1 if k == 500 else 2 for k in b["question_keys"]]
    assert b["question_input_ids"][:, 0].eq(tok.enc_token_id).all() and b["answer_input_ids"][:, 0].eq(tok.bos_token_id).all()


def test_load_answer_list_errors(tmp_path, synth_dir):
    assert load_answer_list(str(synth_dir / "answer_list.json"))[:2] == ["yes", "no"]
    assert load_answer_list(str(synth_dir / "train" / "train-000000.tar")) == load_answer_list(synth_dir / "train")
    (tmp_path / "shards").mkdir()
    write_shard(tmp_path / "shards" / "x.tar", [vqa_sample("a", [q(1, "what", ["a"])])])
    with pytest.raises(ConfigError, match="no answer_list.json"):
        load_answer_list(tmp_path / "shards")
    (tmp_path / "shards" / "answer_list.json").write_text('["a", "b"]')  # inside the folder also counts
    assert load_answer_list(tmp_path / "shards") == ["a", "b"]
    (tmp_path / "bad.json").write_text('{"a": 1}')
    with pytest.raises(ConfigError, match="bad.json: expected a non-empty JSON list"):
        load_answer_list(tmp_path / "bad.json")


# --------------------------------------------------------------------------- prepare


def test_prepare_blip_vqa_files_round_trip(tmp_path, tok):
    images = tmp_path / "images"
    (images / "val2014").mkdir(parents=True)
    Image.new("RGB", (10, 10), (200, 10, 10)).save(images / "val2014" / "a.jpg", quality=95)
    Image.new("RGB", (10, 10), (10, 10, 200)).save(images / "val2014" / "b.png")
    (images / "val2014" / "broken.jpg").write_bytes(b"nope")
    entries = [
        {"question_id": 1, "question": "What color is it?", "answer": ["red"] * 9 + ["dark red"],
         "image": "val2014/a.jpg", "dataset": "vqa"},
        {"question_id": 2, "question": "How many circles?", "answer": ["2"] * 10, "image": "val2014/a.jpg",
         "dataset": "vqa"},
        {"question_id": 3, "question": "Is it blue?", "answer": ["yes"], "image": "val2014/b.png", "dataset": "vg"},
        {"question_id": 4, "question": "Where?", "image": "val2014/b.png", "dataset": "vqa"},  # a test question
        {"question_id": 5, "answer": ["x"], "image": "val2014/b.png"},  # no question
        {"question_id": 6, "question": "What?", "answer": [3], "image": "val2014/b.png"},  # answers not strings
        {"question_id": 7, "question": "Why?", "answer": ["no"], "image": "val2014/missing.jpg"},
        {"question_id": 8, "question": "Why?", "answer": ["no"], "image": "val2014/broken.jpg"},
        "not an entry",
    ]
    (tmp_path / "vqa_val.json").write_text(json.dumps(entries))
    official = {"annotations": [{"question_id": 1, "answer_type": "other", "question_type": "what color is",
                                 "image_id": 42, "answers": []}]}
    (tmp_path / "official.json").write_text(json.dumps(official))
    out = tmp_path / "out"
    assert main(["prepare", str(tmp_path / "vqa_val.json"), "--out", str(out), "--images", str(images),
                 "--vqa-annotations", str(tmp_path / "official.json"), "--workers", "1"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert manifest["samples"] == 2 and manifest["kind"] == "vqa"
    assert Counter(r["reason"] for r in rejects) == {"missing_question": 1, "bad_answer": 1, "missing_file": 1,
                                                     "bad_image": 1, "bad_entry": 1}
    metas = [json.loads(s["json"]) for s in wds.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False)]
    assert [m["image_id"] for m in metas] == [42, "val2014/b.png"]
    assert [x["question_id"] for m in metas for x in m["qa"]] == [1, 2, 3, 4]
    # official types for question 1, inferred for the others
    assert [(x["answer_type"], x["question_type"]) for m in metas for x in m["qa"]] == [
        ("other", "what color is"), ("number", "how many"), ("yes/no", "is it"), ("other", "where")]
    keys, skipped, batches = collect(make_vqa_epoch_loader(str(out), cfg(), tok, VISION, batch_size=8))
    b = batches[0]
    assert keys == [1, 2, 3, 4] and skipped == {}
    assert b["answers"] == [["red", "dark red"], ["2"], ["yes"], []]
    assert torch.allclose(b["answer_weights"], torch.tensor([0.9, 0.1, 1.0, 0.2]))
    assert b["image_ids"].tolist() == [42, 42, *[zlib.crc32(b"val2014/b.png") & 0x7FFFFFFF] * 2]
    # --vqa-annotations with a caption file is an error before any work
    (tmp_path / "captions.json").write_text(json.dumps([{"image": "val2014/a.jpg", "caption": "red"}]))
    with pytest.raises(ConfigError, match="holds no questions"):
        prepare(str(tmp_path / "captions.json"), tmp_path / "o2", images=str(images),
                vqa_annotations=[str(tmp_path / "official.json")])
