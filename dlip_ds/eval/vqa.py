"""VQA accuracy as the official VQAv2 evaluation computes it, and BLIP's VQA evaluation loop.

The metric follows `vqaEval.py` of the VQA API (GT-Vision-Lab/VQA, PythonEvaluationTools), quirks included:

- the prediction is always normalised (`normalize_answer`): tabs and newlines to spaces, stripped, the
  punctuation rules, lower case, number words to digits, articles dropped, contractions restored;
- the ground-truth answers get the punctuation rules only, and only when the annotators disagree (VQAv2's
  answers were normalised when the data set was made, so the official code leaves them otherwise alone);
- a question's accuracy is the mean over its n leave-one-annotator-out subsets of min(1, matches / 3).
  With VQAv2's ten answers, m matching annotators score 0.3, 0.6, 0.9, 1.0 for m = 1, 2, 3, >= 4 (three
  matches give 0.9, not the paper's min(1, m / 3) = 1.0: the three subsets that leave a match out hold two).

Fewer than ten answers: the same formula over n >= 2 answers, as the official code computes it for any n.
One answer (Visual Genome) is our definition: leaving the only annotator out would score every prediction 0,
so the prediction scores 1.0 when it equals the answer after `normalize_answer` (applied to both, since VG
answers are raw text such as "Two."), else 0.0 (GQA's exact-match accuracy).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from dlip_ds.config import ConfigError, DataConfig
from dlip_ds.eval.retrieval import dist_info, model_device

log = logging.getLogger(__name__)

ANSWER_TYPES = ("yes/no", "number", "other")

# ----------------------------------------------------------------------------- answer processing

# The official table, keys and values as it spells them (its capitalised keys can never match: the text is
# lower-cased first; "somebody'd" -> "somebodyd" is its own odd entry).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_NUMBERS = {w: str(i) for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                             "nine", "ten"))}
_NUMBERS["none"] = "0"
_ARTICLES = frozenset(("a", "an", "the"))
# Apostrophes, colons and periods are not in the official list (periods have their own rule below).
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_COMMA_IN_NUMBER = re.compile(r"\d,\d")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a look-ahead that never fires, so a period
# goes unless a digit follows ("3.5" keeps it, "dog." and "2." lose it); and it passes re.UNICODE (32) where
# `sub` takes its count, so at most 32 periods go.
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """The official `processPunctuation`: a mark next to a space, or any mark at all once the text holds a
    comma between digits ("1,000" -> "1000"), is deleted; otherwise it becomes a space ("red/white" ->
    "red white"). Both tests look at the text as given, not as edited so far."""
    out = text
    delete_all = _COMMA_IN_NUMBER.search(text) is not None
    for p in _PUNCT:
        out = out.replace(p, "" if delete_all or (p + " " in text or " " + p in text) else " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """The official `processDigitArticle`: lower case, split on whitespace, number words to digits, articles
    dropped, contractions restored ("isnt" -> "isn't"), joined by single spaces."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """What the official evaluation does to a predicted answer."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, gt_answers: Iterable[str]) -> float:
    """One question's VQA accuracy in [0, 1] (see the module docstring for one answer)."""
    gts = [str(a) for a in gt_answers]
    if not gts:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    pred = normalize_answer(str(prediction))
    if len(gts) == 1:
        return float(pred == normalize_answer(gts[0]))
    # The official code strips whitespace of the prediction only; answers are compared as stored.
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    matches = sum(a == pred for a in gts)
    # Leaving out a matching annotator leaves matches - 1 among the others; leaving out another leaves matches.
    hit = matches * min(1.0, (matches - 1) / 3)
    miss = (len(gts) - matches) * min(1.0, matches / 3)
    return (hit + miss) / len(gts)


def vqa_scores(predictions: Mapping, questions: Iterable[Mapping]) -> dict:
    """Accuracy in percent, overall and per answer type (`accuracy_yes/no`, `accuracy_number`,
    `accuracy_other`: the types present), and `questions`, how many were scored. `predictions` maps a
    question id to its answer; `questions` are dicts with `question_id`, `answers` (every annotator's answer)
    and `answer_type` (None: counted in the overall accuracy only). A question without answers (a test split)
    is not scored; a scored question without a prediction is an error. With no question scored there is no
    accuracy to give: only `questions` (0) comes back."""
    total, per_type = [], {}
    for q in questions:
        try:
            qid, answers = q["question_id"], q["answers"]
        except KeyError as e:
            raise ValueError(f"a VQA question needs 'question_id' and 'answers', got keys {sorted(q)}") from e
        if not answers:
            continue
        if qid not in predictions:
            raise ValueError(f"no prediction for question {qid!r}")
        acc = vqa_accuracy(predictions[qid], answers)
        total.append(acc)
        if q.get("answer_type") is not None:
            per_type.setdefault(str(q["answer_type"]), []).append(acc)
    if not total:
        return {"questions": 0}
    out = {"accuracy": _percent(total)}
    known = [t for t in ANSWER_TYPES if t in per_type] + sorted(t for t in per_type if t not in ANSWER_TYPES)
    out.update({f"accuracy_{t}": _percent(per_type[t]) for t in known})
    out["questions"] = len(total)
    return out


def _percent(values: list[float]) -> float:
    return 100.0 * sum(values) / len(values)


def write_vqa_predictions(path: str | Path, predictions: Mapping | Iterable[Mapping]) -> Path:
    """Write `[{"question_id": int, "answer": str}, ...]` sorted by question id, the VQAv2 server's format.
    `predictions`: {question_id: answer} or a list of such dicts."""
    items = predictions.items() if isinstance(predictions, Mapping) else (
        (p["question_id"], p["answer"]) for p in predictions)
    rows = []
    for qid, answer in items:
        try:
            rows.append({"question_id": int(qid), "answer": str(answer)})
        except (TypeError, ValueError) as e:
            raise ValueError(f"the VQAv2 server takes integer question ids, got {qid!r}") from e
    rows.sort(key=lambda r: r["question_id"])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows) + "\n")
    return path


# ----------------------------------------------------------------------------- evaluation loop


def _image_total(shards) -> int | None:
    """Images (samples) in `shards` when they are a directory with a manifest, else None: the progress
    bar counts images, since no manifest counts questions."""
    from dlip_ds.data.shards import read_manifest

    if not isinstance(shards, (str, Path)) or not Path(shards).is_dir():
        return None
    total = (read_manifest(shards) or {}).get("samples")
    return total if isinstance(total, int) and total > 0 else None


@torch.no_grad()
def predict_vqa(model, shards, tokenizer, *, answer_list: list[str] | None = None, k: int = 128, num_beams: int = 3,
                max_length: int = 10, min_length: int = 1, batch_size: int = 64, data_cfg=None,
                device: torch.device | None = None, rank: int | None = None, world_size: int | None = None,
                progress: bool = True) -> tuple[list[dict], int]:
    """(rows, skipped samples): every question of `shards` answered, `{"question_id", "answer",
    "gt_answers", "answer_type"}` in question-id order, gathered from every rank (each reads its slice)."""
    from dlip_ds.data.vqa import make_vqa_epoch_loader

    rank, world_size = dist_info(rank, world_size)
    device = device or model_device(model)
    cfg = data_cfg or DataConfig()
    loader = make_vqa_epoch_loader(shards, cfg, tokenizer, model.cfg.vision, rank=rank, world_size=world_size,
                                   batch_size=batch_size)
    if answer_list is not None:
        k = min(k, len(answer_list))  # BLIP's top-k of the first answer token cannot exceed the list
    total = _image_total(shards)
    # Rank 0 shows its own share; the ranks read about equal slices.
    bar = tqdm(total=-(-total // world_size) if total else None, desc="VQA " + ("rank" if answer_list else "generate"),
               unit="img", disable=not progress or rank != 0, dynamic_ncols=True)
    was_training = model.training
    model.eval()
    rows, skipped, images = [], 0, set()
    try:
        for batch in loader:
            skipped += sum(batch.get("skipped", {}).values())
            if "question_keys" not in batch:  # a worker's last batch may carry only skip counts
                continue
            answers = model.vqa_answer(batch["pixel_values"].to(device), batch["question_input_ids"].to(device),
                                       batch["question_attention_mask"].to(device), answers=answer_list, k=k,
                                       num_beams=num_beams, max_length=max_length, min_length=min_length,
                                       tokenizer=tokenizer)
            rows += [{"question_id": q, "answer": a, "gt_answers": list(g), "answer_type": t} for q, a, g, t in
                     zip(batch["question_keys"], answers, batch["gt_answers"], batch["answer_types"], strict=True)]
            new = set(batch["image_ids"].tolist()) - images  # an image's questions may straddle two batches
            images |= new
            bar.update(len(new))
            bar.set_postfix(questions=len(rows), refresh=False)
    finally:
        bar.close()
        model.train(was_training)
    if world_size > 1:
        parts: list = [None] * world_size
        dist.all_gather_object(parts, (rows, skipped))
        rows = [r for part_rows, _ in parts for r in part_rows]
        skipped = sum(s for _, s in parts)
    return _in_question_order(rows, shards), skipped


def _in_question_order(rows: list[dict], shards) -> list[dict]:
    seen = set()
    for r in rows:
        if r["question_id"] in seen:
            raise ConfigError(f"{shards}: question id {r['question_id']!r} occurs twice (VQA question ids must be "
                              "unique: its predictions could not be told apart)")
        seen.add(r["question_id"])
    # Integer ids in number order (the server's); anything else after them, as text.
    return sorted(rows, key=lambda r: (0, r["question_id"], "") if isinstance(r["question_id"], int)
                  else (1, 0, str(r["question_id"])))


def evaluate_vqa(model, shards, tokenizer, *, answer_list: list[str] | None = None, k: int = 128,
                 num_beams: int = 3, max_length: int = 10, min_length: int = 1, batch_size: int = 64, data_cfg=None,
                 device: torch.device | None = None, rank: int | None = None, world_size: int | None = None,
                 progress: bool = True) -> tuple[dict, list[dict]]:
    """(metrics, predictions) of `model` on the VQA `shards`, on every rank: `vqa_scores`' accuracies plus
    "mode" ("rank": BLIP's ranking of `answer_list`, the top `k` answers by their first token re-scored
    whole; "generate": beam search, BLIP's defaults), "seconds" and "skipped" (samples and questions the loader skipped), and
    `[{"question_id", "answer"}]` in question-id order."""
    start = time.perf_counter()
    if answer_list is not None and not answer_list:
        raise ValueError("the answer list is empty: pass None to generate answers instead")
    rows, skipped = predict_vqa(model, shards, tokenizer, answer_list=answer_list, k=k, num_beams=num_beams,
                                max_length=max_length, min_length=min_length, batch_size=batch_size,
                                data_cfg=data_cfg, device=device, rank=rank, world_size=world_size, progress=progress)
    if not rows:
        raise ConfigError(f"no VQA question read from {shards} ({skipped} samples or questions skipped)")
    predictions = {r["question_id"]: r["answer"] for r in rows}
    questions = [{"question_id": r["question_id"], "answers": r["gt_answers"], "answer_type": r["answer_type"]}
                 for r in rows]
    metrics = vqa_scores(predictions, questions)
    if not metrics["questions"]:
        log.warning("no question of %s has answers (a test split?): no accuracy, predictions only", shards)
    if skipped:
        log.warning("%d VQA samples or questions of %s were skipped (unreadable image, malformed question): not "
                    "scored", skipped, shards)
    metrics.update({"mode": "generate" if answer_list is None else "rank", "skipped": skipped,
                    "seconds": time.perf_counter() - start})
    return metrics, [{"question_id": r["question_id"], "answer": r["answer"]} for r in rows]
