"""`dlip-ds study NAME [--quick] [--out DIR] [--seeds N]`: the DLIP paper's findings, measured on the demo.

Each study trains a set of students against the same teacher (the demo's pretrained teacher, on the
demo's synthetic data: shared with `dlip-ds demo` when OUT is the demo's directory), scores them with
`dlip-ds evaluate` as the demo does, and writes OUT/studies/NAME/study.{json,md,png}: a table of the
variants and, beside each of the paper's findings, the direction this run measured.

  modules      compress vision, text or fusion by the same factor; vary the fusion layers
  decoder      captioning with the decoder distilled (repr decoder + logit lm) or not
  information  representation vs attention, unimodal vs multimodal KD terms (and their cost)
  init         vision / text encoders initialised from the teacher's layers vs random

The variants (`plan.py`) are `--set` overrides on the demo-distill recipe. Running the same command
again continues: finished runs and evaluations are reused.
"""

from __future__ import annotations

import argparse
import sys

from dlip_ds.studies.plan import STUDIES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", choices=STUDIES, help=f"the study: {', '.join(STUDIES)}")
    p.add_argument("--quick", action="store_true", help="short runs: under 15 minutes per study on a 2-core CPU "
                                                        "once the demo's quick teacher exists")
    p.add_argument("--out", default="demo_out", help="the demo directory whose data and teacher the study uses "
                                                     "(default: demo_out); results go to OUT/studies/NAME")
    p.add_argument("--seeds", type=int, default=1, metavar="N", help="train each variant N times (seeds 42, 43, ...); "
                                                                     "the table gives mean ± standard deviation")
    p.add_argument("--ci", action="store_true", help=argparse.SUPPRESS)  # the test suite's seconds-long run


def run(args: argparse.Namespace) -> int:
    from dlip_ds.demo import DemoError
    from dlip_ds.studies.report import console_text
    from dlip_ds.studies.runner import run_study

    scale_name = "ci" if args.ci else "quick" if args.quick else "full"
    try:
        rep = run_study(args.name, args.out, scale_name, seeds=args.seeds)
    except DemoError as e:
        print(f"dlip-ds study: {e}", file=sys.stderr)
        return 1
    print()
    print(console_text(rep))
    print(f"\nreport: {rep['out']}/studies/{args.name}/study.md (study.json, study.png)")
    return 0
