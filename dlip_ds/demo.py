"""`dlip-ds demo [--quick] [--seeds N] [--out DIR]`: the embedded default, end to end, on a fresh machine.

Renders synthetic shards, pretrains a small teacher, distils a student with at most a quarter of
its parameters, trains the same student without a teacher as the baseline, evaluates the three on
held-out pairs (retrieval with ITM re-ranking, captioning), profiles them (timed together, interleaved)
and reports. Every stage is the real one: `dlip-ds train` (DeepSpeed, in a subprocess, as a launcher
would start it), `dlip-ds evaluate`, `dlip-ds export` and `dlip_ds.profile`. Running the same command
again continues where it stopped (the runs resume from their checkpoints; finished seeds are reused).
With `--seeds N` the teacher, student and baseline are trained N times (training seeds 42, 43, ...) on
the same data; the report gives each number's mean and spread over seeds, and the verdict uses the
means. This module holds the stages and one seed's pipeline (`run_seed`); `dlip_ds.demo_cli` the
command and the report.

OUT/ data/                    the shards and tokenizer, shared by every seed
     runs/<name>/ (config, checkpoints, tensorboard, student)  eval/<name>/ (metrics.json, captions.json)
     student/ (the exported student)  logs/  seed_report.json
                              seed 0, in the single-seed layout: an earlier `dlip-ds demo`,
                              `demo --task` and `dlip-ds study` find it where they did
     seed-<i>/ runs/ eval/ student/ logs/ seed_report.json       seeds 1 .. N-1
     report.json  report.md  loss_curves.png  quality_vs_params.png   all seeds together
"""

from __future__ import annotations

import contextlib
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
BASELINE_MARGIN = 5.0  # mean-recall points by which distillation must beat the same student trained without it
SEED0 = 42  # TrainConfig's default: seed i of the demo trains with SEED0 + i (seed 0 sets nothing)
PROFILE_THREADS = 1  # latency at one torch thread: on a shared CPU, more threads wait for each other


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
    profile_repeats: int  # timed rounds per task, the three models interleaved in each
    profile_caption_len: int = 20  # tokens per profiled caption (BLIP's max_length)
    task_steps: int = 1500  # each fine-tuning run of `demo --task` (200 steps left VQA students at answer priors)
    profile_warmup: int = 3  # untimed calls per model and task before the rounds
    budget_minutes: float = 0.0  # the wall time this scale promises on 2 CPU cores (0: none)
    # Training ranks (torchrun, gloo, one torch thread and one core each; the global batch stays
    # `batch_size`): these small models use a second core far better as a second rank than as a
    # second thread of one rank (measured: 1.5x the samples/s of one 2-thread rank).
    ranks: int = 1


SCALES = {
    # Wall time on 2 CPU cores is the budget (report.json records every stage); the teacher's pretraining
    # is most of it. The student starts from the teacher's weights, so it needs fewer steps than the teacher.
    "full": Scale(train_pairs=6000, test_pairs=300, teacher_steps=650, student_steps=450, batch_size=32,
                  warmup_steps=50, log_every=25, eval_k=16, profile_repeats=30, task_steps=1500, budget_minutes=10,
                  ranks=2),
    "quick": Scale(train_pairs=6000, test_pairs=300, teacher_steps=300, student_steps=150, batch_size=32,
                   warmup_steps=25, log_every=25, eval_k=16, profile_repeats=20, task_steps=600, budget_minutes=5,
                   ranks=2),
    # The test suite's run of the same code path: seconds per stage, numbers meaningless.
    "ci": Scale(train_pairs=64, test_pairs=12, teacher_steps=3, student_steps=3, batch_size=8,
                warmup_steps=1, log_every=1, eval_k=8, profile_repeats=3, profile_caption_len=8, task_steps=3,
                profile_warmup=1),
}


# fp32 ZeRO-2: on a CPU these small models train faster and steadier in fp32 than in bf16 (measured:
# 15-30% less CPU time per step); the distillation teacher runs in bf16 where the CPU has native bf16
# (teacher.dtype auto), in fp32 elsewhere.
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
    if scale.batch_size % scale.ranks:
        raise ConfigError(f"demo scale: batch size {scale.batch_size} does not split over {scale.ranks} ranks")
    overrides = {
        "data.train_shards": data / "train", "data.eval_shards": data / "test", "data.tokenizer": data / "tokenizer",
        # 32-px images load in ~1 ms a batch: in the trainer's process, leaving its core to the compute
        "data.workers": 0, "data.batch_size": scale.batch_size // scale.ranks, "train.max_steps": steps, "train.warmup_steps": scale.warmup_steps,
        "train.log_every": scale.log_every, "train.ckpt_every": max(steps // 2, 1), **(extra or {}),
    }
    if teacher is not None:
        overrides["teacher.source"] = teacher
    ds_config = out / "ds_config.json"
    ds_config.write_text(json.dumps(DS_CONFIG, indent=2) + "\n")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={scale.ranks}"] \
        if scale.ranks > 1 else [sys.executable]
    cmd = [*launch, "-m", "dlip_ds.train", "--config", recipe, "--out", str(run_dir),
           "--deepspeed", str(ds_config), "--resume", "auto"]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={value}"]
    log_path = out / "logs" / f"train-{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    _log(f"{name}: {recipe} for {steps} steps -> {run_dir} (log {log_path})")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": "1"} if scale.ranks > 1 else {})}
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
    """`dlip-ds evaluate` of a run's student: retrieval with ITM re-ranking and captioning (CIDEr is the
    demo's caption score; METEOR, 10 s of Java per model, is left out)."""
    eval_dir = out / "eval" / name
    _log(f"{name}: evaluating on {data / 'test'}")
    _cli(["evaluate", str(run_dir), "--data", str(data / "test"), "--out", str(eval_dir), "--k", str(scale.eval_k),
          "--no-meteor", "--tensorboard", str(run_dir / "tensorboard"), "--step", str(step)])
    return json.loads((eval_dir / "metrics.json").read_text())


def profile_three(models: list, scale: Scale) -> list[dict]:
    """`profile_models` of the teacher, student and baseline together (their timed calls interleaved
    round by round, so that load from other jobs falls on all three alike), at PROFILE_THREADS torch
    threads; with the load average before and after, which says how quiet the machine was."""
    import torch

    from dlip_ds.profile import profile_models

    threads, load = torch.get_num_threads(), os.getloadavg()[0]
    torch.set_num_threads(PROFILE_THREADS)
    try:
        results = profile_models(models, repeats=scale.profile_repeats, warmup=scale.profile_warmup,
                                 caption_len=scale.profile_caption_len)
    finally:
        torch.set_num_threads(threads)
    for r in results:
        r["load_average"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    return results


def profile_runs(runs: dict[str, Path], scale: Scale) -> dict[str, dict]:
    from dlip_ds.engine.checkpoint import load_run_student

    return dict(zip(MODELS, profile_three([load_run_student(runs[m])[0] for m in MODELS], scale)))


def loss_curves(run_dir: Path, tag: str = "loss/total") -> tuple[list[int], list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # one INFO line per event file otherwise
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return [], []
    events = acc.Scalars(tag)
    return [e.step for e in events], [e.value for e in events]


# ----------------------------------------------------------------------------- one seed's report

PROFILED = "itm"  # the headline FLOPs and latency: one image-text pair through vision and fusion (ITM)
HEADLINE = ("params", "flops", "latency_ms", "cpu_ms", "mean_recall", "cider")


def summarise(metrics: dict, profile: dict) -> dict:
    """The report's entry for one model (the headline numbers, then the details)."""
    return {
        "params": profile["params"]["total"],
        "flops": profile["flops"][PROFILED],
        "latency_ms": profile["latency_ms"][PROFILED],  # median wall time over the interleaved rounds
        "cpu_ms": profile["cpu_ms"][PROFILED],  # median CPU time per call (one thread: what it costs a core)
        "mean_recall": metrics["retrieval"]["r_mean"],
        "cider": metrics.get("captioning", {}).get("cider", float("nan")),
        "latency_stats_ms": profile["latency_stats_ms"][PROFILED],  # spread over the rounds
        "cpu_stats_ms": profile["cpu_stats_ms"][PROFILED],
        "retrieval": metrics["retrieval"],
        "captioning": metrics.get("captioning", {}),
        "flops_by_task": profile["flops"],
        "latency_ms_by_task": profile["latency_ms"],
        "cpu_ms_by_task": profile["cpu_ms"],
        "profile_load_average": profile.get("load_average"),
    }


def _share(a: float, b: float) -> float:
    return a / b if b else float("nan")


def compare(report: dict) -> dict:
    t, s, b = (report[m] for m in MODELS)
    return {
        "params": _share(s["params"], t["params"]),
        "flops": _share(s["flops"], t["flops"]),
        "speedup": _share(t["latency_ms"], s["latency_ms"]),
        "speedup_cpu": _share(t["cpu_ms"], s["cpu_ms"]),
        "mean_recall": _share(s["mean_recall"], t["mean_recall"]),
        "cider": _share(s["cider"], t["cider"]),
        "keeps_95pct_of_teacher_recall": s["mean_recall"] >= TARGET_SHARE * t["mean_recall"],
        "keeps_95pct_of_teacher_cider": s["cider"] >= TARGET_SHARE * t["cider"],
        "beats_baseline_recall": s["mean_recall"] > b["mean_recall"],
        "recall_over_baseline": s["mean_recall"] - b["mean_recall"],
        "beats_baseline_by_margin": s["mean_recall"] - b["mean_recall"] >= BASELINE_MARGIN,
        "beats_baseline_cider": s["cider"] > b["cider"],
        # One architecture, two sets of weights: how far apart the measurement puts them (1 = agree).
        "student_over_baseline_latency": _share(s["latency_ms"], b["latency_ms"]),
        "student_over_baseline_cpu": _share(s["cpu_ms"], b["cpu_ms"]),
    }


def _fmt_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU's model name with its family/model numbers (two "AMD EPYC" can differ by a generation
    and 40% in these timings), from /proc/cpuinfo where there is one."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines()[:30] if ":" in line)
    except OSError:
        return platform.processor() or platform.machine()
    info = {k.strip(): v.strip() for k, v in info.items()}
    family = f" (family {info['cpu family']}, model {info['model']})" if "cpu family" in info and "model" in info else ""
    return info.get("model name", platform.machine()) + family


def machine() -> dict:
    import torch

    from dlip_ds.engine.teacher import cpu_has_native_bf16

    return {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpu_model": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": cpu_has_native_bf16(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


def machine_text(m: dict) -> str:
    """e.g. '2 CPUs (AMD EPYC (family 25, model 1), AVX2)' for the reports' first lines."""
    cpu = ", ".join(x for x in (m.get("cpu_model"), m.get("cpu_capability")) if x) or m.get("platform", "")
    return f"{m['cpus']} CPUs ({cpu})"


# ----------------------------------------------------------------------------- the pipeline


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


def seed_dir(out: Path, seed: int) -> Path:
    """Where seed `seed` of the demo in `out` lives: seed 0 in `out` itself (the single-seed layout)."""
    return out if seed == 0 else out / f"seed-{seed}"


def pretrain_models(out: Path, scale: Scale, stage: Stages, models: tuple[str, ...] = MODELS,
                    seed: int = 0) -> tuple[Path, dict]:
    """(data, {model: run dir}): the synthetic shards (OUT/data, one set for every seed), the pretrained
    teacher and the distilled student (and the baseline) of seed `seed`, each reused when an earlier run
    of this demo finished it."""
    home, prefix = seed_dir(out, seed), "" if seed == 0 else f"seed-{seed}/"
    with stage(prefix + "data"):
        data = make_data(out, scale)
    home.mkdir(parents=True, exist_ok=True)
    extra = {"train.seed": SEED0 + seed} if seed else None
    runs: dict[str, Path] = {}
    for m in models:
        with stage(f"{prefix}train_{m}"):
            teacher = runs["teacher"] / "student" if m == "student" else None
            runs[m] = train_run(m, home, data, scale, teacher=teacher, extra=extra)
    return data, runs


def finished_seed(out: Path, scale: Scale, seed: int) -> dict | None:
    """The seed's report when an earlier call wrote it after the three runs finished (so that a second
    `--seeds N` call measures only the seeds still missing); None otherwise."""
    from dlip_ds.engine.checkpoint import LATEST, tag_for

    path = seed_dir(out, seed) / "seed_report.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    for m in MODELS:
        run = seed_dir(out, seed) / "runs" / m
        latest, student = run / "checkpoints" / LATEST, run / "student" / "config.json"
        steps = scale.teacher_steps if m == "teacher" else scale.student_steps
        if not (latest.is_file() and latest.read_text().strip() == tag_for(steps) and student.is_file()
                and student.stat().st_mtime < path.stat().st_mtime and "cpu_stats_ms" in report.get(m, {})):
            return None
    return report


def run_seed(out: Path, scale: Scale, seed: int, stage: Stages) -> dict:
    """One seed of the demo: the three trained (or resumed), the student exported, the three evaluated
    and profiled together. Returns the seed's report (with its stages' times), also written as <seed
    dir>/seed_report.json; a seed finished by an earlier call is not measured again (`reused` in the
    returned report; delete its seed_report.json to measure it anew)."""
    home, prefix = seed_dir(out, seed), "" if seed == 0 else f"seed-{seed}/"
    report = finished_seed(out, scale, seed)
    if report is not None:
        _log(f"seed {seed}: reusing {home / 'seed_report.json'} (its three runs are finished)")
        return {**report, "reused": True}
    earlier = set(stage.times)
    data, runs = pretrain_models(out, scale, stage, seed=seed)
    with stage(prefix + "export"):
        _log(f"student: exporting to {home / 'student'}")
        _cli(["export", str(runs["student"]), "--out", str(home / "student")])
    metrics = {}
    for m in MODELS:
        with stage(f"{prefix}evaluate_{m}"):
            steps = scale.teacher_steps if m == "teacher" else scale.student_steps
            metrics[m] = evaluate_run(m, runs[m], home, data, scale, steps)
    with stage(prefix + "profile"):
        _log(f"profiling the three (params, FLOPs, CPU latency: {scale.profile_repeats} interleaved rounds)")
        profiles = profile_runs(runs, scale)
    report = {m: summarise(metrics[m], profiles[m]) for m in MODELS}
    share = _share(report["student"]["params"], report["teacher"]["params"])
    if share > MAX_STUDENT_SHARE:
        raise DemoError(f"the student has {100 * share:.1f}% of the teacher's parameters, more than "
                        f"{100 * MAX_STUDENT_SHARE:.0f}%: check the demo recipes' presets")
    report["student_vs_teacher"] = compare(report)
    report.update({"seed": seed, "train_seed": SEED0 + seed, "dir": str(home),
                   "runs": {m: str(r) for m, r in runs.items()},
                   "eval": {"images": metrics["teacher"]["images"], "texts": metrics["teacher"]["texts"],
                            "k": scale.eval_k},
                   "stages": {k: t for k, t in stage.times.items() if k not in earlier}})
    (home / "seed_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
