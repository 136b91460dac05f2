"""`dlip-ds demo --task retrieval|captioning|vqa`: the downstream half of the demo.

From the demo's pretrained teacher and distilled student (trained first when missing, exactly as
`dlip-ds demo` trains them), three fine-tuning runs of the task: the teacher alone; the student with
distillation from the fine-tuned teacher; the same student without it (the baseline). The three are
evaluated with `dlip-ds evaluate --task`, profiled side by side, and reported.

OUT/runs/<task>-{teacher,student,baseline}/   OUT/eval/<task>-<model>/
OUT/tasks/<task>/ report.json  report.md  quality.png  loss_curves.png
"""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

from dlip_ds.demo import (
    MODELS,
    SCALES,
    TARGET_SHARE,
    DemoError,
    Scale,
    Stages,
    _check_scale,
    _cli,
    _log,
    _share,
    format_table,
    loss_curves,
    machine,
    pretrain_models,
    profile_runs,
    train_run,
)

# task -> (the metric that sums it up, its name in reports, the loss curve to plot)
METRICS = {"retrieval": ("r_mean", "mean recall", "loss/itc"), "captioning": ("cider", "CIDEr", "loss/lm"),
           "vqa": ("accuracy", "VQA accuracy", "loss/vqa")}
RECIPE = {"teacher": "demo-{task}-teacher", "student": "demo-{task}-distill", "baseline": "demo-{task}-baseline"}


def fine_tune(task: str, out: Path, data: Path, scale: Scale, pretrained: dict[str, Path], stage: Stages) -> dict:
    """The three fine-tuning runs; {model: run dir}. Evaluation during training is off: the demo
    evaluates each final model once, on the held-out split."""
    runs: dict[str, Path] = {}
    for m in MODELS:
        source = pretrained["teacher" if m == "teacher" else "student"] / "student"
        teacher = runs["teacher"] / "student" if m == "student" else None
        with stage(f"train_{task}_{m}"):
            runs[m] = train_run(f"{task}-{m}", out, data, scale, teacher=teacher, recipe=RECIPE[m].format(task=task),
                                steps=scale.task_steps,
                                extra={"student.source": source, "train.eval_every": 0})
    return runs


def evaluate(task: str, name: str, run_dir: Path, out: Path, data: Path, scale: Scale) -> dict:
    """`dlip-ds evaluate --task` of a run's student: the task's metrics."""
    eval_dir = out / "eval" / name
    _log(f"{name}: evaluating {task} on {data / 'test'}")
    argv = ["evaluate", str(run_dir), "--task", task, "--data", str(data / "test"), "--out", str(eval_dir),
            "--no-meteor", "--tensorboard", str(run_dir / "tensorboard"), "--step", str(scale.task_steps)]
    if task == "retrieval":
        argv += ["--k", str(scale.eval_k)]
    _cli(argv)
    if task == "vqa":
        return json.loads((eval_dir / "vqa_metrics.json").read_text())
    return json.loads((eval_dir / "metrics.json").read_text())[task]


def _headline(task: str, prof: dict) -> str:
    """The profiled path that stands for the task: ITM scoring, captioning, answering."""
    path = {"retrieval": "itm", "captioning": "caption", "vqa": "vqa"}[task]
    return path if path in prof["flops"] else "itm"


def build_report(task: str, metrics: dict, profiles: dict) -> dict:
    key, label, _ = METRICS[task]
    report: dict = {"task": task, "metric": key, "metric_name": label}
    for m in MODELS:
        path = _headline(task, profiles[m])
        report[m] = {"params": profiles[m]["params"]["total"], "flops": profiles[m]["flops"].get(path, 0),
                     "latency_ms": profiles[m]["latency_ms"].get(path, float("nan")), "profiled": path,
                     "score": float(metrics[m][key]), "metrics": metrics[m]}
    t, s, b = (report[m] for m in MODELS)
    report["student_vs_teacher"] = {
        "params": _share(s["params"], t["params"]), "flops": _share(s["flops"], t["flops"]),
        "speedup": _share(t["latency_ms"], s["latency_ms"]), "score": _share(s["score"], t["score"]),
        "keeps_95pct": s["score"] >= TARGET_SHARE * t["score"], "beats_baseline": s["score"] > b["score"],
        "over_baseline": s["score"] - b["score"],
    }
    return report


def table(report: dict) -> list[list[str]]:
    from dlip_ds.demo import _fmt_count

    rows = [["model", "params", "FLOPs", "latency ms", report["metric_name"]]]
    for m in MODELS:
        r = report[m]
        rows.append([m, _fmt_count(r["params"]), _fmt_count(r["flops"]), f"{r['latency_ms']:.2f}", f"{r['score']:.2f}"])
    c = report["student_vs_teacher"]
    rows.append(["student/teacher", f"{100 * c['params']:.1f}%", f"{100 * c['flops']:.1f}%",
                 f"{c['speedup']:.2f}x faster", f"{100 * c['score']:.1f}%"])
    return rows


def verdict(report: dict) -> str:
    c, name = report["student_vs_teacher"], report["metric_name"]
    keeps = "keeps" if c["keeps_95pct"] else "does NOT keep"
    beats = "beats" if c["beats_baseline"] else "does NOT beat"
    return (f"{report['task']}: the student fine-tuned with distillation {keeps} {100 * TARGET_SHARE:.0f}% of the "
            f"fine-tuned teacher's {name} ({100 * c['score']:.1f}%) and {beats} the same student fine-tuned without "
            f"a teacher ({report['student']['score']:.2f} vs {report['baseline']['score']:.2f}).")


def plot(report: dict, runs: dict[str, Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in MODELS:
        steps, values = loss_curves(runs[m], METRICS[report["task"]][2])
        ax.plot(steps, values, label=m)
    ax.set(xlabel="step", ylabel="loss", title=f"{report['task']}: task loss while fine-tuning")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in MODELS:
        ax.scatter(report[m]["params"] / 1e6, report[m]["score"], s=60)
        ax.annotate(m, (report[m]["params"] / 1e6, report[m]["score"]), textcoords="offset points", xytext=(5, 5))
    ax.axhline(TARGET_SHARE * report["teacher"]["score"], ls="--", c="grey", label="95% of the teacher")
    ax.set(xlabel="parameters (M)", ylabel=report["metric_name"], title=f"{report['task']}: quality against size")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=110)
    plt.close(fig)


def write_markdown(report: dict, path: Path) -> None:
    rows = table(report)
    stages = ", ".join(f"{n} {t['wall_s']:.0f} s" for n, t in report["stages"].items())
    md = [f"# dlip_ds demo: {report['task']}", "",
          (f"{report['date']}, {report['scale_name']} scale, {report['machine']['cpus']} CPUs, "
           f"{report['elapsed_s'] / 60:.1f} minutes. Each model fine-tuned {report['scale']['task_steps']} steps "
           "from the demo's pretrained teacher / distilled student; scored on the held-out split."), "",
          "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    md += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    md += ["", verdict(report), "", f"Stages (wall): {stages}.", "", "![loss curves](loss_curves.png)", "",
           "![quality against size](quality.png)", ""]
    path.write_text("\n".join(md))


def task_demo(out: str | Path, scale_name: str, task: str) -> dict:
    start = time.perf_counter()
    out = Path(out).resolve()
    scale = SCALES[scale_name]
    _check_scale(out, scale_name)
    stage = Stages()
    data, pretrained = pretrain_models(out, scale, stage, models=("teacher", "student"))
    runs = fine_tune(task, out, data, scale, pretrained, stage)
    metrics = {}
    for m in MODELS:
        with stage(f"evaluate_{task}_{m}"):
            metrics[m] = evaluate(task, f"{task}-{m}", runs[m], out, data, scale)
    with stage(f"profile_{task}"):
        _log(f"{task}: profiling the three models (params, FLOPs, interleaved CPU latency)")
        report = build_report(task, metrics, profile_runs(runs, scale))
    report.update({"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                   "scale_name": scale_name, "scale": scale.__dict__, "machine": machine(), "out": str(out),
                   "runs": {m: str(r) for m, r in runs.items()}, "stages": stage.times})
    dest = out / "tasks" / task
    dest.mkdir(parents=True, exist_ok=True)
    plot(report, runs, dest)
    report["elapsed_s"] = time.perf_counter() - start
    (dest / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, dest / "report.md")
    return report


def run_task_demo(out: str, scale_name: str, task: str) -> int:
    import sys

    try:
        report = task_demo(out, scale_name, task)
    except DemoError as e:
        print(f"dlip-ds demo --task {task}: {e}", file=sys.stderr)
        return 1
    print()
    print(format_table(table(report)))
    print()
    print(verdict(report))
    print(f"\nreport: {Path(report['out']) / 'tasks' / task / 'report.md'}")
    return 0
