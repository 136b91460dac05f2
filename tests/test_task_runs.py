"""CI-sized training runs of every downstream task, as users start them (`python -m dlip_ds.train`,
DeepSpeed on CPU, the shipped demo recipes with paths overridden): each task without a teacher (the
teacher's fine-tuning and the baseline) and with one (distillation), the best checkpoint kept by
evaluation during training, and the run's student read back in the task's topology."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_engine_assets

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
METRIC = {"retrieval": "r_mean", "captioning": "cider", "vqa": "accuracy"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_engine_assets(tmp_path_factory.mktemp("tasks"), train=32)


def _train(assets: Path, recipe: str, out: Path, *sets: str) -> str:
    sets = (f"student.source={assets / 'teacher'}", f"data.train_shards={assets / 'synth' / 'train'}",
            f"data.eval_shards={assets / 'synth' / 'test'}", "data.batch_size=4", "data.workers=0",
            "data.shuffle_buffer=8", "train.max_steps=3", "train.warmup_steps=1", "train.log_every=1",
            "train.eval_every=3", "student.queue_size=16" if "retrieval" in recipe else "eval.batch_size=4", *sets)
    cmd = [sys.executable, "-m", "dlip_ds.train", "--config", recipe, "--out", str(out), "--deepspeed", "zero2_fp32"]
    cmd += [a for s in sets for a in ("--set", s)]
    proc = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _losses(log: str) -> list[dict[str, float]]:
    """Each step line's terms: 'step 2/3 | loss 3.1 (itc 1.2 itm 0.7) | ...'."""
    rows = []
    for m in re.finditer(r"^step \d+/\d+ \| loss (\S+) \(([^)]*)\)", log, re.MULTILINE):
        terms = dict(zip(*[iter(m.group(2).split())] * 2))
        rows.append({"total": float(m.group(1)), **{k: float(v) for k, v in terms.items()}})
    return rows


@pytest.mark.parametrize("task", ["retrieval", "captioning", "vqa"])
def test_task_fine_tunes_without_and_with_a_teacher(assets, tmp_path, task):
    from dlip_ds.engine.checkpoint import load_run_student

    teacher_run = tmp_path / "teacher"
    log = _train(assets, f"demo-{task}-teacher", teacher_run)
    steps = _losses(log)
    own = {"retrieval": {"itc", "itm"}, "captioning": {"lm"}, "vqa": {"vqa"}}[task]
    assert len(steps) == 3 and all(set(s) - {"total"} == own for s in steps), log[-2000:]
    assert all(math.isfinite(v) for s in steps for v in s.values())
    best = json.loads((teacher_run / "best" / "best.json").read_text())
    assert best["metric"] == METRIC[task] and best["step"] == 3 and METRIC[task] in best["metrics"]
    assert "meteor" not in best["metrics"]  # the demo recipes' eval.meteor: false
    model, _ = load_run_student(teacher_run)
    assert model.cfg.decoder.enabled == (task != "retrieval")
    assert model.cfg.decoder.context == ("question" if task == "vqa" else "image")

    # distillation from the fine-tuned teacher: the task's own loss plus every KD term of the recipe
    log = _train(assets, f"demo-{task}-distill", tmp_path / "student", f"teacher.source={teacher_run / 'student'}")
    kd = {"retrieval": {"kd_repr_text", "kd_repr_fusion", "kd_logit_itc", "kd_logit_itm"},
          "captioning": {"kd_repr_decoder", "kd_logit_lm"},
          "vqa": {"kd_repr_fusion", "kd_repr_decoder", "kd_logit_lm"}}[task]
    steps = _losses(log)
    assert len(steps) == 3 and all(set(s) - {"total"} == own | kd for s in steps), log[-2000:]
    assert all(math.isfinite(v) for s in steps for v in s.values())
