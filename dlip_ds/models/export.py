"""`dlip-ds export SOURCE --out DIR [--format dlip|hf-blip]`: a model (anything `load_model` takes) or a
training run's student, written as our directory format or as a transformers BLIP directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from dlip_ds.config import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a preset, an exported or transformers BLIP directory, a Salesforce BLIP .pth, "
                                  "or a training run directory (its student is exported)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", choices=("dlip", "hf-blip"), default="dlip",
                   help="dlip: config.json + model.safetensors; hf-blip: transformers BLIP (default: dlip)")
    p.add_argument("--hf-task", choices=("retrieval", "captioning", "vqa"), default="retrieval",
                   help="with --format hf-blip: BlipForImageTextRetrieval, BlipForConditionalGeneration or "
                        "BlipForQuestionAnswering (a VQA model: decoder.context=question)")
    p.add_argument("--tokenizer", default="",
                   help="tokenizer to write beside the weights (path or hub name; a training run's own by default). "
                        "hf-blip writes a BlipProcessor (BLIP's eval image transform at the model's size, mean "
                        "and std + this tokenizer), so BlipProcessor.from_pretrained(OUT) and the transformers "
                        "pipelines work; without a tokenizer only the image processor is written, with a warning")


def _is_run_dir(path: Path) -> bool:
    """A training run directory (RUN_DIR/config.yaml), as opposed to an exported model (config.json)."""
    return (path / "config.yaml").is_file() and not (path / "config.json").is_file()


def run(args: argparse.Namespace) -> int:
    from dlip_ds.models.dlip_format import save_model
    from dlip_ds.models.hf_blip import export_hf_blip
    from dlip_ds.models.load import load_model

    src = Path(args.source).expanduser()
    tokenizer = None
    if _is_run_dir(src):
        from dlip_ds.engine.checkpoint import load_run_student

        model, tokenizer = load_run_student(src)
    else:
        model = load_model(args.source)
    if args.tokenizer:
        from dlip_ds.data.text import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    if args.format == "dlip":
        save_model(model, out, tokenizer)
    else:
        export_hf_blip(model, out, tokenizer, task=args.hf_task)
    n = sum(p.numel() for p in model.parameters())
    print(f"exported {args.source} ({n / 1e6:.1f}M parameters) as {args.format} to {out}")
    return 0
