"""The VQAv2 accuracy against hand-worked cases of the official evaluation (GT-Vision-Lab/VQA vqaEval.py)."""

from __future__ import annotations

import json

import pytest

from dlip_ds.eval import (
    normalize_answer,
    vqa_accuracy,
    vqa_scores,
    write_vqa_predictions,
)
from dlip_ds.eval.vqa import process_punctuation


def naive_leave_one_out(pred: str, gts: list[str]) -> float:
    """The official loop written out: for each annotator, count matches among the others."""
    accs = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        accs.append(min(1.0, sum(a == pred for a in others) / 3))
    return sum(accs) / len(accs)


def ten(matching: int, answer: str = "dog", other: str = "cat") -> list[str]:
    return [answer] * matching + [other] * (10 - matching)


@pytest.mark.parametrize(("matches", "expected"), [
    (0, 0.0),
    # 1 match: the 1 subset leaving the match out holds 0 matches -> 0; the 9 others hold 1 -> 1/3 each.
    # (1 * 0 + 9 * 1/3) / 10 = 3/10 = 0.3
    (1, 0.3),
    # 2 matches: 2 subsets hold 1 -> 1/3; 8 hold 2 -> 2/3. (2/3 + 16/3) / 10 = 6/10 = 0.6
    (2, 0.6),
    # 3 matches: 3 subsets hold 2 -> 2/3; 7 hold 3 -> 1. (2 + 7) / 10 = 0.9 (not the paper's min(1, 3/3) = 1)
    (3, 0.9),
    # 4 matches: the subsets leaving a match out still hold 3 -> 1 everywhere.
    (4, 1.0),
    (10, 1.0),
])
def test_ten_annotators_by_hand(matches, expected):
    assert vqa_accuracy("dog", ten(matches)) == pytest.approx(expected)
    assert naive_leave_one_out("dog", ten(matches)) == pytest.approx(expected)


def test_leave_one_out_matches_the_naive_loop_for_any_count():
    for n in range(2, 11):
        for m in range(n + 1):
            gts = ["yes"] * m + ["no"] * (n - m)
            assert vqa_accuracy("yes", gts) == pytest.approx(naive_leave_one_out("yes", gts)), (n, m)
    # three annotators who all agree: each subset holds 2 matches -> 2/3
    assert vqa_accuracy("yes", ["yes"] * 3) == pytest.approx(2 / 3)


@pytest.mark.parametrize(("text", "expected"), [
    ("Two", "2"),
    ("none", "0"),
    ("the dog.", "dog"),
    ("A Dog", "dog"),
    ("isnt", "isn't"),
    ("dont", "don't"),
    ("1,000", "1000"),  # a comma between digits: every mark is deleted
    ("red/white", "red white"),  # a mark between words becomes a space
    ("dog, cat", "dog cat"),  # a mark next to a space is deleted
    ("3.5", "3.5"),  # a period before a digit stays
    ("2.", "2"),
    ("  yes\n", "yes"),
    ("yes\tno", "yes no"),
    ("10:30", "10:30"),  # colons are not in the official list
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(("prediction", "gt"), [("Two", "2"), ("the dog.", "dog"), ("isnt", "isn't"),
                                                ("1,000", "1000"), ("An apple", "apple"), (" yes ", "yes")])
def test_predictions_are_normalised(prediction, gt):
    assert vqa_accuracy(prediction, [gt] * 10) == 1.0


def test_ground_truth_gets_punctuation_only_and_only_when_annotators_disagree():
    # Disagreeing annotators: "1,000" -> "1000" by the punctuation rules, so 4 matches.
    assert process_punctuation("1,000") == "1000"
    assert vqa_accuracy("1000", ["1,000"] * 4 + ["many"] * 6) == 1.0
    # Unanimous annotators are compared as stored: "1,000" never equals a normalised prediction.
    assert vqa_accuracy("1000", ["1,000"] * 10) == 0.0
    assert vqa_accuracy("1,000", ["1,000"] * 10) == 0.0
    # No number words or articles on the ground truth (VQAv2's answers were normalised when it was made).
    assert vqa_accuracy("two", ["two"] * 4 + ["3"] * 6) == 0.0
    assert vqa_accuracy("two", ["2"] * 4 + ["3"] * 6) == 1.0


def test_a_single_answer_is_exact_match_after_normalising_both():
    assert vqa_accuracy("2", ["Two."]) == 1.0
    assert vqa_accuracy("the dog", ["Dog"]) == 1.0
    assert vqa_accuracy("3", ["Two."]) == 0.0
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("yes", [])


def test_scores_per_answer_type():
    questions = [
        {"question_id": 1, "answers": ten(10, "yes", "no"), "answer_type": "yes/no"},   # 1.0
        {"question_id": 2, "answers": ten(1, "yes", "no"), "answer_type": "yes/no"},    # 0.3
        {"question_id": 3, "answers": ten(2, "2", "3"), "answer_type": "number"},       # 0.6
        {"question_id": 4, "answers": ten(0, "red", "blue"), "answer_type": "other"},   # 0.0
        {"question_id": 5, "answers": ten(3, "red", "blue"), "answer_type": "other"},   # 0.9
        {"question_id": 6, "answers": [], "answer_type": "other"},                      # not scored
        {"question_id": 7, "answers": ["Red"], "answer_type": None},                    # 1.0, overall only
    ]
    predictions = {1: "yes", 2: "yes", 3: "two", 4: "red", 5: "red", 6: "anything", 7: "red"}
    out = vqa_scores(predictions, questions)
    assert out["questions"] == 6
    assert out["accuracy"] == pytest.approx(100 * (1.0 + 0.3 + 0.6 + 0.0 + 0.9 + 1.0) / 6)
    assert out["accuracy_yes/no"] == pytest.approx(65.0)
    assert out["accuracy_number"] == pytest.approx(60.0)
    assert out["accuracy_other"] == pytest.approx(45.0)
    assert set(out) == {"accuracy", "accuracy_yes/no", "accuracy_number", "accuracy_other", "questions"}


def test_scores_of_a_split_without_answers():
    assert vqa_scores({1: "yes"}, [{"question_id": 1, "answers": [], "answer_type": "yes/no"}]) == {"questions": 0}


def test_scores_refuse_a_missing_prediction():
    with pytest.raises(ValueError, match="no prediction for question 2"):
        vqa_scores({1: "yes"}, [{"question_id": 1, "answers": ["yes"]}, {"question_id": 2, "answers": ["no"]}])
    with pytest.raises(ValueError, match="question_id"):
        vqa_scores({}, [{"answers": ["no"]}])


def test_write_predictions_in_server_format(tmp_path):
    path = write_vqa_predictions(tmp_path / "out" / "p.json", {"30": "yes", 4: "2", 100: "red"})
    assert json.loads(path.read_text()) == [{"question_id": 4, "answer": "2"}, {"question_id": 30, "answer": "yes"},
                                            {"question_id": 100, "answer": "red"}]
    rows = [{"question_id": 2, "answer": "b"}, {"question_id": 1, "answer": "a"}]
    assert json.loads(write_vqa_predictions(tmp_path / "q.json", rows).read_text()) == sorted(
        rows, key=lambda r: r["question_id"])
    with pytest.raises(ValueError, match="integer question ids"):
        write_vqa_predictions(tmp_path / "r.json", {"vg-12": "yes"})
