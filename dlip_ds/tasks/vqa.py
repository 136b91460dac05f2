"""Visual question answering fine-tuning (BLIP's `BLIP_VQA`), distilled when a KD plan is given.

The question is encoded with cross-attention to the image ([ENC] first: `fuse`), and the answer
decoder, starting from [DEC], cross-attends to the question states. The loss is BLIP's: each distinct
answer's label-smoothed LM loss summed over its tokens, weighted by its share of the annotators'
answers (`answer_weights`), summed over the answers and divided by the number of questions. The KD plan
may read the vision states, the question states (`fusion`), the answer decoder's states (`decoder`, its
self-attention too: its cross-attention keys are question tokens, padded) and the answer
distributions (`lm`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dlip_ds.config import ConfigError, ModelConfig
from dlip_ds.losses.kd_inputs import KDInputs, KDMasks, LMHeadInputs
from dlip_ds.losses.pretrain import IGNORE_INDEX
from dlip_ds.models.vlp import VLPModel
from dlip_ds.models.vqa import is_vqa
from dlip_ds.tasks.base import Task, TaskBatch, TaskOutput
from dlip_ds.tasks.pretrain import _dtype


@dataclass
class VQABatch(TaskBatch):
    pixel_values: Tensor  # [B, 3, H, W], one row per question
    question_input_ids: Tensor  # [B, Lq] [ENC] first
    question_attention_mask: Tensor  # [B, Lq]
    answer_input_ids: Tensor  # [A, La] [DEC] first, [SEP] last
    answer_attention_mask: Tensor  # [A, La]
    answer_labels: Tensor  # [A, La] answer_input_ids with padding at -100
    answer_weights: Tensor  # [A] each answer's share of its question's annotator answers
    answer_counts: Tensor  # [B] distinct answers per question; question b's rows are consecutive


@dataclass
class _Side:
    """One model's pass: its KD inputs and the answer decoder's LM head inputs."""

    kd: KDInputs
    head: LMHeadInputs


class VQATask(Task):
    name = "vqa"
    batch_type = VQABatch
    stream = "vqa"
    metric = "accuracy"
    kd_keys = ("vision", "fusion", "decoder", "lm")

    def __init__(self, student, plan, loss_cfg):
        super().__init__(student, plan, loss_cfg)
        cfg = student.cfg
        self.check_model(is_vqa(cfg),
                         "the vqa task needs BLIP's VQA topology (an answer decoder reading the question: "
                         "decoder.context=question); start from student.source, which the task converts")
        # BLIP_VQA has no ITC/ITM heads; ours are kept (unused) for the export, and nothing trains them
        student.itc.requires_grad_(False)
        student.itm_head.requires_grad_(False)
        for i, r in enumerate(plan.terms if plan is not None else ()):
            self.check_model(not (r.term.kind == "attn" and r.term.attn == "cross" and r.term.module == "decoder"),
                             f"loss.kd[{i}]: cross-attention KD of the answer decoder is not supported (its keys "
                             "are padded question tokens); distil its states (repr) or self-attention instead")

    @classmethod
    def student_config(cls, cfg: ModelConfig) -> ModelConfig:
        from dlip_ds.models.vqa import vqa_config

        return vqa_config(cfg)

    @classmethod
    def adapt_student(cls, model: VLPModel) -> VLPModel:
        from dlip_ds.models.vqa import to_vqa_model

        return to_vqa_model(model)

    @classmethod
    def check_teacher(cls, teacher: VLPModel, where: str) -> None:
        if not is_vqa(teacher.cfg):
            raise ConfigError(f"{where}: the vqa task distils from a VQA model (BLIP_VQA's topology, "
                              "decoder.context=question): fine-tune the teacher on VQA first (task: vqa, no teacher)")

    def compute(self, batch: VQABatch, teacher, generator) -> TaskOutput:
        """Returns the loss `vqa` and each model's KD inputs (vision, fusion = question states, decoder =
        answer decoder states, lm = answer distributions)."""
        teacher = teacher if self.plan is not None else None
        s_req, t_req = self.plan.tap_requests() if self.plan is not None else ({}, {})
        t = None
        if teacher is not None:
            with torch.no_grad(), self.timer.span("teacher"):
                t = self._run(teacher, batch, t_req)
        s = self._run(self.student, batch, s_req)
        q_pad, labels = batch.question_attention_mask == 0, batch.answer_labels
        masks = KDMasks(fusion=q_pad, decoder=batch.answer_attention_mask == 0,
                        # position j predicts label j + 1; the last position predicts nothing
                        lm=F.pad(labels[:, 1:] == IGNORE_INDEX, (0, 1), value=True))
        if t is not None and self.plan.needs("lm"):
            s.kd.lm, t.kd.lm = s.head, t.head
        tokens = batch.question_attention_mask.sum() + batch.answer_attention_mask.sum()
        return TaskOutput(losses={"vqa": self._answer_loss(s.head, batch)}, weights={"vqa": 1.0}, tokens=tokens,
                          student=s.kd, teacher=t.kd if t is not None else None, masks=masks)

    @staticmethod
    def _run(model, batch: VQABatch, req: dict) -> _Side:
        """Image, question and answer decoder of one model; each question's states repeated for its answers."""
        image = model.encode_image(batch.pixel_values.to(_dtype(model)), req.get("vision"))
        q_mask = batch.question_attention_mask
        question = model.fuse(image.embeds, batch.question_input_ids, q_mask, req.get("fusion"))
        rows = torch.repeat_interleave(torch.arange(q_mask.shape[0], device=q_mask.device), batch.answer_counts)
        answer = model.decode(question.hidden[rows], batch.answer_input_ids, batch.answer_attention_mask,
                              req.get("decoder"), context_mask=q_mask[rows])
        head = LMHeadInputs(model.lm_features(answer.hidden), *model.lm_projection())
        kd = KDInputs(taps={"vision": image.taps, "fusion": question.taps, "decoder": answer.taps})
        return _Side(kd, head)

    def _answer_loss(self, head: LMHeadInputs, batch: VQABatch) -> Tensor:
        """BLIP_VQA's loss. Answers are a few tokens long, so their logits ([A, La, V]) are formed whole."""
        logits = F.linear(head.features[:, :-1], head.weight, head.bias).float()
        ce = F.cross_entropy(logits.transpose(1, 2), batch.answer_labels[:, 1:], reduction="none",
                             ignore_index=IGNORE_INDEX, label_smoothing=self.loss_cfg.label_smoothing)
        per_answer = ce.sum(dim=1)  # [A]
        return (batch.answer_weights.float() * per_answer).sum() / batch.question_input_ids.shape[0]
