"""The demo's latency: do two models of one architecture measure alike?

    python benchmarks/demo_latency.py                          # the demo presets, random weights
    python benchmarks/demo_latency.py --models demo_out/runs   # a demo's trained teacher/student/baseline

The demo's student and baseline share an architecture (`demo-student`), so their latency ratio should
be 1; anything else is measurement error. Each run measures the three models (teacher, student,
baseline) with both methods, the two methods alternating from run to run:
- `before`: what the demo did until issue 11: `profile_model` on each model in turn (10 timed calls
  after 1 warm-up, the process's torch threads), median wall time;
- `now`: `dlip_ds.demo.profile_three` as the demo runs it: `profile_models` with the three interleaved
  round by round (order rotated, each timed call after an untimed one, GC paused), SCALES["full"]'s
  rounds and warm-up, one torch thread; its median wall time and median CPU time per call. Odd runs
  pass the student and the baseline in swapped order, so that a bias of the method by position shows.
Per run and task the student/baseline ratio of each measure; the summary is the worst |ratio - 1| over
runs. Writes benchmarks/results/demo_latency.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
MODELS = ("teacher", "student", "baseline")


def load(models_dir: str) -> list:
    from dlip_ds.models.load import load_model

    if models_dir:  # a demo's OUT/runs (<model>/student) or a folder of exported models (<model>/)
        root = Path(models_dir)
        return [load_model(root / m / "student" if (root / m / "student").is_dir() else root / m) for m in MODELS]
    models = []
    for k, preset in enumerate(("demo-teacher", "demo-student", "demo-student")):
        torch.manual_seed(k)  # the student and the baseline: one architecture, different weights
        models.append(load_model(preset))
    return models


def before(models: list) -> dict:
    from dlip_ds.demo import SCALES
    from dlip_ds.profile import profile_model

    results = [profile_model(m, repeats=10, warmup=1, caption_len=SCALES["full"].profile_caption_len) for m in models]
    return {"wall": [r["latency_ms"] for r in results]}


def now(models: list, swap: bool = False) -> dict:
    from dlip_ds.demo import SCALES, profile_three

    order = [0, 2, 1] if swap else [0, 1, 2]
    results = profile_three([models[i] for i in order], SCALES["full"])
    results = [results[order.index(i)] for i in range(3)]  # back to teacher, student, baseline
    return {"wall": [r["latency_ms"] for r in results], "cpu": [r["cpu_ms"] for r in results],
            "wall_iqr": [{t: [s["q1"], s["q3"]] for t, s in r["latency_stats_ms"].items()} for r in results]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="teacher/, student/, baseline/ (exported models or demo runs)")
    parser.add_argument("--runs", type=int, default=5, help="runs of each method (alternating)")
    parser.add_argument("--out", default=str(ROOT / "results" / "demo_latency"))
    args = parser.parse_args()
    from dlip_ds.demo import PROFILE_THREADS, SCALES

    models = load(args.models)
    runs = []
    for k in range(args.runs):
        order = (("before", before), ("now", now)) if k % 2 == 0 else (("now", now), ("before", before))
        for name, method in order:
            load_before, t0 = os.getloadavg()[0], time.perf_counter()
            result = method(models, swap=True) if name == "now" and k % 2 else method(models)
            runs.append({"run": k, "method": name, "seconds": round(time.perf_counter() - t0, 1),
                         "student_baseline_swapped": name == "now" and k % 2 == 1,
                         "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)], **result})
            ratios = {kind: {t: round(result[kind][1][t] / result[kind][2][t], 3) for t in result[kind][1]}
                      for kind in ("wall", "cpu") if kind in result}
            runs[-1]["student_over_baseline"] = ratios
            print(f"run {k + 1}/{args.runs} {name}: student/baseline {ratios} ({runs[-1]['seconds']} s, "
                  f"load {runs[-1]['load_average']})", flush=True)

    summary = []
    for name, kind in (("before", "wall"), ("now", "wall"), ("now", "cpu")):
        for task in ("itc", "itm", "caption"):
            values = [r["student_over_baseline"][kind][task] for r in runs if r["method"] == name]
            summary.append({"method": name, "measure": kind, "task": task, "ratios": values,
                            "median_ratio": statistics.median(values),
                            "worst_abs_dev": max(abs(v - 1) for v in values)})
    result = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "process_torch_threads": torch.get_num_threads(),
                    "profile_threads": PROFILE_THREADS},
        "models": args.models or "presets demo-teacher, demo-student x2 (random weights, seeds 0, 1, 2)",
        "now_rounds": SCALES["full"].profile_repeats, "now_warmup": SCALES["full"].profile_warmup,
        "summary": summary, "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    loads = [v for r in runs for v in r["load_average"]]
    md = [(f"{result['date']}, {result['machine']['processor']}, {result['machine']['cpus']} CPUs, torch "
          f"{result['machine']['torch']}; models: {result['models']}; load average {min(loads):.1f}-{max(loads):.1f} "
          f"during the runs. {args.runs} runs of each method, alternating."), "",
          "| method | measure | task | student/baseline per run | median | worst abs(ratio - 1) |",
          "|---|---|---|---|---:|---:|"]
    for s in summary:
        md.append(f"| {s['method']} | {s['measure']} | {s['task']} | {', '.join(f'{v:.3f}' for v in s['ratios'])} | "
                  f"{s['median_ratio']:.3f} | {100 * s['worst_abs_dev']:.1f}% |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
