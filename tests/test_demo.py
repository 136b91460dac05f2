"""The demo's code path end to end at CI size: synth, pretrain, distil, baseline, evaluate, export,
profile, report. The numbers are meaningless at this size; their shape and consistency are checked."""

from __future__ import annotations

import json
import math

import pytest

from dlip_ds.cli import main
from dlip_ds.demo import MAX_STUDENT_SHARE, MODELS


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    assert main(["demo", "--ci", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_demo_report_numbers(demo_out, capsys):
    report = json.loads((demo_out / "report.json").read_text())
    for m in MODELS:
        r = report[m]
        assert set(r) >= {"params", "flops", "latency_ms", "mean_recall", "cider"}
        assert isinstance(r["params"], int) and r["params"] > 0
        assert r["flops"] > 0 and r["latency_ms"] > 0
        assert 0.0 <= r["mean_recall"] <= 100.0
        assert math.isfinite(r["cider"]) and r["cider"] >= 0.0
        # The report carries exactly what `dlip-ds evaluate` wrote for that run.
        metrics = json.loads((demo_out / "eval" / m / "metrics.json").read_text())
        assert r["mean_recall"] == pytest.approx(metrics["retrieval"]["r_mean"])
        assert r["cider"] == pytest.approx(metrics["captioning"]["cider"])
        captions = json.loads((demo_out / "eval" / m / "captions.json").read_text())
        assert len(captions) == metrics["images"] == report["eval"]["images"]
    assert report["student"]["params"] <= MAX_STUDENT_SHARE * report["teacher"]["params"]
    assert report["student"]["flops"] < report["teacher"]["flops"]
    assert {f"train_{m}" for m in MODELS} <= set(report["stages"])
    assert report["cpu_s"] > 0 and report["elapsed_s"] > 0
    c = report["student_vs_teacher"]
    assert c["params"] == pytest.approx(report["student"]["params"] / report["teacher"]["params"])
    assert c["keeps_95pct_of_teacher_recall"] == (
        report["student"]["mean_recall"] >= 0.95 * report["teacher"]["mean_recall"])


@pytest.mark.slow
def test_demo_files_and_exported_student(demo_out):
    from dlip_ds.models.load import load_model

    for name in ("report.md", "loss_curves.png", "quality_vs_params.png"):
        assert (demo_out / name).stat().st_size > 0, name
    assert (demo_out / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    md = (demo_out / "report.md").read_text()
    assert "| teacher |" in md and "| student |" in md and "| baseline |" in md
    for m in MODELS:
        assert list((demo_out / "runs" / m / "tensorboard").glob("events.out.tfevents.*")), m
    student = load_model(demo_out / "student")
    report = json.loads((demo_out / "report.json").read_text())
    assert sum(p.numel() for p in student.parameters()) == report["student"]["params"]
    assert (demo_out / "student" / "vocab.txt").is_file() or (demo_out / "student" / "tokenizer.json").is_file()


def test_demo_refuses_to_mix_scales(tmp_path, capsys):
    (tmp_path / "demo.json").write_text(json.dumps({"scale_name": "quick"}))
    assert main(["demo", "--ci", "--out", str(tmp_path)]) == 2
    assert "holds a 'quick' demo run" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("task", ["vqa"])  # retrieval and captioning run in test_task_runs
def test_task_demo_fine_tunes_the_three_and_reports(demo_out, task):
    """`demo --task` on the pretrained demo: three fine-tuning runs from the right sources (the student
    and the baseline from the distilled student, the student taught by the fine-tuned teacher), scored by
    `dlip-ds evaluate --task`, the report consistent with what evaluate wrote."""
    from dlip_ds.demo_tasks import METRICS
    from dlip_ds.recipe import load_recipe

    assert main(["demo", "--ci", "--task", task, "--out", str(demo_out)]) == 0
    report = json.loads((demo_out / "tasks" / task / "report.json").read_text())
    key = METRICS[task][0]
    runs = {m: demo_out / "runs" / f"{task}-{m}" for m in MODELS}
    for m in MODELS:
        recipe = load_recipe(str(runs[m] / "config.yaml"))
        assert recipe.task == task
        assert recipe.student.source == str(demo_out / "runs" / ("teacher" if m == "teacher" else "student") / "student")
        assert recipe.teacher.source == (str(runs["teacher"] / "student") if m == "student" else "")
        assert bool(recipe.loss.kd) == (m == "student")
        written = json.loads((demo_out / "eval" / f"{task}-{m}" /
                              ("vqa_metrics.json" if task == "vqa" else "metrics.json")).read_text())
        written = written if task == "vqa" else written[task]
        assert report[m]["score"] == pytest.approx(written[key])
        assert report[m]["params"] > 0 and report[m]["flops"] > 0
    assert report["student"]["params"] == report["baseline"]["params"] < report["teacher"]["params"]
    c = report["student_vs_teacher"]
    assert c["keeps_95pct"] == (report["student"]["score"] >= 0.95 * report["teacher"]["score"])
    for name in ("report.md", "quality.png", "loss_curves.png"):
        assert (demo_out / "tasks" / task / name).stat().st_size > 0
