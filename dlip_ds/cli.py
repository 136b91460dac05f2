"""`dlip-ds`: the front door. One small function per subcommand; each delegates to its module."""

from __future__ import annotations

import argparse
import sys

SUBCOMMANDS = {
    "synth": ("dlip_ds.data.synth", "render a synthetic image-text set as shards"),
    "prepare": ("dlip_ds.data.prepare", "write webdataset shards from annotations, tables, folders or shards"),
    "inspect": ("dlip_ds.data.inspect", "stream shards through the real pipeline and report"),
    "train": ("dlip_ds.train", "pretrain or distil a model with DeepSpeed"),
    "evaluate": ("dlip_ds.eval.cli", "retrieval, captioning and VQA metrics"),
    "export": ("dlip_ds.models.export", "export a run or model (dlip format or transformers BLIP)"),
    "profile": ("dlip_ds.profile", "parameters, FLOPs and latency of models"),
    "demo": ("dlip_ds.demo_cli", "the embedded default: synth, pretrain, distil, evaluate, profile (--task: fine-tune)"),
    "study": ("dlip_ds.studies", "the paper's findings as studies on the demo: modules, decoder, information, init"),
}


def _lazy_module(name: str):
    import importlib

    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (e.name == name or name.startswith(e.name + ".")):
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlip-ds", description=__doc__.splitlines()[0].split(": ", 1)[1])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = _lazy_module(module)
        if mod is not None and hasattr(mod, "add_arguments"):
            mod.add_arguments(p)
        p.set_defaults(_module=module, _name=name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    mod = _lazy_module(args._module)
    if mod is None or not hasattr(mod, "run"):
        print(f"dlip-ds {args._name}: not yet available in this version", file=sys.stderr)
        return 2
    from dlip_ds.config import ConfigError

    try:
        return int(mod.run(args) or 0)
    except ConfigError as e:
        print(f"dlip-ds {args._name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
