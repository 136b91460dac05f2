"""The demo's code path end to end at CI size: synth, pretrain, distil, baseline, evaluate, export,
profile, report. The numbers are meaningless at this size; their shape and consistency are checked.
`--seeds N`: the loop and the aggregation over seeds run on the CI demo's seed and a second seed made
from its files (a second trained seed would cost another two minutes here), and are checked against
numbers recomputed from each seed's eval files and seed_report.json."""

from __future__ import annotations

import copy
import json
import math
import statistics
from pathlib import Path

import pytest

from dlip_ds.cli import main
from dlip_ds.config import ConfigError
from dlip_ds.demo import HEADLINE, MAX_STUDENT_SHARE, MODELS, SEED0


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
        assert "meteor" not in metrics["captioning"] and "bleu4" in metrics["captioning"]  # `--no-meteor`
        captions = json.loads((demo_out / "eval" / m / "captions.json").read_text())
        assert len(captions) == metrics["images"] == report["eval"]["images"]
    assert report["student"]["params"] <= MAX_STUDENT_SHARE * report["teacher"]["params"]
    assert report["student"]["flops"] < report["teacher"]["flops"]
    assert {f"train_{m}" for m in MODELS} | {"profile", "report"} <= set(report["stages"])
    assert report["cpu_s"] > 0 and report["elapsed_s"] > 0
    # timings mean little without the CPU: its model and the instruction set torch uses are recorded
    import torch

    assert report["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert report["machine"]["cpu_capability"] in (demo_out / "report.md").read_text().split("\n\n")[1]
    assert report["total"]["wall_s"] == pytest.approx(report["elapsed_s"], abs=0.1)
    # One seed: the report is that seed's, whose own file is seed 0's seed_report.json in OUT.
    seed = json.loads((demo_out / "seed_report.json").read_text())
    assert report["seeds"] == 1 and report["train_seeds"] == [SEED0] and report["per_seed"] == [seed]
    assert set(seed["stages"]) == set(report["stages"]) - {"report"}  # the seed's own stage times
    for m in MODELS:
        assert all(report[m][k] == pytest.approx(seed[m][k]) for k in HEADLINE)
    c = report["student_vs_teacher"]
    assert c["params"] == pytest.approx(report["student"]["params"] / report["teacher"]["params"])
    assert c["keeps_95pct_of_teacher_recall"] == (
        report["student"]["mean_recall"] >= 0.95 * report["teacher"]["mean_recall"])
    assert c["student_over_baseline_cpu"] == pytest.approx(report["student"]["cpu_ms"] / report["baseline"]["cpu_ms"])
    gain = report["student"]["mean_recall"] - report["baseline"]["mean_recall"]
    assert c["recall_over_baseline"] == pytest.approx(gain) and c["beats_baseline_by_margin"] == (gain >= 5.0)


def test_verdict_states_the_margin_and_the_time_budget():
    from dlip_ds.demo_cli import budget_line, verdict

    def report(student: float, minutes: float, seeds: int = 1) -> dict:
        models = {m: {"mean_recall": r, "cider": 100.0} for m, r in zip(MODELS, (50.0, student, 45.0))}
        c = {"keeps_95pct_of_teacher_recall": True, "keeps_95pct_of_teacher_cider": True, "mean_recall": 0.96,
             "cider": 1.0, "params": 0.2, "flops": 0.2, "speedup": 2.0, "speedup_cpu": 2.0,
             "beats_baseline_recall": student > 45.0, "beats_baseline_by_margin": student - 45.0 >= 5.0,
             "recall_over_baseline": student - 45.0}
        return {**models, "student_vs_teacher": c, "seeds": seeds, "scale": {"budget_minutes": 10},
                "elapsed_s": 60 * minutes}

    assert "and beats the baseline" in verdict(report(51.0, 9.5)) and "+6.00 points" in verdict(report(51.0, 9.5))
    assert "beats, by less than the 5 points aimed at, the baseline" in verdict(report(47.0, 9.5))
    assert "does NOT beat the baseline" in verdict(report(44.0, 9.5))
    assert budget_line(report(51.0, 9.5)) == " It took 9.5 minutes, within the 10 minutes this scale aims at."
    assert "10.5 minutes, OVER the 10" in budget_line(report(51.0, 10.5))
    assert "9.0 minutes per seed, within" in budget_line(report(51.0, 27.0, seeds=3))
    assert budget_line({**report(51.0, 9.0), "scale": {"budget_minutes": 0}}) == ""


@pytest.mark.slow
def test_demo_latency_is_interleaved_rounds_with_their_spread(demo_out):
    """Each model's latency: the median of its timed rounds (wall and CPU), with quartiles and range."""
    report = json.loads((demo_out / "report.json").read_text())
    method = report["latency_method"]
    assert method["interleaved"] and method["rounds"] >= 3 and method["torch_threads"] == 1
    for m in MODELS:
        seed = report["per_seed"][0][m]
        for kind, stats in (("latency_ms", seed["latency_stats_ms"]), ("cpu_ms", seed["cpu_stats_ms"])):
            assert stats["rounds"] == method["rounds"]
            assert 0 < stats["min"] <= stats["q1"] <= stats["median"] <= stats["q3"] <= stats["max"], (m, kind)
            assert report[m][kind] == pytest.approx(stats["median"])
        assert report[m]["latency_rounds"]["wall_ms"] == [seed["latency_stats_ms"]]
        assert len(seed["profile_load_average"]) == 2
    md = (demo_out / "report.md").read_text()
    assert "## Latency" in md and "| student | 0 |" in md and "student/baseline" in md


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
        source = "teacher" if m == "teacher" else "student"
        assert recipe.student.source == str(demo_out / "runs" / source / "student")
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


# ----------------------------------------------------------------------------- --seeds N


def _second_seed(demo_out: Path, root: Path) -> dict:
    """Seed 1 made from the CI demo's seed 0: its eval files with other numbers, written where seed 1's
    go (OUT/seed-1/eval/<model>/metrics.json), and its seed report built from them as `run_seed` does."""
    from dlip_ds.demo import compare, seed_dir

    report = copy.deepcopy(json.loads((demo_out / "seed_report.json").read_text()))
    home = seed_dir(root, 1)
    for k, m in enumerate(MODELS):
        metrics = json.loads((demo_out / "eval" / m / "metrics.json").read_text())
        metrics["retrieval"]["r_mean"] = 10.0 * (k + 1) + 3.5
        metrics["captioning"]["cider"] = 20.0 * (k + 1) + 1.25
        path = home / "eval" / m / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(metrics))
        report[m].update(mean_recall=metrics["retrieval"]["r_mean"], cider=metrics["captioning"]["cider"],
                         retrieval=metrics["retrieval"], captioning=metrics["captioning"])
        report[m]["latency_ms"] *= 1.5
        report[m]["latency_stats_ms"] = {key: v * 1.5 if key != "rounds" else v
                                        for key, v in report[m]["latency_stats_ms"].items()}
    report["student_vs_teacher"] = compare(report)
    report.update(seed=1, train_seed=SEED0 + 1, dir=str(home))
    (home / "seed_report.json").write_text(json.dumps(report))
    return report


@pytest.mark.slow
def test_seeds_report_means_and_spread_from_each_seeds_files(demo_out, tmp_path, monkeypatch):
    """`demo(out, seeds=2)`: the seeds run in turn (their training here replaced by the CI demo's seed 0
    and a seed 1 made from its files), and report.json / report.md hold the mean, std and min/max of
    every headline number, recomputed here from each seed's eval metrics and seed_report.json."""
    from dlip_ds import demo_cli

    root = tmp_path / "out"
    root.mkdir()
    (root / "demo.json").write_text((demo_out / "demo.json").read_text())
    seeds = [json.loads((demo_out / "seed_report.json").read_text()), _second_seed(demo_out, root)]
    homes = {0: demo_out, 1: root / "seed-1"}
    asked = []
    monkeypatch.setattr(demo_cli, "run_seed", lambda out, scale, seed, stage:  # seed 1 as if an earlier call ran it
                        asked.append(seed) or ({**seeds[1], "reused": True} if seed else seeds[0]))
    report = demo_cli.demo(root, "ci", seeds=2)
    assert asked == [0, 1]
    assert json.loads((root / "report.json").read_text()) == json.loads(json.dumps(report))
    assert report["seeds"] == 2 and report["train_seeds"] == [SEED0, SEED0 + 1]

    for m in MODELS:
        metrics = [json.loads((homes[i] / "eval" / m / "metrics.json").read_text()) for i in (0, 1)]
        files = [json.loads((homes[i] / "seed_report.json").read_text()) for i in (0, 1)]
        expect = {"mean_recall": [x["retrieval"]["r_mean"] for x in metrics],
                  "cider": [x["captioning"]["cider"] for x in metrics],
                  "latency_ms": [f[m]["latency_stats_ms"]["median"] for f in files],
                  "cpu_ms": [f[m]["cpu_stats_ms"]["median"] for f in files],
                  "params": [f[m]["params"] for f in files], "flops": [f[m]["flops"] for f in files]}
        assert set(expect) == set(HEADLINE)
        assert expect["mean_recall"][0] != expect["mean_recall"][1]
        for key, values in expect.items():
            spread = report[m]["spread"][key]
            assert report[m][key] == pytest.approx(statistics.fmean(values)), (m, key)
            assert spread["std"] == pytest.approx(statistics.stdev(values)), (m, key)
            assert (spread["min"], spread["max"]) == pytest.approx((min(values), max(values))), (m, key)
            assert spread["values"] == pytest.approx(values), (m, key)
        assert report[m]["retrieval"]["r_mean"] == pytest.approx(report[m]["mean_recall"])
        assert report[m]["latency_rounds"]["wall_ms"] == [f[m]["latency_stats_ms"] for f in files]
        assert isinstance(report[m]["params"], int)

    # The verdict's numbers come from the means, not from either seed.
    c, t, s = report["student_vs_teacher"], report["teacher"], report["student"]
    assert c["mean_recall"] == pytest.approx(s["mean_recall"] / t["mean_recall"])
    assert c["keeps_95pct_of_teacher_recall"] == (s["mean_recall"] >= 0.95 * t["mean_recall"])
    assert c["beats_baseline_cider"] == (s["cider"] > report["baseline"]["cider"])

    md = (root / "report.md").read_text()
    r = report["student"]
    assert f"| {r['mean_recall']:.2f} ± {r['spread']['mean_recall']['std']:.2f} |" in md
    assert f"{r['cider']:.2f} ± {r['spread']['cider']['std']:.2f}" in md
    assert "## Seeds" in md and f"| 1 | {SEED0 + 1} |" in md and "means over 2 training seeds" in md
    assert "seed(s) 1 reused from an earlier call" in md
    for name in ("loss_curves.png", "quality_vs_params.png"):
        assert (root / name).read_bytes()[:4] == b"\x89PNG"


def test_seed_layout_and_training_seeds(tmp_path, monkeypatch):
    """Seed 0 trains in OUT with the recipes' seed (the single-seed layout), seed i in OUT/seed-i with
    training seed 42 + i; the data is OUT/data for every seed."""
    from dlip_ds import demo

    calls = []
    monkeypatch.setattr(demo, "make_data", lambda out, scale: out / "data")
    monkeypatch.setattr(demo, "train_run", lambda name, out, data, scale, teacher=None, extra=None:
                        calls.append((name, out, data, teacher, extra)) or out / "runs" / name)
    stage = demo.Stages()
    for seed in (0, 2):
        demo.pretrain_models(tmp_path, demo.SCALES["ci"], stage, seed=seed)
    home = tmp_path / "seed-2"
    assert calls == [("teacher", tmp_path, tmp_path / "data", None, None),
                     ("student", tmp_path, tmp_path / "data", tmp_path / "runs" / "teacher" / "student", None),
                     ("baseline", tmp_path, tmp_path / "data", None, None),
                     ("teacher", home, tmp_path / "data", None, {"train.seed": SEED0 + 2}),
                     ("student", home, tmp_path / "data", home / "runs" / "teacher" / "student",
                      {"train.seed": SEED0 + 2}),
                     ("baseline", home, tmp_path / "data", None, {"train.seed": SEED0 + 2})]
    assert {"train_teacher", "seed-2/train_teacher", "seed-2/train_baseline"} <= set(stage.times)


@pytest.mark.slow
def test_demo_trains_on_two_ranks_with_the_global_batch(demo_out, tmp_path):
    """The full and quick scales train on two ranks (torchrun, one core each): the run keeps the
    scale's global batch, each rank its half, and the student's distillation works across them."""
    import dataclasses

    from dlip_ds import demo

    scale = dataclasses.replace(demo.SCALES["ci"], ranks=2)
    assert {demo.SCALES[s].ranks for s in ("full", "quick")} == {2}
    run = demo.train_run("student", tmp_path, demo_out / "data", scale, teacher=demo_out / "runs" / "teacher" / "student")
    log = (tmp_path / "logs" / "train-student.log").read_text()
    assert "torch.distributed.run" in log and "--set data.batch_size=4" in log
    assert f"on 2 rank(s) (cpu), ZeRO-2, torch.float32, global batch {scale.batch_size}," in log
    assert (run / "student" / "config.json").is_file() and "kd_repr_fusion" in log
    with pytest.raises(ConfigError, match="does not split over 3 ranks"):
        demo.train_run("teacher", tmp_path, demo_out / "data", dataclasses.replace(scale, ranks=3))


@pytest.mark.parametrize("argv, message", [(["--seeds", "0"], "--seeds must be >= 1, got 0"),
                                           (["--seeds", "2", "--task", "vqa"], "--seeds applies to the pretraining")])
def test_demo_refuses_bad_seeds(tmp_path, capsys, argv, message):
    assert main(["demo", "--ci", "--out", str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_interleaved_rounds_rotate_the_order_and_report_the_spread():
    """`profile_models`' timing: one timed call per model per round after an untimed one, round r
    starting at model r, and the median, quartiles and range of each model's rounds."""
    from dlip_ds.profile import _interleaved, latency_stats

    order: list[int] = []
    times = _interleaved([lambda i=i: order.append(i) for i in range(3)], 4, "cpu")
    assert order == [i for i in (0, 1, 2, 1, 2, 0, 2, 0, 1, 0, 1, 2) for _ in range(2)]
    assert [len(wall) for wall, _ in times] == [4, 4, 4] and [len(cpu) for _, cpu in times] == [4, 4, 4]
    stats = latency_stats([5.0, 1.0, 3.0, 2.0, 100.0])
    assert stats == {"median": 3.0, "q1": 2.0, "q3": 5.0, "min": 1.0, "max": 100.0, "rounds": 5}
    assert latency_stats([2.5]) == {"median": 2.5, "q1": 2.5, "q3": 2.5, "min": 2.5, "max": 2.5, "rounds": 1}


def test_a_finished_seed_is_reused_until_a_run_changes(tmp_path):
    """A second `--seeds N` call skips the seeds whose report was written after their three runs
    finished; a run exported again since (or not finished) means measuring that seed anew."""
    import os

    from dlip_ds.demo import SCALES, finished_seed, seed_dir
    from dlip_ds.engine.checkpoint import LATEST, tag_for

    scale, home = SCALES["ci"], seed_dir(tmp_path, 1)
    for m in MODELS:
        run = home / "runs" / m
        (run / "checkpoints").mkdir(parents=True)
        (run / "student").mkdir()
        steps = scale.teacher_steps if m == "teacher" else scale.student_steps
        (run / "checkpoints" / LATEST).write_text(tag_for(steps))
        (run / "student" / "config.json").write_text("{}")
        os.utime(run / "student" / "config.json", (1000, 1000))
    report = {m: {"cpu_stats_ms": {}} for m in MODELS}
    (home / "seed_report.json").write_text(json.dumps(report))
    assert finished_seed(tmp_path, scale, 1) == report
    assert finished_seed(tmp_path, scale, 0) is None  # seed 0 (OUT itself) has no report
    (home / "runs" / "baseline" / "student" / "config.json").touch()  # exported after the report
    assert finished_seed(tmp_path, scale, 1) is None
    os.utime(home / "runs" / "baseline" / "student" / "config.json", (1000, 1000))
    (home / "runs" / "student" / "checkpoints" / LATEST).write_text(tag_for(1))  # stopped early
    assert finished_seed(tmp_path, scale, 1) is None
