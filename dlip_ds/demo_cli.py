"""`dlip-ds demo [--quick] [--task TASK] [--out DIR]`: the embedded default (`dlip_ds.demo`) and its
downstream half (`dlip_ds.demo_tasks`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dlip_ds.demo import DemoError, demo, format_table, table_rows, verdict
from dlip_ds.demo_tasks import run_task_demo


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a shorter run: under 10 minutes on a 2-core CPU")
    p.add_argument("--out", default="demo_out", help="report directory (default: demo_out)")
    p.add_argument("--task", choices=("retrieval", "captioning", "vqa"), default=None,
                   help="the downstream demo: fine-tune the pretrained demo teacher on the task, then the distilled "
                        "student with distillation from it and without, and compare the three (OUT/tasks/TASK)")
    p.add_argument("--ci", action="store_true", help=argparse.SUPPRESS)  # the test suite's seconds-long run


def run(args: argparse.Namespace) -> int:
    scale_name = "ci" if args.ci else "quick" if args.quick else "full"
    if args.task:
        return run_task_demo(args.out, scale_name, args.task)
    try:
        report = demo(args.out, scale_name)
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
