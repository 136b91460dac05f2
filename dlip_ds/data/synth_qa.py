"""Questions about a synth scene, VQAv2-style: colour, shape, count, position, existence and
relation, with ten annotator answers each (mostly the true one, a few noisy: a wrong colour, an
adjacent number, a synonym).

Each image gets one yes/no question (yes or no with equal odds) and two open ones (number or
other). Training questions only name colour-shape pairs of the training pool, so the held-out pairs
stay unseen; test questions may name any pair. The answers are read from the scene's objects
(their colours, shapes and centres), never from its captions.
"""

from __future__ import annotations

import random

from dlip_ds.data.qa import qa_record
from dlip_ds.data.synth_words import (
    COLOURS,
    NUMBERS,
    POSITIONS,
    SHAPES,
    an,
    pair_pool,
    plural,
)

ANNOTATORS = 10
# Annotators answer these synonyms now and then; they are noise, never the canonical answer.
SYNONYMS = {"purple": "violet", "center": "middle", "diamond": "rhombus", "cross": "plus", "0": "zero", "1": "one",
            **{str(n): w for n, w in NUMBERS.items()}}
SIDES = ("left", "right", "top", "bottom")


def canonical_answers() -> list[str]:
    """Every answer a synth question can have (BLIP's answer_list.json for the synthetic set)."""
    return ["yes", "no", *(str(n) for n in range(max(NUMBERS) + 1)), *COLOURS, *SHAPES,
            *dict.fromkeys([*POSITIONS, *SIDES])]


def _wrong(answer: str, kind: str) -> list[str]:
    """The mistakes an annotator can make for this answer."""
    if kind == "yes/no":
        return ["no" if answer == "yes" else "yes"]
    if kind == "number":
        return [str(n) for n in (int(answer) - 1, int(answer) + 1) if n >= 0]
    for group in (list(COLOURS), list(SHAPES), ["left", "right"], ["top", "bottom"], list(POSITIONS)):
        if answer in group:
            return [a for a in group if a != answer]
    raise ValueError(f"no wrong answers for {answer!r}")


def annotate(rng: random.Random, answer: str, kind: str) -> list[str]:
    """Ten annotator answers: at most three noisy, so the true answer is always the majority."""
    noisy = rng.choice((0, 0, 1, 1, 1, 2, 2, 3))
    answers = [answer] * (ANNOTATORS - noisy)
    for _ in range(noisy):
        synonym = SYNONYMS.get(answer)
        answers.append(synonym if synonym and rng.random() < 0.5 else rng.choice(_wrong(answer, kind)))
    rng.shuffle(answers)
    return answers


def _name(o) -> str:
    return f"{o.colour} {o.shape}"


def _nearest_position(o) -> str:
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - o.x) ** 2 + (POSITIONS[p][1] - o.y) ** 2)


def _absent(rng: random.Random, objs, pool) -> tuple[str, str]:
    present = {(o.colour, o.shape) for o in objs}
    return rng.choice([p for p in pool if p not in present])


def _single(rng, o, pool):
    c, s = o.colour, o.shape
    c2 = rng.choice([x for x in COLOURS if x != c])
    ac, as_ = _absent(rng, [o], pool)
    yes = [(f"is there {an(c)} {s}?", "yes"), (f"is the {s} {c}?", "yes")]
    no = [(f"is there {an(ac)} {as_}?", "no"), (f"is the {s} {c2}?", "no")]
    open_ = [(f"what color is the {s}?", c), (f"what shape is the {c} object?", s),
             (f"where is the {c} {s}?", _nearest_position(o)), (f"how many {plural(s)} are there?", "1")]
    return yes, no, open_


def _count(rng, objs, pool):
    c, s, n = objs[0].colour, objs[0].shape, len(objs)
    other_n = rng.choice([m for m in NUMBERS if m != n])
    other_s = rng.choice([x for x in SHAPES if x != s])
    ac, as_ = _absent(rng, objs, pool)
    yes = [(f"is there {an(c)} {s}?", "yes"), (f"are there {NUMBERS[n]} {plural(s)}?", "yes")]
    no = [(f"is there {an(ac)} {as_}?", "no"), (f"are there {NUMBERS[other_n]} {plural(s)}?", "no")]
    open_ = [(f"how many {plural(s)} are there?", str(n)), (f"how many {c} {plural(s)} are there?", str(n)),
             (f"how many {plural(other_s)} are there?", "0"), (f"what color are the {plural(s)}?", c),
             (f"what shape are the {c} objects?", s)]
    return yes, no, open_


def _relation(rng, objs, pool):
    a, b = objs
    ac, as_ = _absent(rng, objs, pool)
    if abs(a.x - b.x) > abs(a.y - b.y):  # side by side: the scene keeps the other axis close
        first, second = (a, b) if a.x < b.x else (b, a)
        fwd, back, ends = "to the left of", "to the right of", ("left", "right")
        side_q = f"which side is the {_name(first)} on?"
    else:
        first, second = (a, b) if a.y < b.y else (b, a)
        fwd, back, ends = "above", "below", ("top", "bottom")
        side_q = f"is the {_name(first)} at the top or the bottom?"
    on = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
    yes = [(f"is the {_name(first)} {fwd} the {_name(second)}?", "yes"),
           (f"is the {_name(second)} {back} the {_name(first)}?", "yes"),
           (f"is there {an(first.colour)} {first.shape}?", "yes")]
    no = [(f"is the {_name(second)} {fwd} the {_name(first)}?", "no"),
          (f"is the {_name(first)} {back} the {_name(second)}?", "no"), (f"is there {an(ac)} {as_}?", "no")]
    open_ = [(side_q, ends[0]), (f"what color is the shape {on[ends[0]]}?", first.colour),
             (f"what shape is {on[ends[1]]}?", second.shape), ("how many shapes are there?", "2"),
             (f"how many {plural(first.shape)} are there?", str(sum(o.shape == first.shape for o in objs)))]
    return yes, no, open_


def _answer_type(answer: str) -> str:
    return "yes/no" if answer in ("yes", "no") else "number" if answer.isdigit() else "other"


def scene_questions(rng: random.Random, kind: str, objs: list, *, test: bool, first_id: int) -> list[dict]:
    """The `qa` list of one scene (`kind` and objects as `synth.make_sample` draws them); question ids
    are first_id, first_id + 1, ..."""
    pool = pair_pool(False) + (pair_pool(True) if test else [])
    yes, no, open_ = {"single": _single, "count": _count, "relation": _relation}[kind](rng, objs if kind != "single"
                                                                                      else objs[0], pool)
    picks = [rng.choice(yes if rng.random() < 0.5 else no), *rng.sample(open_, 2)]
    rng.shuffle(picks)
    out = []
    for k, (question, answer) in enumerate(picks):
        kind_of = _answer_type(answer)
        out.append(qa_record(first_id + k, question, annotate(rng, answer, kind_of), answer_type=kind_of))
    return out
