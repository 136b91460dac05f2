"""The shipped downstream recipes at their real sizes: COCO retrieval (384 px), COCO captioning (384 px)
and VQAv2 (480 px) for dlip-small, each with its distillation plan against a random blip-base teacher of
the task's topology, the student built from a random dlip-small pretraining student as `student.source`
(position embeddings resized from 224 px), 30524 ids. One forward and backward of the task in fp32 on a
batch of two: every term of the recipe present and finite, gradients reaching the student, nothing
trainable left without a gradient. The engine around the task is the pretraining one, run at real size
by tests/test_real_size.py; the task runs through DeepSpeed in tests/test_task_runs.py."""

from __future__ import annotations

import math

import pytest
import torch

VOCAB = 30524


def _batch(task: str, image_size: int, g: torch.Generator) -> dict:
    pixels = torch.randn(2, 3, image_size, image_size, generator=g)
    ids = torch.randint(1000, VOCAB - 2, (2, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    if task == "vqa":
        answers = torch.randint(1000, VOCAB - 2, (3, 5), generator=g)
        answers[:, 0], answers[:, -1] = 30522, 102  # [DEC] ... [SEP]
        return {"pixel_values": pixels, "question_input_ids": ids, "question_attention_mask": mask,
                "answer_input_ids": answers, "answer_attention_mask": torch.ones_like(answers),
                "answer_labels": answers.clone(), "answer_weights": torch.tensor([0.6, 0.4, 1.0]),
                "answer_counts": torch.tensor([2, 1])}
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # [DEC] + "a picture of"
    return {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask, "itm_input_ids": ids,
            "lm_input_ids": ids, "lm_attention_mask": mask, "lm_labels": labels,
            "image_ids": torch.tensor([7, 9])}


@pytest.mark.slow
@pytest.mark.parametrize("recipe_name", ["coco-retrieval-dlip-small", "coco-captioning-dlip-small", "vqav2-dlip-small"])
def test_downstream_recipe_at_real_size(recipe_name, monkeypatch):
    from dlip_ds.engine import checkpoint
    from dlip_ds.engine.build import student_from_source
    from dlip_ds.losses.distill import KDPlan
    from dlip_ds.models.load import load_model
    from dlip_ds.models.vlp import VLPModel
    from dlip_ds.recipe import load_recipe
    from dlip_ds.tasks import task_class

    torch.manual_seed(0)
    recipe = load_recipe(recipe_name)
    recipe.student.model.text.vocab_size = VOCAB  # what fit_to_tokenizer sets from bert-base-uncased
    cls = task_class(recipe.task)
    pretrained = load_model("dlip-small", text={"vocab_size": VOCAB})  # the distilled pretraining student
    monkeypatch.setattr(checkpoint, "load_source_model", lambda source: pretrained)
    student = student_from_source(recipe, cls).train()
    size = recipe.student.overrides["vision"]["image_size"]
    assert student.cfg.vision.image_size == size and student.vision.pos_embed.shape[1] == (size // 16) ** 2 + 1
    teacher_cfg = cls.student_config(load_model("blip-base", vision={"image_size": size}).cfg)
    teacher = VLPModel(teacher_cfg).eval().requires_grad_(False)  # the fine-tuned BLIP of the task
    cls.check_teacher(teacher, "teacher")
    plan = KDPlan(recipe.loss.kd, student, teacher)
    task = cls(student, plan, recipe.loss)

    result = task(_batch(recipe.task, size, torch.Generator().manual_seed(0)), teacher=teacher)
    raw = {k[4:]: v.item() for k, v in result.terms.items() if k.startswith("raw/")}
    own = {"retrieval": {"itc", "itm"}, "captioning": {"lm"}, "vqa": {"vqa"}}[recipe.task]
    assert set(raw) == own | {r.name for r in plan.terms}, raw
    assert all(math.isfinite(v) for v in raw.values()), raw
    result.loss.backward()
    missing = [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:10]
    print(f"{recipe_name}: student {sum(p.numel() for p in student.parameters()) / 1e6:.1f}M, terms {raw}")
