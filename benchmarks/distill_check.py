"""A short real-size distillation per precision: does the shipped recipe train on this machine?

Runs `blip-distill-dlip-small` (random `blip-base` teacher, 224-px synthetic shards, a 30522-word
vocabulary, the recipe's KD terms) for `--steps` optimizer steps under each DeepSpeed config given,
exactly as `python -m dlip_ds.train` runs it, and reports per config: the loss over the first and
last few steps (it must go down), samples/s, the fp16 loss scale and skipped steps, peak device
memory. Results: benchmarks/results/distill_check_<device>.json and .md.

    python benchmarks/distill_check.py --device cuda --configs zero2_fp16 zero2_bf16   # on a GPU
    python benchmarks/distill_check.py --device cpu --steps 4 --batch 2 --configs zero2_bf16
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
VOCAB_WORDS = 30522


def make_data(root: Path, samples: int) -> Path:
    from dlip_ds.data.synth import synth

    synth(root / "synth", train=samples, test=2, image_size=224, shard_size=256)
    words = [w for w in (root / "synth" / "tokenizer" / "vocab.txt").read_text().split("\n") if w]
    (root / "tokenizer").mkdir()
    filler = [f"[unused{i}]" for i in range(VOCAB_WORDS - len(words))]
    (root / "tokenizer" / "vocab.txt").write_text("\n".join(words + filler) + "\n")
    return root


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for events in sorted((run_dir / "tensorboard").glob("events.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def run_config(data: Path, out: Path, config: str, args) -> dict:
    sets = [f"data.train_shards={data / 'synth' / 'train'}", "data.eval_shards=",
            f"data.tokenizer={data / 'tokenizer'}", f"data.batch_size={args.batch}", f"data.workers={args.workers}",
            "data.shuffle_buffer=256", "teacher.source=blip-base", "student.init.vision=random",
            f"train.max_steps={args.steps}", "train.warmup_steps=2", "train.log_every=1", "train.ckpt_every=100000",
            "train.eval_every=0"]
    cmd = [sys.executable, "-m", "dlip_ds.train", "--config", "blip-distill-dlip-small", "--deepspeed", config,
           "--out", str(out), *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if args.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{config}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"config": config, "ok": False, "error": (proc.stdout + proc.stderr)[-2000:]}
    s = scalars(out)
    loss = [s["loss/total"][k] for k in sorted(s["loss/total"])]
    k = max(1, min(5, len(loss) // 3))
    first, last = statistics.mean(loss[:k]), statistics.mean(loss[-k:])
    rate = s.get("throughput/samples_per_s", {})
    return {"config": config, "ok": True, "steps": len(loss), "loss_first": first, "loss_last": last,
            "loss_down": last < first, "samples_per_s": statistics.median(list(rate.values())[1:] or rate.values()),
            "loss_scale_last": s["train/loss_scale"][max(s["train/loss_scale"])],
            "skipped_steps": s["train/skipped_steps"][max(s["train/skipped_steps"])],
            "peak_memory_gib": max(s["memory/peak_gib"].values())}


def markdown(report: dict) -> str:
    lines = [f"### Real-size distillation check ({report['device_name']}, {report['date']})", "",
             (f"`blip-distill-dlip-small`, random `blip-base` teacher, 224 px, vocabulary {VOCAB_WORDS} + 2, "
              f"batch {report['batch']} per device, {report['steps']} steps, one device."), "",
             "| DeepSpeed config | loss first -> last | down | samples/s | loss scale | skipped steps | peak GiB |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in report["results"]:
        if not r["ok"]:
            lines.append(f"| {r['config']} | failed: see the JSON | | | | | |")
            continue
        lines.append(f"| {r['config']} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} | {'yes' if r['loss_down'] else 'NO'} "
                     f"| {r['samples_per_s']:.1f} | {r['loss_scale_last']:.0f} | {r['skipped_steps']:.0f} "
                     f"| {r['peak_memory_gib']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--configs", nargs="+", default=["zero2_fp16", "zero2_bf16"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=6)
    p.add_argument("--samples", type=int, default=1024)
    args = p.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp) / "data", args.samples)
        results = [run_config(data, Path(tmp) / "runs" / c, c, args) for c in args.configs]
    report = {"device": args.device, "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
              "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "batch": args.batch, "steps": args.steps, "results": results}
    out = ROOT / "results" / f"distill_check_{args.device}"
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(r["ok"] and r["loss_down"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
