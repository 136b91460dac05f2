"""The VQA loader: shards of images with their questions (`qa.py`) -> batches of questions with
their answers, BLIP's VQA training batch (docs/architecture.md section 3).

The chain is `stream.build_pipeline`'s (shards, shuffle, skips counted, seeded per rank and worker);
only the per-sample stage and the collate differ. A sample is one image; it expands into one example
per question. Training skips (and counts) questions nobody answered and gives each question its own
augmented view of the image, as BLIP's dataset does; the epoch loader keeps every question, with one
eval-transformed view per image.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import webdataset as wds

from dlip_ds.config import ConfigError, DataConfig, VisionConfig
from dlip_ds.data.qa import answer_weights, clean_question, load_json, vqa_fields
from dlip_ds.data.sample import BadSample, SkipCounter, decode_image, image_id_of
from dlip_ds.data.shards import is_remote, shard_folder
from dlip_ds.data.stream import PrivateRNG, epoch_loader, source_list, train_loader
from dlip_ds.data.transforms import (
    eval_transform,
    hflip_pair,
    swap_left_right,
    train_transform,
)

ANSWER_LIST = "answer_list.json"


class ToVQAExamples:
    """Raw sample -> the examples of its questions: {"image", "question" (cleaned), "answers"
    (distinct), "weights", "gt_answers" (raw), "answer_type", "question_type", "question_key",
    "question_id", "image_id"}. Training flips with probability 0.5 per question, swapping left and
    right in the question and its answers."""

    def __init__(self, transform: Callable, counter: SkipCounter, *, max_words: int, train: bool, seed: int):
        self.transform, self.counter, self.max_words, self.train = transform, counter, max_words, train
        self.rng = PrivateRNG(seed)

    def __call__(self, sample: dict) -> list[dict]:
        where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        try:
            ext, qa, bad, meta = vqa_fields(sample)
            for _ in range(bad):
                self.counter.add("bad_question", f"{where}: a question without text, id or list of answers")
            if not qa:
                raise BadSample("no_question")
            image = decode_image(sample[ext])
        except BadSample as e:
            self.counter.add(e.reason, f"{where}: {e}")
            return []
        image_id = image_id_of(meta, sample.get("__key__", ""))
        shared = None if self.train else self.transform(image)  # evaluation: one view serves every question
        out = []
        for q in qa:
            question, gt = clean_question(q["question"], self.max_words), list(q.get("answers", []))
            if not question or (self.train and not gt):
                self.counter.add("empty_question" if not question else "no_answer", f"{where}: {q['question_id']!r}")
                continue
            pixels = shared
            if shared is None:
                with self.rng:
                    img = image
                    if random.random() < 0.5:
                        img, question = hflip_pair(image, question)
                        gt = [swap_left_right(a) for a in gt]
                    pixels = self.transform(img)
            answers, weights = answer_weights(gt, q.get("dataset", "vqa"))
            # question_id: an integer id as is, any other (VG's strings) as a stable crc32, like image ids
            out.append({"image": pixels, "question": question, "answers": answers, "weights": weights,
                        "gt_answers": gt, "answer_type": q.get("answer_type"), "question_type": q.get("question_type"),
                        "question_key": q["question_id"], "question_id": image_id_of({"image_id": q["question_id"]}, ""),
                        "image_id": image_id})
        return out


class FlatMap:
    """Pipeline stage: each sample -> the examples `fn` makes of it (a list, [] when skipped)."""

    def __init__(self, fn: Callable[[dict], list[dict]]):
        self.fn = fn

    def __call__(self, src: Iterator) -> Iterator:
        for sample in src:
            yield from self.fn(sample)


class VQACollate:
    """Examples -> the VQA batch dict of docs/architecture.md section 3 (BLIP's `vqa_collate_fn` plus
    the tokenisation `BLIP_VQA.forward` does)."""

    def __init__(self, tokenizer, counter: SkipCounter, *, max_length: int):
        self.tokenizer, self.counter, self.max_length = tokenizer, counter, max_length

    def __call__(self, examples: list[dict]) -> dict:
        tok = self.tokenizer
        q = tok([e["question"] for e in examples], padding="longest", truncation=True, max_length=self.max_length,
                return_tensors="pt")
        q_ids = q.input_ids.clone()
        q_ids[:, 0] = tok.enc_token_id  # BLIP's question encoder reads the image: [ENC] replaces [CLS]
        flat = [a for e in examples for a in e["answers"]]
        if flat:
            # Truncated like the questions (BLIP does not truncate answers; an overlong one is an outlier).
            a = tok(flat, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt")
            a_ids, a_mask = a.input_ids.clone(), a.attention_mask
            a_ids[:, 0] = tok.bos_token_id  # the decoder starts from [DEC]
        else:  # an evaluation batch of unanswered (test) questions
            a_ids = a_mask = torch.zeros((0, 1), dtype=torch.long)
        return {
            "pixel_values": torch.stack([e["image"] for e in examples]),
            "question_input_ids": q_ids,
            "question_attention_mask": q.attention_mask,
            "answer_input_ids": a_ids,
            "answer_attention_mask": a_mask,
            "answer_labels": a_ids.masked_fill(a_mask == 0, -100),
            "answer_weights": torch.tensor([w for e in examples for w in e["weights"]], dtype=torch.float32),
            "answer_counts": torch.tensor([len(e["answers"]) for e in examples], dtype=torch.long),
            "question_ids": torch.tensor([e["question_id"] for e in examples], dtype=torch.long),
            "image_ids": torch.tensor([e["image_id"] for e in examples], dtype=torch.long),
            "questions": [e["question"] for e in examples],
            "answers": [e["answers"] for e in examples],
            "gt_answers": [e["gt_answers"] for e in examples],
            "answer_types": [e["answer_type"] for e in examples],
            "question_types": [e["question_type"] for e in examples],
            "question_keys": [e["question_key"] for e in examples],
            "skipped": self.counter.pop(),
        }


class VQAStages:
    """`stages(counter, seed)` of `stream.build_pipeline` for VQA shards: the training transform
    (`train_transform`, one view per question, flipped apart) or the evaluation one."""

    def __init__(self, tokenizer, cfg: DataConfig, vision: VisionConfig, train: bool):
        self.tokenizer, self.cfg, self.train = tokenizer, cfg, train
        self.transform = train_transform(vision, min_scale=cfg.min_scale, randaugment=cfg.randaugment) if train \
            else eval_transform(vision)

    def __call__(self, counter: SkipCounter, seed: int) -> tuple[Callable, Callable]:
        to_examples = ToVQAExamples(self.transform, counter, max_words=self.cfg.max_words, train=self.train, seed=seed)
        return FlatMap(to_examples), VQACollate(self.tokenizer, counter, max_length=self.cfg.max_length)


def _stages_for(tokenizer, cfg: DataConfig) -> Callable[[VisionConfig, bool], VQAStages]:
    return functools.partial(VQAStages, tokenizer, cfg)


def make_vqa_train_loader(cfg: DataConfig, tokenizer, vision: VisionConfig, *, rank: int = 0, world_size: int = 1,
                          seed: int = 0, start_step: int = 0) -> wds.WebLoader:
    """Infinite batches of answered questions from `cfg.train_shards` (`make_train_loader`'s contract:
    resampled, seeded, skips counted, a restart at `start_step` draws afresh)."""
    return train_loader(cfg, vision, _stages_for(tokenizer, cfg), rank=rank, world_size=world_size, seed=seed,
                        start_step=start_step)


def make_vqa_epoch_loader(shards, cfg: DataConfig, tokenizer, vision: VisionConfig, *, rank: int = 0,
                          world_size: int = 1, workers: int | None = None,
                          batch_size: int | None = None) -> wds.WebLoader:
    """One exact pass (evaluation transform): every question of `shards` once across ranks and
    workers, unanswered ones included (`answer_counts` 0)."""
    return epoch_loader(shards, cfg, vision, _stages_for(tokenizer, cfg), rank=rank, world_size=world_size,
                        workers=workers, batch_size=batch_size)


def load_answer_list(path_or_shards) -> list[str]:
    """BLIP's answer_list.json (a JSON list of answer strings). Given shards instead of a .json file:
    the answer_list.json beside the shards' folder (what `dlip-ds synth` writes: DIR/answer_list.json
    for DIR/test), else inside that folder."""
    spec = source_list(path_or_shards)[0]
    if spec.endswith(".json"):
        path = Path(spec)
    else:
        if is_remote(spec):
            raise ConfigError(f"answer list: shards {spec} are remote; give the answer_list.json path")
        first = shard_folder(spec)
        found = [p for p in (first.resolve().parent / ANSWER_LIST, first / ANSWER_LIST) if p.is_file()]
        if not found:
            raise ConfigError(f"answer list: no {ANSWER_LIST} beside or inside {first}; give its path")
        path = found[0]
    answers = load_json(path)
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ConfigError(f"{path}: expected a non-empty JSON list of answer strings (BLIP's answer_list.json)")
    return answers
