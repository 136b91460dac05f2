"""Question-answer records: the `qa` list of a VQA sample, BLIP's question cleaning and answer
weights, answer and question types, and BLIP's VQA annotation files (`dlip-ds prepare`).

A VQA sample is one image; its json holds `{"image_id", "qa": [{"question_id", "question",
"answers" (every annotator's answer, raw; [] for test questions), "answer_type", "question_type",
"dataset": "vqa"|"vg"}, ...]}`. Torch-free: `dlip-ds synth` and `prepare` import it.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from dlip_ds.config import ConfigError
from dlip_ds.data.sample import BadSample, image_ext, sample_json

ANSWER_TYPES = ("yes/no", "number", "other")
# The 65 question types of VQAv2 (mscoco_question_types.txt of the VQA API), used as prefixes.
VQAV2_QUESTION_TYPES = (
    "how many", "is the", "what", "what color is the", "what is the", "is this", "is this a", "what is",
    "are the", "what kind of", "is there a", "what type of", "is it", "what are the", "where is the",
    "is there", "does the", "what color are the", "are these", "are there", "which", "is", "what is the man",
    "is the man", "are", "how", "does this", "what is on the", "what does the", "how many people are",
    "what is in the", "what is this", "do", "what are", "are they", "what time", "what sport is",
    "are there any", "is he", "what color is", "why", "where are the", "what color", "who is",
    "what animal is", "is the woman", "is this an", "do you", "how many people are in", "what room is", "has",
    "is this person", "what is the woman", "can you", "why is the", "is the person", "what is the color of the",
    "what is the person", "could", "was", "is that a", "what number is", "what is the name", "what brand",
    "none of the above",
)
_TYPE_WORDS = sorted((t.split() for t in VQAV2_QUESTION_TYPES if t != "none of the above"), key=len, reverse=True)
NUMBER_WORDS = frozenset((
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty", "thirty", "forty",
    "fifty", "sixty", "seventy", "eighty", "ninety", "hundred", "thousand"))
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
# Auxiliaries that open a yes/no question: the answer type of a question nobody answered (a test split).
_YES_NO_OPENERS = frozenset(("is", "are", "was", "were", "do", "does", "did", "can", "could", "has", "have", "had",
                             "will", "would", "should", "may"))
# BLIP/ALBEF's pre_question: these characters go, "-" and "/" separate words.
_Q_PUNCT = re.compile(r"[,.'!?\"()*#:;~]")
VG_WEIGHT = 0.2  # BLIP weighs each Visual Genome answer 0.2 (VQAv2's are count / annotators)


def clean_question(text: str, max_words: int = 30) -> str:
    """BLIP's `pre_question` (ALBEF's punctuation set): lowercase, drop , . ' ! ? " ( ) * # : ; ~,
    "-" and "/" become spaces, whitespace collapsed, the first `max_words` words."""
    words = _Q_PUNCT.sub("", text.lower()).replace("-", " ").replace("/", " ").split()
    return " ".join(words[:max_words] if max_words > 0 else words)


def question_type_of(question: str) -> str:
    """The longest VQAv2 question type that is a word prefix of the cleaned question, else its first
    three words (VQAv2 assigns "none of the above" there; the words say more)."""
    words = clean_question(question, 0).split()
    for t in _TYPE_WORDS:
        if words[:len(t)] == t:
            return " ".join(t)
    return " ".join(words[:3])


def answer_type_of(answers: list[str], question: str = "") -> str:
    """"yes/no" | "number" | "other" from the most common answer (VQAv2 labels by the majority);
    without answers, from the question: "how many" -> number, an auxiliary first -> yes/no."""
    if answers:
        top = " ".join(Counter(answers).most_common(1)[0][0].lower().split())
        if top in ("yes", "no"):
            return "yes/no"
        return "number" if _NUMBER.fullmatch(top) or top in NUMBER_WORDS else "other"
    words = clean_question(question, 0).split()
    if words[:2] == ["how", "many"]:
        return "number"
    return "yes/no" if words[:1] and words[0] in _YES_NO_OPENERS else "other"


def answer_weights(answers: list[str], dataset: str = "vqa") -> tuple[list[str], list[float]]:
    """BLIP's targets: the distinct answers in first-seen order, each weighted by its count over the
    number of answers (VQAv2), or VG_WEIGHT each (Visual Genome)."""
    counts = Counter(answers)
    distinct = list(counts)
    if dataset == "vg":
        return distinct, [VG_WEIGHT] * len(distinct)
    return distinct, [counts[a] / len(answers) for a in distinct]


def qa_record(question_id, question: str, answers: list[str], *, dataset: str = "vqa",
              answer_type: str | None = None, question_type: str | None = None) -> dict:
    """One entry of a sample's `qa` list; missing types are inferred (`answer_type_of`, `question_type_of`)."""
    return {"question_id": question_id, "question": question, "answers": list(answers),
            "answer_type": answer_type or answer_type_of(answers, question),
            "question_type": question_type or question_type_of(question), "dataset": dataset}


def parse_qa(value) -> tuple[list[dict], int]:
    """A sample json's `qa` field -> (usable questions, number of malformed ones left out). A question
    needs a non-blank string `question`, a `question_id`, and `answers` a list of strings (absent: [])."""
    if not isinstance(value, list):
        raise BadSample("missing_qa" if value is None else "bad_qa", f"'qa' is {type(value).__name__}, not a list")
    good = []
    for q in value:
        if not isinstance(q, dict) or not isinstance(q.get("question"), str) or not q["question"].strip() \
                or q.get("question_id") is None:
            continue
        answers = q.get("answers", [])
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            continue
        good.append(q)
    return good, len(value) - len(good)


def vqa_fields(sample: dict) -> tuple[str, list[dict], int, dict]:
    """A webdataset VQA sample -> (image extension, usable questions, malformed questions, json meta)."""
    ext = image_ext(sample)
    if "json" not in sample:
        raise BadSample("missing_qa", "no json part")
    meta = sample_json(sample)
    qa, bad = parse_qa(meta.get("qa"))
    return ext, qa, bad, meta


# --------------------------------------------------------------------------- BLIP's annotation files


def load_json(path: Path):
    if not path.is_file():
        raise ConfigError(f"annotation file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a JSON file ({e})") from None


def is_vqa_annotation(entries) -> bool:
    """BLIP's vqa_*.json / vg_qa.json: a list whose entries carry "question" (captions carry "caption");
    one is enough, so a file that opens with a damaged entry is still read as VQA (and that entry rejected)."""
    return isinstance(entries, list) and any(isinstance(e, dict) and "question" in e for e in entries)


def official_types(path: Path) -> dict:
    """VQAv2's mscoco_*_annotations.json -> {question_id: {"answer_type", "question_type", "image_id"}}."""
    data = load_json(path)
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise ConfigError(f"{path}: expected VQAv2 annotations, an object with an 'annotations' list")
    out = {}
    for i, a in enumerate(anns):
        if not isinstance(a, dict) or "question_id" not in a:
            raise ConfigError(f"{path}: annotations[{i}] has no 'question_id'")
        out[a["question_id"]] = {k: a.get(k) for k in ("answer_type", "question_type", "image_id")}
    return out


def group_vqa(entries: list, official: dict | None = None) -> tuple[dict[str, dict], list[dict]]:
    """BLIP VQA entries ({"question_id", "question", "answer": [...] (absent in test), "image",
    "dataset"}) -> ({image path: {"image_id", "qa": [...]}}, rejects). Types come from `official`
    when it knows the question, else are inferred; the image id is the official one, else the path."""
    groups: dict[str, dict] = {}
    rejects = []
    official = official or {}
    for i, e in enumerate(entries):
        where = f"entry {i}"
        try:
            if not isinstance(e, dict):
                raise BadSample("bad_entry", f"not an object: {str(e)[:80]}")
            image, question, qid = e.get("image"), e.get("question"), e.get("question_id")
            if not isinstance(image, str) or not image:
                raise BadSample("missing_image", "no 'image' path")
            where = f"{image} ({where})"
            if not isinstance(question, str) or not question.strip():
                raise BadSample("missing_question", "no 'question' text")
            if qid is None:
                raise BadSample("missing_question_id", "no 'question_id'")
            answers = e.get("answer", [])
            answers = [answers] if isinstance(answers, str) else answers
            if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
                raise BadSample("bad_answer", f"'answer' must be a string or a list of strings, got {str(answers)[:80]}")
            dataset = e.get("dataset", "vqa")
            if dataset not in ("vqa", "vg"):
                raise BadSample("bad_dataset", f"'dataset' must be vqa or vg, got {dataset!r}")
        except BadSample as err:
            rejects.append({"source": where, "reason": err.reason, "detail": str(err)[:300]})
            continue
        known = official.get(qid, {})
        group = groups.setdefault(image, {"image_id": image, "qa": []})
        if known.get("image_id") is not None:
            group["image_id"] = known["image_id"]
        group["qa"].append(qa_record(qid, question, answers, dataset=dataset, answer_type=known.get("answer_type"),
                                     question_type=known.get("question_type")))
    return groups, rejects
