"""`dlip-ds train` == `python -m dlip_ds.train`: pretrain (no teacher) or distil (a teacher in the
recipe) a student with DeepSpeed. Every process of a multi-process job runs this same command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dlip_ds.engine.ds_config import DEFAULT_DS_CONFIG


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="RECIPE",
                   help="a recipe YAML file or the name of a shipped recipe (e.g. tiny-distill)")
    p.add_argument("--deepspeed", default=DEFAULT_DS_CONFIG, metavar="DS_JSON",
                   help="DeepSpeed JSON (ZeRO stage, offload, precision), a path or a shipped name such as "
                        f"zero3_bf16 (default: {DEFAULT_DS_CONFIG})")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory (default: runs/<recipe name>)")
    p.add_argument("--resume", metavar="auto|PATH",
                   help="'auto': continue from RUN_DIR's latest checkpoint if there is one; or a checkpoint path")
    p.add_argument("--max-steps", type=int, metavar="N", help="shortcut for --set train.max_steps=N")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set data.batch_size=64 (repeatable)")
    # The deepspeed launcher appends --local_rank=N; the rank is read from the environment instead.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from dlip_ds.engine.trainer import train
    from dlip_ds.recipe import load_recipe

    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    recipe = load_recipe(args.config, overrides)
    run_dir = Path(args.out) if args.out else Path("runs") / (recipe.name or Path(args.config).stem)
    return train(recipe, run_dir, ds_config=args.deepspeed, resume=args.resume)


def main(argv: list[str] | None = None) -> int:
    from dlip_ds.config import ConfigError

    parser = argparse.ArgumentParser(prog="python -m dlip_ds.train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ConfigError as e:
        print(f"dlip-ds train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
