"""`evaluate_vqa` and `dlip-ds evaluate --task vqa` on tiny synthetic VQA shards with a tiny BLIP_VQA model:
the files written, the metrics recomputed from the saved predictions and the questions read straight from
the shards, ranking that never leaves the answer list, answers that belong to their own question."""

from __future__ import annotations

import io
import json
import logging
import tarfile

import pytest
import torch

from dlip_ds.eval.vqa import evaluate_vqa, vqa_accuracy

pytestmark = pytest.mark.usefixtures("one_thread")

VQA = {"decoder": {"share": False, "context": "question"}}


@pytest.fixture(scope="module")
def vqa_setup(tmp_path_factory, tiny_model):
    """(model, tokenizer, model dir, test shards dir, answer list): a random tiny VQA model saved with the
    synth tokenizer, and 8 synthetic test images with three questions each."""
    from dlip_ds.data import load_tokenizer
    from dlip_ds.data.synth import synth
    from dlip_ds.models.dlip_format import save_model

    root = tmp_path_factory.mktemp("vqa_eval")
    synth(root / "data", train=20, test=8, image_size=32, shard_size=3)
    tok = load_tokenizer(root / "data" / "tokenizer")
    model = tiny_model(text={"vocab_size": len(tok)}, **VQA)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # larger random weights, so that the answers differ between questions
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    save_model(model, root / "model", tokenizer=tok)
    answers = json.loads((root / "data" / "answer_list.json").read_text())
    return model, tok, root / "model", root / "data" / "test", answers


def shard_questions(shards_dir) -> dict:
    """{question_id: (png bytes, question dict)} read from the tar files themselves."""
    out = {}
    for tar_path in sorted(shards_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        for name, data in files.items():
            if name.endswith(".json"):
                png = files[name[: -len("json")] + "png"]
                for q in json.loads(data)["qa"]:
                    out[q["question_id"]] = (png, q)
    return out


def recomputed(predictions: list[dict], questions: dict) -> dict:
    """Overall and per-type accuracy (percent) from the saved answers and the shards' ground truth."""
    by_type: dict[str, list[float]] = {}
    for p in predictions:
        q = questions[p["question_id"]][1]
        by_type.setdefault(q["answer_type"], []).append(vqa_accuracy(p["answer"], q["answers"]))
    every = [a for accs in by_type.values() for a in accs]
    return {"accuracy": 100 * sum(every) / len(every),
            **{f"accuracy_{t}": 100 * sum(a) / len(a) for t, a in by_type.items()}}


def _data_cfg():
    from dlip_ds.config import DataConfig

    return DataConfig(workers=0)


def run_cli(args: list[str]) -> int:
    from dlip_ds.cli import main

    return main(["evaluate", *args, "--task", "vqa", "--workers", "0", "--batch-size", "5"])


def test_cli_rank_mode_writes_metrics_predictions_and_tensorboard(vqa_setup, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, model_dir, data_dir, answer_list = vqa_setup
    out, tb = tmp_path / "out", tmp_path / "tb"
    assert run_cli([str(model_dir), "--data", str(data_dir), "--out", str(out), "--tensorboard", str(tb),
                    "--k", "6"]) == 0
    metrics = json.loads((out / "vqa_metrics.json").read_text())
    predictions = json.loads((out / "vqa_predictions.json").read_text())
    questions = shard_questions(data_dir)
    # the server's format: every question once, integer ids in order, string answers
    assert [p["question_id"] for p in predictions] == sorted(questions)
    assert all(set(p) == {"question_id", "answer"} and isinstance(p["answer"], str) for p in predictions)
    # answer_list.json beside the shards was found: ranking, whose answers all come from the list
    assert metrics["mode"] == "rank" and metrics["answers"] == len(answer_list) and metrics["k"] == 6
    assert {p["answer"] for p in predictions} <= set(answer_list)
    assert len({p["answer"] for p in predictions}) > 1  # not one constant answer
    assert metrics["questions"] == len(questions) == 24
    expected = recomputed(predictions, questions)
    assert {k: metrics[k] for k in expected} == pytest.approx(expected)
    assert set(expected) >= {"accuracy", "accuracy_yes/no"}
    assert "accuracy" in capsys.readouterr().out
    acc = EventAccumulator(str(tb))
    acc.Reload()
    assert acc.Scalars("eval/vqa/accuracy")[0].value == pytest.approx(metrics["accuracy"], rel=1e-5)


def test_answers_belong_to_their_questions(vqa_setup):
    """Each prediction equals the model's answer to that question alone (image and question from the shard)."""
    from PIL import Image

    from dlip_ds.data import eval_transform
    from dlip_ds.data.qa import clean_question

    model, tok, _, data_dir, answer_list = vqa_setup
    metrics, predictions = evaluate_vqa(model, data_dir, tok, answer_list=answer_list, k=6, batch_size=7,
                                        data_cfg=_data_cfg(), progress=False)
    assert metrics["mode"] == "rank" and metrics["skipped"] == 0 and metrics["seconds"] > 0
    questions = shard_questions(data_dir)
    transform = eval_transform(model.cfg.vision)
    for p in predictions[::4]:
        png, q = questions[p["question_id"]]
        pixels = transform(Image.open(io.BytesIO(png)).convert("RGB"))[None]
        enc = tok([clean_question(q["question"])], return_tensors="pt")
        ids = enc.input_ids.clone()
        ids[:, 0] = tok.enc_token_id
        alone = model.vqa_answer(pixels, ids, enc.attention_mask, answers=answer_list, k=6, tokenizer=tok)
        assert p["answer"] == alone[0], p["question_id"]


def test_cli_generate_mode(vqa_setup, tmp_path):
    _, _, model_dir, data_dir, _ = vqa_setup
    out = tmp_path / "out"
    assert run_cli([str(model_dir), "--data", str(data_dir), "--out", str(out), "--vqa-mode", "generate",
                    "--num-beams", "2"]) == 0
    metrics = json.loads((out / "vqa_metrics.json").read_text())
    predictions = json.loads((out / "vqa_predictions.json").read_text())
    assert metrics["mode"] == "generate" and metrics["num_beams"] == 2 and metrics["answers"] is None
    expected = recomputed(predictions, shard_questions(data_dir))
    assert {k: metrics[k] for k in expected} == pytest.approx(expected)


def test_cli_without_an_answer_list(vqa_setup, tmp_path, capsys, caplog):
    import shutil

    _, _, model_dir, data_dir, _ = vqa_setup
    alone = tmp_path / "alone" / "test"
    shutil.copytree(data_dir, alone)  # no answer_list.json beside these shards
    with caplog.at_level(logging.WARNING):
        assert run_cli([str(model_dir), "--data", str(alone), "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "vqa_metrics.json").read_text())["mode"] == "generate"
    assert "generating answers instead" in caplog.text
    assert run_cli([str(model_dir), "--data", str(alone), "--vqa-mode", "rank"]) == 2
    assert "answer_list.json" in capsys.readouterr().err


def test_two_ranks_score_like_one(vqa_setup, monkeypatch):
    """Rank 1's slice, then rank 0's with rank 1's rows handed in by a stand-in for all_gather_object (two
    real processes take ~25 s here): the merged result equals one process reading everything."""
    import torch.distributed as dist

    model, tok, _, data_dir, answers = vqa_setup
    kw = {"answer_list": answers, "k": 6, "batch_size": 4, "data_cfg": _data_cfg(), "progress": False}
    sent = {}

    def gather_as(rank):
        def all_gather_object(parts, obj):
            sent[rank] = obj
            parts[:] = [sent.get(0, ([], 0)), sent.get(1, ([], 0))]  # rank 1 goes first: 0's is empty
        return all_gather_object

    monkeypatch.setattr(dist, "all_gather_object", gather_as(1))
    evaluate_vqa(model, data_dir, tok, rank=1, world_size=2, **kw)
    monkeypatch.setattr(dist, "all_gather_object", gather_as(0))
    metrics, predictions = evaluate_vqa(model, data_dir, tok, rank=0, world_size=2, **kw)
    ids = [{r["question_id"] for r in sent[rank][0]} for rank in (0, 1)]
    assert ids[0] and ids[1] and not ids[0] & ids[1]  # each rank read its own part
    single, single_predictions = evaluate_vqa(model, data_dir, tok, **kw)
    assert predictions == single_predictions
    drop = ("seconds",)
    assert {k: v for k, v in metrics.items() if k not in drop} == {k: v for k, v in single.items() if k not in drop}
