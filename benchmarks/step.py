"""Throughput and time split of one distillation step: frozen teacher + ZeRO-2 student on one device.

    python benchmarks/step.py --device cuda     # teacher blip-base -> student dlip-small, 224 px, bf16
    python benchmarks/step.py --device cpu      # tiny: demo-teacher -> demo-student, 64 px (2 cores)

One process, world size 1, `ds_configs/zero2_bf16.json`, the tiny-distill KD plan (representations of
every module, cross-attention maps, ITC/ITM/LM logits), teacher in fp16 on CUDA (bf16 on CPU). Data come
from `dlip-ds synth` shards through the real loader. The model vocabulary is BERT's 30524 on CUDA
(the LM-logit KD cost depends on it; the synth captions use the low ids), the synth vocabulary on CPU.

"fused on" runs every KD loss with backend="auto" (Triton attention KD, chunked LM KD and fused
representation KD on CUDA; on CPU the chunked LM KD only); "fused off" forces backend="torch" (the
materialising references). The two settings alternate block by block on the same engine.

Time split per step, as the trainer logs it: data wait, teacher (its stage methods, synchronised),
student forward+backward (the rest of forward + backward), optimizer (engine.step). Model FLOPs per
step are counted once with torch.utils.flop_counter (teacher forward + student forward and backward);
MFU = FLOPs / step time / the device's peak dense bf16 FLOP/s (--peak-tflops, default by device).
Writes benchmarks/results/step_<device>.json and the Markdown table benchmarks/results/step_<device>.md (or --md).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

SIZES = {
    "cuda": {"teacher": "blip-base", "student": "dlip-small", "image_size": 224, "batch": 32, "vocab": 30524,
             "samples": 2048, "steps": 20, "warmup": 5},
    "cpu": {"teacher": "demo-teacher", "student": "demo-student", "image_size": 64, "batch": 8, "vocab": None,
            "samples": 256, "steps": 4, "warmup": 1},
}
# Dense bf16 tensor-core peaks (no sparsity), by device name.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def peak_tflops(device: str, given: float | None) -> float | None:
    if given:
        return given
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def set_fused(enabled: bool) -> None:
    """Point the KD plan's kernels at backend "auto" (fused where available) or "torch"."""
    from dlip_ds import kernels
    from dlip_ds.losses import distill

    for name in ("attention_kd_loss", "linear_kd_loss", "repr_kd_loss"):
        fn = getattr(kernels, name)
        setattr(distill, name, fn if enabled else functools.partial(fn, backend="torch"))


def build(size: dict, shards: Path, device: torch.device):
    """(engine, teacher, loader iterator, span timer, recipe) for the benchmark pair."""
    from dlip_ds.data import make_train_loader, tokenizer_from_config
    from dlip_ds.engine.build import initialize_engine
    from dlip_ds.engine.ds_config import resolve_ds_config
    from dlip_ds.engine.teacher import to_inference
    from dlip_ds.losses.distill import KDPlan
    from dlip_ds.models.load import load_model
    from dlip_ds.models.presets import preset_config
    from dlip_ds.models.vlp import VLPModel
    from dlip_ds.recipe import load_recipe
    from dlip_ds.tasks.pretrain import PretrainTask
    from dlip_ds.timing import SpanTimer

    recipe = load_recipe("tiny-distill", [f"data.train_shards={shards}", f"data.batch_size={size['batch']}",
                                          "data.workers=4" if device.type == "cuda" else "data.workers=1",
                                          "data.randaugment=true", f"teacher.source={size['teacher']}"])
    tokenizer = tokenizer_from_config(recipe.data)
    vocab = size["vocab"] or len(tokenizer)
    overrides = {"vision": {"image_size": size["image_size"]}, "text": {"vocab_size": vocab}}
    torch.manual_seed(0)
    teacher = load_model(size["teacher"], **overrides).requires_grad_(False).eval()
    cfg = preset_config(size["student"])
    cfg.vision.image_size, cfg.text.vocab_size = size["image_size"], vocab
    student = VLPModel(cfg)
    for term in recipe.loss.kd:  # teacher and student head counts differ: compare relation heads
        if term.kind == "attn":
            term.relation_heads = cfg.text.heads
    task = PretrainTask(student, KDPlan(recipe.loss.kd, student, teacher), recipe.loss)
    task.timer = SpanTimer(device)
    task.timer.enabled = True  # every measured step is timed, as the trainer's logging steps are
    teacher = to_inference(teacher, recipe.teacher, device)
    engine = initialize_engine(task, recipe, resolve_ds_config("zero2_bf16", recipe, world_size=1), device)
    loader = iter(make_train_loader(recipe.data, tokenizer, cfg.vision, seed=0))
    return engine, teacher, loader, task.timer, recipe


def next_batch(loader, device, dtype):
    from dlip_ds.tasks.pretrain import PretrainBatch

    return PretrainBatch.from_dict(next(loader)).to(device, dtype)


def one_step(engine, teacher, loader, timer, device, dtype, generator) -> dict:
    with timer.span("data"):
        batch = next_batch(loader, device, dtype)
    with timer.span("forward_backward"):
        result = engine(batch, teacher=teacher, generator=generator)
        engine.backward(result.loss)
    with timer.span("optimizer"):
        engine.step()
    s = timer.take()
    return {"step": s["data"] + s["forward_backward"] + s["optimizer"], "data": s["data"], "teacher": s["teacher"],
            "student": s["forward_backward"] - s["teacher"], "optimizer": s["optimizer"],
            "tokens": float(result.tokens)}


def count_flops(engine, teacher, loader, device, dtype, generator) -> float:
    """Model FLOPs of one step (teacher forward, student forward + backward), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = next_batch(loader, device, dtype)
    with FlopCounterMode(display=False) as counter:
        result = engine(batch, teacher=teacher, generator=generator)
        engine.backward(result.loss)
    engine.step()
    return float(counter.get_total_flops())


def summarise(steps: list[dict], batch: int) -> dict:
    med = statistics.median(s["step"] for s in steps)
    return {
        "step_ms_median": 1e3 * med,
        "step_ms_min": 1e3 * min(s["step"] for s in steps),
        "samples_per_s": batch / med,
        "tokens_per_s": statistics.median(s["tokens"] for s in steps) / med,
        "split_ms": {k: 1e3 * statistics.median(s[k] for s in steps) for k in ("data", "teacher", "student", "optimizer")},
        "steps": len(steps),
    }


def markdown(report: dict) -> str:
    size, when = report["sizes"], report["date"]
    lines = [
        f"### Distillation step ({report['device_name']}, {when})",
        "",
        (f"Teacher `{size['teacher']}` ({report['params']['teacher'] / 1e6:.1f}M, {report['teacher_dtype']}) -> student "
        f"`{size['student']}` ({report['params']['student'] / 1e6:.1f}M, bf16, ZeRO-2), {size['image_size']} px, "
        f"batch {size['batch']}, vocabulary {report['vocab']}, one device; torch {report['torch']}, deepspeed "
        f"{report['deepspeed']}, {report['threads']} CPU threads (load average {report['load_average_1min']:.1f}). Median of {report['results']['fused_on']['steps']} "
        "steps per setting, settings interleaved; split = median ms per step of each part. "
        f"Model FLOPs per step: {report['flops_per_step'] / 1e9:.1f} GFLOP (torch flop counter)."),
        "",
        "| KD kernels | step ms | samples/s | tokens/s | data ms | teacher ms | student fwd+bwd ms | optimizer ms | MFU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, label in (("fused_on", "fused on"), ("fused_off", "fused off (torch)")):
        r = report["results"][name]
        s = r["split_ms"]
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        lines.append(f"| {label} | {r['step_ms_median']:.1f} | {r['samples_per_s']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{s['data']:.1f} | {s['teacher']:.1f} | {s['student']:.1f} | {s['optimizer']:.1f} | {mfu} |")
    if report["device"] == "cpu":
        lines += ["", ("CPU numbers are tiny-size, bf16 on a CPU without bf16 matrix units, on a machine shared with "
                       "other jobs: they show the harness works, not speed. MFU needs a GPU peak, and on CPU "
                  "\"fused on\" differs from \"off\" only in the chunked LM-logit KD (Triton kernels are CUDA-only). "
                  "The real-size run: `python benchmarks/step.py --device cuda`.")]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, help="per-device batch (default: 32 on CUDA, 8 on CPU)")
    parser.add_argument("--steps", type=int, help="measured steps per setting")
    parser.add_argument("--rounds", type=int, default=2, help="alternating blocks per setting")
    parser.add_argument("--peak-tflops", type=float, help="device peak dense bf16 TFLOP/s for MFU")
    parser.add_argument("--json", type=Path, help="default: benchmarks/results/step_<device>.json")
    parser.add_argument("--md", type=Path, help="default: benchmarks/results/step_<device>.md")
    args = parser.parse_args()

    size = dict(SIZES[args.device])
    size["batch"] = args.batch or size["batch"]
    size["steps"] = args.steps or size["steps"]
    if args.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    from dlip_ds.data.synth import synth
    from dlip_ds.engine.distributed import init_distributed

    env = init_distributed()
    device = env.device
    with tempfile.TemporaryDirectory() as tmp:
        synth(Path(tmp) / "synth", train=size["samples"], test=1, image_size=size["image_size"], shard_size=256)
        engine, teacher, loader, timer, _ = build(size, Path(tmp) / "synth" / "train", device)
        dtype = next(engine.parameters()).dtype
        generator = torch.Generator(device=device).manual_seed(0)
        for _ in range(size["warmup"]):
            one_step(engine, teacher, loader, timer, device, dtype, generator)
        flops = count_flops(engine, teacher, loader, device, dtype, generator)
        timer.take()
        results = {"fused_on": [], "fused_off": []}
        per_block = max(1, size["steps"] // args.rounds)
        for _ in range(args.rounds):
            for name in results:
                set_fused(name == "fused_on")
                one_step(engine, teacher, loader, timer, device, dtype, generator)  # settle after a switch
                results[name] += [one_step(engine, teacher, loader, timer, device, dtype, generator)
                                  for _ in range(per_block)]
        student = engine.module.student
        params = {"teacher": sum(p.numel() for p in teacher.parameters()),
                  "student": sum(p.numel() for p in student.parameters())}
    peak = peak_tflops(args.device, args.peak_tflops)
    summary = {}
    for name, steps in results.items():
        summary[name] = summarise(steps, size["batch"])
        summary[name]["mfu"] = flops / (summary[name]["step_ms_median"] / 1e3) / (peak * 1e12) if peak else None
    report = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu: {platform.processor() or platform.machine()}",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "deepspeed": __import__("deepspeed").__version__,
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "sizes": size,
        "vocab": student.cfg.text.vocab_size,
        "teacher_dtype": str(next(teacher.parameters()).dtype).replace("torch.", ""),
        "params": params,
        "flops_per_step": flops,
        "peak_tflops": peak,
        "results": summary,
    }
    out_json = args.json or ROOT / "results" / f"step_{args.device}.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (args.md or ROOT / "results" / f"step_{args.device}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
