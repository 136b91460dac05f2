"""Evaluation during training: the task's metrics of the student as it is now, and the best so far.

Rank 0 evaluates an fp32 copy of the student (every rank takes part in gathering ZeRO-3 shards for
it); the metric the task names (`Task.metric`: mean recall, CIDEr, VQA accuracy) picks the best
evaluation, whose model is written to RUN_DIR/best in the exported-model format with `best.json`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dlip_ds.config import Recipe
from dlip_ds.engine.checkpoint import student_from_state
from dlip_ds.engine.distributed import DistEnv, barrier

BEST_DIR, BEST_FILE = "best", "best.json"


def load_eval_data(recipe: Recipe, stream: str):
    """What evaluation reads: the evaluation set of image-text pairs (retrieval, captioning), or for
    VQA the shards themselves (streamed) and the answer list when ranking."""
    from dlip_ds.data import load_eval_set

    if stream != "vqa":
        return load_eval_set(recipe.data.eval_shards, max_words=recipe.data.max_words)
    answers = None
    if recipe.eval.vqa_mode == "rank":
        from dlip_ds.data import load_answer_list

        answers = load_answer_list(recipe.eval.answer_list or recipe.data.eval_shards)
    return {"shards": recipe.data.eval_shards, "answer_list": answers}


def _evaluate(task: str, model, data, tokenizer, recipe: Recipe, device) -> dict:
    ev = recipe.eval
    if task == "vqa":
        from dlip_ds.eval.vqa import evaluate_vqa

        metrics, _ = evaluate_vqa(model, data["shards"], tokenizer, answer_list=data["answer_list"], k=ev.vqa_k,
                                  num_beams=ev.num_beams, batch_size=ev.batch_size, data_cfg=recipe.data,
                                  device=device, rank=0, world_size=1, progress=False)
        return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    if task == "captioning":
        from dlip_ds.eval.captioning import CaptionSettings, evaluate_captioning

        settings = CaptionSettings(num_beams=ev.num_beams, max_length=ev.max_length, min_length=ev.min_length,
                                   prompt=recipe.data.prompt, meteor=ev.meteor)
        metrics, _ = evaluate_captioning(model, data, tokenizer, settings=settings, batch_size=ev.batch_size,
                                         device=device, rank=0, world_size=1, progress=False)
        return metrics
    from dlip_ds.eval.retrieval import evaluate_retrieval

    return evaluate_retrieval(model, data, tokenizer, k=ev.k, batch_size=ev.batch_size, device=device, rank=0,
                              world_size=1, progress=False)


def evaluate_all_ranks(task: str, student, data, tokenizer, recipe: Recipe, env: DistEnv, *, zero3: bool):
    """Collective: (metrics, the evaluated fp32 copy) on rank 0; ({}, None) on the other ranks."""
    import deepspeed

    metrics, model = {}, None
    with deepspeed.zero.GatheredParameters(list(student.parameters()), enabled=zero3):
        if env.is_main:
            state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    if env.is_main:
        model = student_from_state(student.cfg, state, "the training student").to(env.device)
        metrics = _evaluate(task, model, data, tokenizer, recipe, env.device)
    barrier()
    return metrics, model


class BestKeeper:
    """RUN_DIR/best: the evaluated model with the highest `metric` so far (rank 0 only). Written to a
    temporary directory and swapped in, so RUN_DIR/best is always a whole model; `best.json` records
    the step and every metric, and lets a resumed run go on comparing against it."""

    def __init__(self, run_dir: Path, metric: str):
        self.dir, self.metric = run_dir / BEST_DIR, metric
        found = self.dir / BEST_FILE
        self.best = json.loads(found.read_text()) if found.is_file() else None

    def offer(self, step: int, metrics: dict, model, tokenizer) -> bool:
        """Keep `model` when its metric beats the best so far; True when it did."""
        from dlip_ds.models.dlip_format import save_model

        if self.metric not in metrics:
            raise KeyError(f"evaluation gave no '{self.metric}' (got {sorted(metrics)})")
        value = float(metrics[self.metric])
        if self.best is not None and value <= self.best["value"]:
            return False
        tmp = self.dir.with_name(BEST_DIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(model.cpu(), tmp, tokenizer)
        self.best = {"step": step, "metric": self.metric, "value": value, "metrics": metrics}
        (tmp / BEST_FILE).write_text(json.dumps(self.best, indent=2) + "\n")
        old = self.dir.with_name(BEST_DIR + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if self.dir.exists():
            self.dir.rename(old)
        tmp.rename(self.dir)
        shutil.rmtree(old, ignore_errors=True)
        return True
