"""`dlip-ds demo [--quick] [--seeds N] [--task TASK] [--out DIR]`: the command and its report. The stages
and one seed's pipeline are `dlip_ds.demo`; the downstream half (`--task`) is `dlip_ds.demo_tasks`.

OUT/report.json: per model the mean over seeds of each number of the seeds' reports (headline numbers,
retrieval and captioning metrics, FLOPs and latencies per task), `spread` (std, min, max and the per-seed
values of every headline number) and `latency_rounds` (each seed's median, quartiles and min/max over
its timed rounds); `student_vs_teacher` (from the means: the verdict's numbers); `per_seed` (the seeds'
reports, as in each seed's seed_report.json); the wall and CPU time of every stage and in total.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

from dlip_ds.config import ConfigError
from dlip_ds.demo import (
    BASELINE_MARGIN,
    HEADLINE,
    MODELS,
    PROFILE_THREADS,
    PROFILED,
    SCALES,
    SEED0,
    TARGET_SHARE,
    DemoError,
    Stages,
    _check_scale,
    _fmt_count,
    _log,
    compare,
    format_table,
    loss_curves,
    machine,
    machine_text,
    run_seed,
    seed_dir,
)
from dlip_ds.demo_tasks import run_task_demo

DETAILS = ("retrieval", "captioning", "flops_by_task", "latency_ms_by_task", "cpu_ms_by_task")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a smoke run: about 5 minutes on a 2-core CPU, its teacher far "
                   "from trained (the default scale: 9-11)")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="train the teacher, student and baseline N times (training seeds 42, 43, ...; one data set) "
                        "and report each number's mean and spread; seed 0 in OUT, seed i in OUT/seed-i (default 1)")
    p.add_argument("--out", default="demo_out", help="report directory (default: demo_out)")
    p.add_argument("--task", choices=("retrieval", "captioning", "vqa"), default=None,
                   help="the downstream demo: fine-tune the pretrained demo teacher on the task, then the distilled "
                        "student with distillation from it and without, and compare the three (OUT/tasks/TASK)")
    p.add_argument("--ci", action="store_true", help=argparse.SUPPRESS)  # the test suite's seconds-long run


# ----------------------------------------------------------------------------- the seeds together


def _spread(values: list[float]) -> dict:
    return {"std": statistics.stdev(values) if len(values) > 1 else 0.0, "min": min(values), "max": max(values),
            "values": values}


def _mean(values: list) -> float:
    return statistics.fmean(values) if all(math.isfinite(v) for v in values) else float("nan")


def aggregate(seed_reports: list[dict]) -> dict:
    """The seeds' reports (`run_seed`) as one: per model the mean of every number over the seeds, the
    spread of the headline numbers, each seed's latency rounds; the comparisons from the means."""
    report: dict = {"seeds": len(seed_reports), "train_seeds": [r["train_seed"] for r in seed_reports]}
    for m in MODELS:
        entries = [r[m] for r in seed_reports]
        report[m] = {key: _mean([e[key] for e in entries]) for key in HEADLINE}
        for key in ("params", "flops"):  # one architecture: the same counts in every seed
            report[m][key] = round(report[m][key])
        for detail in DETAILS:
            report[m][detail] = {k: _mean([e[detail][k] for e in entries]) for k in entries[0][detail]}
        report[m]["spread"] = {key: _spread([e[key] for e in entries]) for key in HEADLINE}
        report[m]["latency_rounds"] = {"wall_ms": [e["latency_stats_ms"] for e in entries],
                                       "cpu_ms": [e["cpu_stats_ms"] for e in entries]}
    report["student_vs_teacher"] = compare(report)
    report["eval"] = seed_reports[0]["eval"]
    report["per_seed"] = seed_reports
    return report


def demo(out: str | Path, scale_name: str = "full", seeds: int = 1) -> dict:
    """Run the demo into `out` for `seeds` training seeds; returns the report (also OUT/report.json)."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    start = time.perf_counter()
    out = Path(out).resolve()
    scale = SCALES[scale_name]
    _check_scale(out, scale_name)
    stage = Stages()
    seed_reports = []
    for seed in range(seeds):
        if seeds > 1:
            done = time.perf_counter() - start
            eta = f", about {done / seed * (seeds - seed) / 60:.0f} min to go" if seed else ""
            _log(f"seed {seed} ({seed + 1} of {seeds}; training seed {SEED0 + seed}, in {seed_dir(out, seed)}){eta}")
        seed_reports.append(run_seed(out, scale, seed, stage))
    report = aggregate(seed_reports)
    report.update({
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "scale_name": scale_name, "scale": asdict(scale), "machine": machine(), "out": str(out),
        "latency_method": {"path": PROFILED, "rounds": scale.profile_repeats, "warmup": scale.profile_warmup,
                           "torch_threads": PROFILE_THREADS, "interleaved": True},
        "stages": stage.times,
    })
    with stage("report"):
        plot(report, out)
    report["elapsed_s"] = time.perf_counter() - start
    report["cpu_s"] = sum(t["cpu_s"] for t in stage.times.values())
    report["total"] = {"wall_s": round(report["elapsed_s"], 1), "cpu_s": round(report["cpu_s"], 1)}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, out / "report.md")
    return report


# ----------------------------------------------------------------------------- the report


def _pm(r: dict, key: str, digits: int, seeds: int) -> str:
    """`mean ± std` over seeds (the value alone for one seed)."""
    cell = f"{r[key]:.{digits}f}"
    return cell + (f" ± {r['spread'][key]['std']:.{digits}f}" if seeds > 1 else "")


def table_rows(report: dict) -> list[list[str]]:
    n = report["seeds"]
    rows = [["model", "params", "FLOPs", "latency ms", "CPU ms", "mean recall", "CIDEr"]]
    for m in MODELS:
        r = report[m]
        rows.append([m, _fmt_count(r["params"]), _fmt_count(r["flops"]), _pm(r, "latency_ms", 2, n),
                     _pm(r, "cpu_ms", 2, n), _pm(r, "mean_recall", 2, n), _pm(r, "cider", 2, n)])
    c = report["student_vs_teacher"]
    rows.append(["student/teacher", f"{100 * c['params']:.1f}%", f"{100 * c['flops']:.1f}%",
                 f"{c['speedup']:.2f}x faster", f"{c['speedup_cpu']:.2f}x faster", f"{100 * c['mean_recall']:.1f}%",
                 f"{100 * c['cider']:.1f}%"])
    return rows


def verdict(report: dict) -> str:
    c, n = report["student_vs_teacher"], report["seeds"]
    keeps = "keeps" if c["keeps_95pct_of_teacher_recall"] else "does NOT keep"
    keeps_cider = "keeps" if c["keeps_95pct_of_teacher_cider"] else "does NOT keep"
    beats = ("beats" if c["beats_baseline_by_margin"] else "beats, by less than the "
             f"{BASELINE_MARGIN:.0f} points aimed at," if c["beats_baseline_recall"] else "does NOT beat")
    over = f" (means over {n} training seeds)" if n > 1 else ""
    return (f"The distilled student {keeps} {100 * TARGET_SHARE:.0f}% of the teacher's mean recall "
            f"({100 * c['mean_recall']:.1f}%) and {keeps_cider} {100 * TARGET_SHARE:.0f}% of its CIDEr "
            f"({100 * c['cider']:.1f}%) with {100 * c['params']:.1f}% of its parameters and "
            f"{100 * c['flops']:.1f}% of its FLOPs, {c['speedup_cpu']:.2f}x faster in CPU time per call "
            f"({c['speedup']:.2f}x in wall time), and {beats} the baseline trained without distillation on mean "
            f"recall ({report['student']['mean_recall']:.2f} vs {report['baseline']['mean_recall']:.2f}, "
            f"{c['recall_over_baseline']:+.2f} points; CIDEr {report['student']['cider']:.2f} vs "
            f"{report['baseline']['cider']:.2f}){over}." + budget_line(report))


def budget_line(report: dict) -> str:
    """Whether the run kept the wall time its scale promises (with more seeds: per seed)."""
    budget = report.get("scale", {}).get("budget_minutes") or 0
    if not budget or "elapsed_s" not in report:
        return ""
    per_seed = report["elapsed_s"] / 60 / report["seeds"]
    kept = "within" if per_seed <= budget else "OVER"
    each = " per seed" if report["seeds"] > 1 else ""
    return f" It took {per_seed:.1f} minutes{each}, {kept} the {budget:.0f} minutes this scale aims at."


def plot(report: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [out / "loss_curves.png", out / "quality_vs_params.png"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, tag in zip(axes, ("loss/total", "loss/itc")):
        for k, m in enumerate(MODELS):
            for i, seed in enumerate(report["per_seed"]):  # one line per seed, one colour per model
                steps, values = loss_curves(Path(seed["runs"][m]), tag)
                ax.plot(steps, values, color=f"C{k}", alpha=1.0 if i == 0 else 0.5, label=m if i == 0 else None)
        ax.set(title=tag, xlabel="step")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in zip(axes, ("mean_recall", "cider"), ("mean recall (%)", "CIDEr")):
        for k, m in enumerate(MODELS):
            x, y = report[m]["params"] / 1e6, report[m][key]
            ax.errorbar(x, y, yerr=report[m]["spread"][key]["std"], fmt="o", ms=8, capsize=4, color=f"C{k}")
            ax.annotate(m, (x, y), textcoords="offset points", xytext=(6, -14 if m == "baseline" else 6))  # apart
        ax.axhline(TARGET_SHARE * report["teacher"][key], ls="--", color="grey",
                   label=f"{100 * TARGET_SHARE:.0f}% of the teacher")
        ax.set(xlabel="parameters (M)", ylabel=label, title=f"{label} against parameters"
               + (f" (mean ± std, {report['seeds']} seeds)" if report["seeds"] > 1 else ""))
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def latency_lines(report: dict) -> list[str]:
    """The latency section: each model's spread over the timed rounds, per seed, and how far apart the
    measurement puts the student and the baseline (one architecture)."""
    lm, c = report["latency_method"], report["student_vs_teacher"]
    md = ["## Latency", "",
          (f"One image-text pair through vision and fusion (ITM), batch 1, {lm['torch_threads']} torch thread; the "
          f"three models timed interleaved over {lm['rounds']} rounds (order rotated each round, each timed call "
          f"right after an untimed one of the same model) after {lm['warmup']} warm-up call(s) each. Wall: what a "
          "caller waits. CPU: the calling thread's CPU time, "
          "what the call costs an idle core; it holds when other jobs share the machine, wall time does not."), "",
          "| model | seed | wall ms: median | IQR | min-max | CPU ms: median | IQR | min-max | load average |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in MODELS:
        for seed, e in zip(report["per_seed"], (s[m] for s in report["per_seed"])):
            w, u, load = e["latency_stats_ms"], e["cpu_stats_ms"], e.get("profile_load_average") or ["?", "?"]
            md.append(f"| {m} | {seed['seed']} | {w['median']:.2f} | {w['q1']:.2f}-{w['q3']:.2f} | "
                      f"{w['min']:.2f}-{w['max']:.2f} | {u['median']:.2f} | {u['q1']:.2f}-{u['q3']:.2f} | "
                      f"{u['min']:.2f}-{u['max']:.2f} | {load[0]} -> {load[1]} |")
    per_seed = ", ".join(f"{s['student_vs_teacher']['student_over_baseline_latency']:.3f}/"
                         f"{s['student_vs_teacher']['student_over_baseline_cpu']:.3f}" for s in report["per_seed"])
    md += ["", (f"Same architecture, different weights: student/baseline {c['student_over_baseline_latency']:.3f} "
               f"in wall time, {c['student_over_baseline_cpu']:.3f} in CPU time (1 = agree; per seed, wall/CPU: "
               f"{per_seed})."), ""]
    return md


def seed_lines(report: dict) -> list[str]:
    """Each seed's quality numbers, the spread behind the means."""
    head = " | ".join(f"{m} {k}" for m in MODELS for k in ("recall", "CIDEr"))
    md = ["## Seeds", "", f"| seed | training seed | {head} |", "|---:|---:|" + "---:|" * 2 * len(MODELS)]
    for s in report["per_seed"]:
        cells = " | ".join(f"{s[m][k]:.2f}" for m in MODELS for k in ("mean_recall", "cider"))
        md.append(f"| {s['seed']} | {s['train_seed']} | {cells} |")
    md.append("| min-max | | " + " | ".join(f"{report[m]['spread'][k]['min']:.2f}-{report[m]['spread'][k]['max']:.2f}"
                                         for m in MODELS for k in ("mean_recall", "cider")) + " |")
    return md + [""]


def write_markdown(report: dict, path: Path) -> None:
    rows, n = table_rows(report), report["seeds"]
    where = (f"{report['date']}, {report['scale_name']} scale, {machine_text(report['machine'])}, "
             f"{report['elapsed_s'] / 60:.1f} minutes end to end "
             f"({report['cpu_s'] / 60:.1f} CPU minutes)"
             + (f", {n} training seeds ({', '.join(map(str, report['train_seeds']))}): mean ± standard deviation."
                if n > 1 else "."))
    notes = ("Mean recall: BLIP's R@1/5/10 image-to-text and text-to-image averaged, ITC top-k re-ranked by ITM, "
             f"on {report['eval']['images']} held-out images (every test scene shows a colour-shape pair never "
             "seen in training). CIDEr: beam search 3, BLIP's prompt. FLOPs and latency: one image-text pair "
             "through the vision encoder and the fusion layers, batch 1, CPU (below).")
    md = ["# dlip_ds demo report", "", where, "", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    md += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    stages = ", ".join(f"{name} {t['wall_s']:.0f} s ({t['cpu_s']:.0f} CPU s)" for name, t in report["stages"].items())
    md += ["", verdict(report), "", notes, ""] + (seed_lines(report) if n > 1 else []) + latency_lines(report)
    total = report["total"]
    reused = [str(s["seed"]) for s in report["per_seed"] if s.get("reused")]
    if reused:  # their stage times are in their own reports, from the call that measured them
        stages += f"; seed(s) {', '.join(reused)} reused from an earlier call (report.json: per_seed[].stages)"
    md += [f"Stages (wall, CPU): {stages}; total {total['wall_s']:.0f} s ({total['cpu_s']:.0f} CPU s).", "",
           "![loss curves](loss_curves.png)", "", "![quality against parameters](quality_vs_params.png)", "",
           f"TensorBoard: `tensorboard --logdir {Path(report['out']) / 'runs'}`", ""]
    path.write_text("\n".join(md))


# ----------------------------------------------------------------------------- the command


def run(args: argparse.Namespace) -> int:
    scale_name = "ci" if args.ci else "quick" if args.quick else "full"
    if args.task:
        if args.seeds != 1:
            raise ConfigError(f"--seeds applies to the pretraining demo, not to --task {args.task} (got --seeds "
                              f"{args.seeds})")
        return run_task_demo(args.out, scale_name, args.task)
    try:
        report = demo(args.out, scale_name, seeds=args.seeds)
    except DemoError as e:
        print(f"dlip-ds demo: {e}", file=sys.stderr)
        return 1
    print()
    print(format_table(table_rows(report)))
    print()
    print(verdict(report))
    print(f"\nreport: {Path(report['out']) / 'report.md'} (report.json, loss_curves.png, quality_vs_params.png); "
          f"exported student: {Path(report['out']) / 'student'}; "
          f"TensorBoard: tensorboard --logdir {Path(report['out']) / 'runs'}")
    return 0
