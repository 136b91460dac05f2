"""Running a study: the demo's data and teacher, then every variant and seed trained and evaluated,
each skipped when an earlier call finished it; then the report.

OUT/ data/  runs/teacher/          (the demo's, shared with `dlip-ds demo --out OUT`)
OUT/studies/NAME/ runs/<variant>-s<seed>/  eval/<variant>-s<seed>/  logs/
                  study.json  study.md  study.png
"""

from __future__ import annotations

import datetime
import json
import statistics
import time
from pathlib import Path

from dlip_ds.config import ConfigError
from dlip_ds.demo import (
    SCALES,
    Scale,
    Stages,
    _check_scale,
    _log,
    evaluate_run,
    machine,
    pretrain_models,
    train_run,
)
from dlip_ds.studies import plan, report

TIME_TAGS = ("time/data_s", "time/teacher_s", "time/student_fwd_bwd_s", "time/optimizer_s")


def finished(run_dir: Path, steps: int) -> bool:
    """The run reached `steps` and exported its student (a second call need not start it again)."""
    from dlip_ds.engine.checkpoint import LATEST, tag_for

    latest = run_dir / "checkpoints" / LATEST
    return (run_dir / "student" / "config.json").is_file() and latest.is_file() \
        and latest.read_text().strip() == tag_for(steps)


def teacher_run(out: Path, scale: Scale, stage: Stages) -> tuple[Path, Path]:
    """(data, teacher run): the demo's, trained first when `dlip-ds demo` has not done it in OUT."""
    data, teacher = out / "data", out / "runs" / "teacher"
    if (data / "test" / "manifest.json").is_file() and finished(teacher, scale.teacher_steps):
        _log(f"teacher: reusing {teacher}")
        return data, teacher
    data, runs = pretrain_models(out, scale, stage, models=("teacher",))
    return data, runs["teacher"]


def step_seconds(run_dir: Path) -> dict[str, float]:
    """Median seconds per training step over the logged windows (the first, warm-up, left out when
    there are more), from the run's TensorBoard time/* scalars: total, teacher and student parts."""
    import logging

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.WARNING)
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    if not all(t in tags for t in TIME_TAGS):
        return {"step_s": float("nan"), "teacher_s": float("nan"), "student_s": float("nan")}
    series = {t: [e.value for e in acc.Scalars(t)] for t in TIME_TAGS}
    n = min(len(v) for v in series.values())
    first = 1 if n > 2 else 0
    total = [sum(series[t][i] for t in TIME_TAGS) for i in range(first, n)]
    return {"step_s": statistics.median(total),
            "teacher_s": statistics.median(series["time/teacher_s"][first:n]),
            "student_s": statistics.median(series["time/student_fwd_bwd_s"][first:n])}


def _params(run_dir: Path) -> int:
    from dlip_ds.engine.checkpoint import load_run_student
    from dlip_ds.profile import param_counts

    return param_counts(load_run_student(run_dir)[0])["total"]


def run_variant(study: plan.Study, variant: plan.Variant, seed: int, home: Path, data: Path, teacher: Path,
                scale: Scale, steps: int) -> tuple[dict, bool]:
    """(this seed's numbers, whether anything had to run): train unless finished, evaluate unless the
    evaluation is newer than the run's exported student."""
    name = f"{variant.name}-s{seed}"
    run_dir, eval_dir = home / "runs" / name, home / "eval" / name
    worked = False
    if not finished(run_dir, steps):
        extra = {**study.overrides(variant), "train.seed": seed}
        train_run(name, home, data, scale, teacher=teacher / "student", recipe=plan.RECIPE, steps=steps, extra=extra)
        worked = True
    metrics_path = eval_dir / "metrics.json"
    if not metrics_path.is_file() or metrics_path.stat().st_mtime < (run_dir / "student" / "config.json").stat().st_mtime:
        metrics, worked = evaluate_run(name, run_dir, home, data, scale, steps), True
    else:
        metrics = json.loads(metrics_path.read_text())
    result = {"seed": seed, "run": str(run_dir), "eval": str(eval_dir), "params": _params(run_dir),
              "mean_recall": metrics["retrieval"]["r_mean"],
              "cider": metrics.get("captioning", {}).get("cider", float("nan")),
              "images": metrics["images"], **step_seconds(run_dir)}
    return result, worked


def format_seconds(seconds: float) -> str:
    m, s = divmod(int(max(0.0, seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


def _progress(name: str, k: int, n: int, what: str, start: float, durations: list[float], left: int) -> None:
    elapsed = time.perf_counter() - start
    eta = format_seconds(statistics.fmean(durations) * left) if durations else "?"
    _log(f"study {name} {k}/{n}: {what} | elapsed {format_seconds(elapsed)} | eta {eta}")


def run_study(name: str, out: str | Path, scale_name: str = "full", seeds: int = 1) -> dict:
    """Run (or finish) study `name` in OUT; returns the report (also OUT/studies/NAME/study.json)."""
    start = time.perf_counter()
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    study = plan.study(name)
    out, scale = Path(out).resolve(), SCALES[scale_name]
    _check_scale(out, scale_name)
    stage = Stages()
    data, teacher = teacher_run(out, scale, stage)
    home, steps = out / "studies" / name, study.steps[scale_name]
    home.mkdir(parents=True, exist_ok=True)  # train_run writes its DeepSpeed config there
    jobs = [(v, plan.SEED0 + i) for v in study.variants for i in range(seeds)]
    results: dict[str, list[dict]] = {v.name: [] for v in study.variants}
    durations: list[float] = []  # seconds of the jobs this call had to run: the ETA's basis
    for k, (variant, seed) in enumerate(jobs, 1):
        _progress(name, k, len(jobs), f"{variant.name} seed {seed} ({variant.label})", start, durations,
                  len(jobs) - k + 1)
        t0 = time.perf_counter()
        result, worked = run_variant(study, variant, seed, home, data, teacher, scale, steps)
        results[variant.name].append(result)
        if worked:
            durations.append(time.perf_counter() - t0)
    variants = report.summarise(study, results)
    rep = {
        "study": name, "title": study.title, "student": study.student, "notes": study.notes,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "scale_name": scale_name, "steps": steps, "seeds": [plan.SEED0 + i for i in range(seeds)],
        "recipe": plan.RECIPE, "teacher": str(teacher), "teacher_params": _params(teacher),
        "eval": {"images": results[study.variants[0].name][0]["images"], "k": scale.eval_k},
        "variants": variants, "findings": report.judge(study, variants), "costs": report.costs(study, variants),
        "machine": machine(), "out": str(out), "stages": stage.times,  # the teacher's, when this call trained it
    }
    rep["elapsed_s"] = time.perf_counter() - start
    (home / "study.json").write_text(json.dumps(rep, indent=2, ensure_ascii=False) + "\n")
    report.write_markdown(rep, home / "study.md")
    report.plot(rep, home / "study.png")
    _log(f"study {name}: done in {format_seconds(rep['elapsed_s'])}; {home / 'study.md'}")
    return rep
