"""`dlip-ds demo [--quick] [--out DIR]`: the embedded default, end to end, on a fresh machine.

Renders synthetic shards, pretrains a small teacher, distils a student with at most a quarter of
its parameters, trains the same student without a teacher as the baseline, evaluates the three on
held-out pairs (retrieval with ITM re-ranking, captioning), profiles them and reports. Every stage
is the real one: `dlip-ds train` (DeepSpeed, in a subprocess, as a launcher would start it),
`dlip-ds evaluate`, `dlip-ds export` and `dlip_ds.profile`. Running the same command again
continues where it stopped (the runs resume from their checkpoints).

OUT/ data/ (shards, tokenizer)  runs/<name>/ (config, checkpoints, tensorboard, student)
     eval/<name>/ (metrics.json, captions.json)  student/ (the exported student)  logs/
     report.json  report.md  loss_curves.png  quality_vs_params.png
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dlip_ds.config import ConfigError

MODELS = ("teacher", "student", "baseline")
RECIPES = {"teacher": "demo-pretrain-teacher", "student": "demo-distill", "baseline": "demo-baseline"}
MAX_STUDENT_SHARE = 0.25  # the student has at most a quarter of the teacher's parameters
TARGET_SHARE = 0.95  # the paper's claim: the student keeps >= 95% of the teacher's quality


@dataclass(frozen=True)
class Scale:
    """How much the demo does; the recipes set everything else (models, losses, learning rates)."""

    train_pairs: int
    test_pairs: int
    teacher_steps: int
    student_steps: int
    batch_size: int
    warmup_steps: int
    log_every: int
    eval_k: int  # ITM re-ranks this many candidates per query
    profile_repeats: int
    profile_caption_len: int = 20  # tokens per profiled caption (BLIP's max_length)
    task_steps: int = 1500  # each fine-tuning run of `demo --task` (200 steps left VQA students at answer priors)


SCALES = {
    # Measured on a shared 2-core CPU: full 27 minutes, quick 8.5 (report.json records every stage).
    "full": Scale(train_pairs=10000, test_pairs=300, teacher_steps=3000, student_steps=3000, batch_size=32,
                  warmup_steps=150, log_every=50, eval_k=16, profile_repeats=10),
    "quick": Scale(train_pairs=6000, test_pairs=300, teacher_steps=1000, student_steps=800, batch_size=32,
                   warmup_steps=50, log_every=25, eval_k=16, profile_repeats=10, task_steps=600),
    # The test suite's run of the same code path: seconds per stage, numbers meaningless.
    "ci": Scale(train_pairs=64, test_pairs=12, teacher_steps=3, student_steps=3, batch_size=8,
                warmup_steps=1, log_every=1, eval_k=8, profile_repeats=1, profile_caption_len=8, task_steps=3),
}


# fp32 ZeRO-2: on a CPU these small models train faster and steadier in fp32 than in bf16 (measured:
# 15-30% less CPU time per step); the distillation teacher still runs in bf16 (teacher.dtype auto).
DS_CONFIG = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
             "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 1000000,
             "zero_optimization": {"stage": 2}}


class DemoError(RuntimeError):
    """A stage failed; the message says which and where its log is."""


# ----------------------------------------------------------------------------- stages


def _log(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def make_data(out: Path, scale: Scale) -> Path:
    """Synthetic shards under OUT/data (kept when a previous run of this demo wrote them)."""
    from dlip_ds.data.synth import synth

    data = out / "data"
    if (data / "test" / "manifest.json").is_file() and (data / "tokenizer").is_dir():
        _log(f"data: reusing {data}")
        return data
    _log(f"data: rendering {scale.train_pairs} training and {scale.test_pairs} held-out images into {data}")
    synth(data, train=scale.train_pairs, test=scale.test_pairs, shard_size=1000)
    return data


def train_run(name: str, out: Path, data: Path, scale: Scale, teacher: Path | None = None, *,
              recipe: str | None = None, steps: int | None = None, extra: dict | None = None) -> Path:
    """`python -m dlip_ds.train` on the demo recipe of `name` (or `recipe`); returns the run directory."""
    run_dir = out / "runs" / name
    recipe = recipe or RECIPES[name]
    steps = steps or (scale.teacher_steps if name == "teacher" else scale.student_steps)
    overrides = {
        "data.train_shards": data / "train", "data.eval_shards": data / "test", "data.tokenizer": data / "tokenizer",
        "data.batch_size": scale.batch_size, "train.max_steps": steps, "train.warmup_steps": scale.warmup_steps,
        "train.log_every": scale.log_every, "train.ckpt_every": max(steps // 2, 1), **(extra or {}),
    }
    if teacher is not None:
        overrides["teacher.source"] = teacher
    ds_config = out / "ds_config.json"
    ds_config.write_text(json.dumps(DS_CONFIG, indent=2) + "\n")
    cmd = [sys.executable, "-m", "dlip_ds.train", "--config", recipe, "--out", str(run_dir),
           "--deepspeed", str(ds_config), "--resume", "auto"]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={value}"]
    log_path = out / "logs" / f"train-{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    _log(f"{name}: {recipe} for {steps} steps -> {run_dir} (log {log_path})")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "a") as log_file:
        log_file.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            log_file.write(line)
            log_file.flush()
            if line.startswith(("step ", "starting", "resuming", "done", "stopp")):
                print(f"  {name}: {line.rstrip()}", flush=True)
        rc = proc.wait()
    if rc != 0 or not (run_dir / "student" / "config.json").is_file():
        raise DemoError(f"training the {name} failed (exit code {rc}); see {log_path}")
    return run_dir


def _cli(argv: list[str]) -> None:
    from dlip_ds.cli import main

    rc = main(argv)
    if rc != 0:
        raise DemoError(f"`dlip-ds {' '.join(argv)}` failed (exit code {rc})")


def evaluate_run(name: str, run_dir: Path, out: Path, data: Path, scale: Scale, step: int) -> dict:
    """`dlip-ds evaluate` of a run's student: retrieval with ITM re-ranking and captioning."""
    eval_dir = out / "eval" / name
    _log(f"{name}: evaluating on {data / 'test'}")
    _cli(["evaluate", str(run_dir), "--data", str(data / "test"), "--out", str(eval_dir), "--k", str(scale.eval_k),
          "--tensorboard", str(run_dir / "tensorboard"), "--step", str(step)])
    return json.loads((eval_dir / "metrics.json").read_text())


def profile_run(run_dir: Path, scale: Scale) -> dict:
    from dlip_ds.engine.checkpoint import load_run_student
    from dlip_ds.profile import profile_model

    model, _ = load_run_student(run_dir)
    return profile_model(model, repeats=scale.profile_repeats, caption_len=scale.profile_caption_len)


def loss_curves(run_dir: Path, tag: str = "loss/total") -> tuple[list[int], list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # one INFO line per event file otherwise
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return [], []
    events = acc.Scalars(tag)
    return [e.step for e in events], [e.value for e in events]


# ----------------------------------------------------------------------------- report


def summarise(metrics: dict, profile: dict) -> dict:
    """The report's entry for one model (the five headline numbers, then the details)."""
    return {
        "params": profile["params"]["total"],
        "flops": profile["flops"]["itm"],  # one image-text pair through vision and fusion (ITM re-ranking)
        "latency_ms": profile["latency_ms"]["itm"],
        "mean_recall": metrics["retrieval"]["r_mean"],
        "cider": metrics.get("captioning", {}).get("cider", float("nan")),
        "retrieval": metrics["retrieval"],
        "captioning": metrics.get("captioning", {}),
        "flops_by_task": profile["flops"],
        "latency_ms_by_task": profile["latency_ms"],
    }


def _share(a: float, b: float) -> float:
    return a / b if b else float("nan")


def compare(report: dict) -> dict:
    t, s, b = (report[m] for m in MODELS)
    return {
        "params": _share(s["params"], t["params"]),
        "flops": _share(s["flops"], t["flops"]),
        "speedup": _share(t["latency_ms"], s["latency_ms"]),
        "mean_recall": _share(s["mean_recall"], t["mean_recall"]),
        "cider": _share(s["cider"], t["cider"]),
        "keeps_95pct_of_teacher_recall": s["mean_recall"] >= TARGET_SHARE * t["mean_recall"],
        "beats_baseline_recall": s["mean_recall"] > b["mean_recall"],
        "beats_baseline_cider": s["cider"] > b["cider"],
    }


def _fmt_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def table_rows(report: dict) -> list[list[str]]:
    rows = [["model", "params", "FLOPs", "latency ms", "mean recall", "CIDEr"]]
    for m in MODELS:
        r = report[m]
        rows.append([m, _fmt_count(r["params"]), _fmt_count(r["flops"]), f"{r['latency_ms']:.2f}",
                     f"{r['mean_recall']:.2f}", f"{r['cider']:.2f}"])
    c = report["student_vs_teacher"]
    rows.append(["student/teacher", f"{100 * c['params']:.1f}%", f"{100 * c['flops']:.1f}%",
                 f"{c['speedup']:.2f}x faster", f"{100 * c['mean_recall']:.1f}%", f"{100 * c['cider']:.1f}%"])
    return rows


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def verdict(report: dict) -> str:
    c = report["student_vs_teacher"]
    keeps = "keeps" if c["keeps_95pct_of_teacher_recall"] else "does NOT keep"
    beats = "beats" if c["beats_baseline_recall"] else "does NOT beat"
    return (f"The distilled student {keeps} {100 * TARGET_SHARE:.0f}% of the teacher's mean recall "
            f"({100 * c['mean_recall']:.1f}%) with {100 * c['params']:.1f}% of its parameters and "
            f"{100 * c['flops']:.1f}% of its FLOPs, {c['speedup']:.2f}x faster, and {beats} the baseline trained "
            f"without distillation on mean recall ({report['student']['mean_recall']:.2f} vs "
            f"{report['baseline']['mean_recall']:.2f}; CIDEr {report['student']['cider']:.2f} vs "
            f"{report['baseline']['cider']:.2f}).")


def plot(report: dict, runs: dict[str, Path], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [out / "loss_curves.png", out / "quality_vs_params.png"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in MODELS:
        for ax, tag in zip(axes, ("loss/total", "loss/itc")):
            steps, values = loss_curves(runs[m], tag)
            ax.plot(steps, values, label=m)
            ax.set_title(tag)
            ax.set_xlabel("step")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in zip(axes, ("mean_recall", "cider"), ("mean recall (%)", "CIDEr")):
        for m in MODELS:
            ax.scatter(report[m]["params"] / 1e6, report[m][key], s=60, label=m)
            ax.annotate(m, (report[m]["params"] / 1e6, report[m][key]), textcoords="offset points", xytext=(5, 5))
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel(label)
        ax.set_title(f"{label} against parameters")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def machine() -> dict:
    import torch

    return {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


def write_markdown(report: dict, path: Path) -> None:
    rows = table_rows(report)
    where = (f"{report['date']}, {report['scale_name']} scale, {report['machine']['cpus']} CPUs "
             f"({report['machine']['platform']}), {report['elapsed_s'] / 60:.1f} minutes end to end "
             f"({report['cpu_s'] / 60:.1f} CPU minutes).")
    notes = ("Mean recall: BLIP's R@1/5/10 image-to-text and text-to-image averaged, ITC top-k re-ranked by ITM, "
             f"on {report['eval']['images']} held-out images (every test scene shows a colour-shape pair never "
             "seen in training). CIDEr: beam search 3, BLIP's prompt. FLOPs and latency: one image-text pair "
             "through the vision encoder and the fusion layers, batch 1, CPU.")
    md = ["# dlip_ds demo report", "", where, "",
          "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    md += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    stages = ", ".join(f"{name} {t['wall_s']:.0f} s ({t['cpu_s']:.0f} CPU s)" for name, t in report["stages"].items())
    md += ["", verdict(report), "", notes, "", f"Stages (wall, CPU): {stages}.", "",
           "![loss curves](loss_curves.png)", "", "![quality against parameters](quality_vs_params.png)", "",
           "TensorBoard: `tensorboard --logdir " + str(Path(report["out"]) / "runs") + "`", ""]
    path.write_text("\n".join(md))


# ----------------------------------------------------------------------------- the command


def _check_scale(out: Path, name: str) -> None:
    """A demo directory holds one scale: resuming a different one would mix checkpoints."""
    marker = out / "demo.json"
    if marker.is_file():
        previous = json.loads(marker.read_text()).get("scale_name")
        if previous != name:
            raise ConfigError(f"{out} holds a '{previous}' demo run; use another --out for a '{name}' run")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"scale_name": name, "scale": asdict(SCALES[name])}, indent=2) + "\n")


class Stages:
    """Wall and CPU seconds (this process and its children) per stage: on a shared machine the CPU
    time says what the run costs, the wall time what it took."""

    def __init__(self):
        self.times: dict[str, dict[str, float]] = {}

    @staticmethod
    def _cpu() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    @contextlib.contextmanager
    def __call__(self, name: str):
        wall, cpu = time.perf_counter(), self._cpu()
        yield
        self.times[name] = {"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(self._cpu() - cpu, 1)}


def pretrain_models(out: Path, scale: Scale, stage: Stages, models: tuple[str, ...] = MODELS) -> tuple[Path, dict]:
    """(data, {model: run dir}): the synthetic shards, the pretrained teacher and the distilled student
    (and the baseline), each reused when an earlier run of this demo finished it."""
    with stage("data"):
        data = make_data(out, scale)
    runs: dict[str, Path] = {}
    for m in models:
        with stage(f"train_{m}"):
            teacher = runs["teacher"] / "student" if m == "student" else None
            runs[m] = train_run(m, out, data, scale, teacher=teacher)
    return data, runs


def demo(out: str | Path, scale_name: str = "full") -> dict:
    """Run the demo into `out`; returns the report (also written as OUT/report.json)."""
    start = time.perf_counter()
    out = Path(out).resolve()
    scale = SCALES[scale_name]
    _check_scale(out, scale_name)
    stage = Stages()
    data, runs = pretrain_models(out, scale, stage)
    with stage("export"):
        _log(f"student: exporting to {out / 'student'}")
        _cli(["export", str(runs["student"]), "--out", str(out / "student")])

    report: dict = {}
    for m in MODELS:
        with stage(f"evaluate_{m}"):
            steps = scale.teacher_steps if m == "teacher" else scale.student_steps
            metrics = evaluate_run(m, runs[m], out, data, scale, steps)
        with stage(f"profile_{m}"):
            _log(f"{m}: profiling (params, FLOPs, CPU latency)")
            report[m] = summarise(metrics, profile_run(runs[m], scale))
    share = _share(report["student"]["params"], report["teacher"]["params"])
    if share > MAX_STUDENT_SHARE:
        raise DemoError(f"the student has {100 * share:.1f}% of the teacher's parameters, more than "
                        f"{100 * MAX_STUDENT_SHARE:.0f}%: check the demo recipes' presets")
    report["student_vs_teacher"] = compare(report)
    report.update({
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "scale_name": scale_name, "scale": asdict(scale), "machine": machine(), "out": str(out),
        "eval": {"images": metrics["images"], "texts": metrics["texts"], "k": scale.eval_k},
        "stages": stage.times,
    })
    with stage("report"):
        plot(report, runs, out)
    report["elapsed_s"] = time.perf_counter() - start
    report["cpu_s"] = sum(t["cpu_s"] for t in stage.times.values())
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, out / "report.md")
    return report
