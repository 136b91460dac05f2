"""Image captioning fine-tuning (BLIP's `BLIP_Decoder`), distilled when a KD plan is given.

The image encoder and the decoder only: the decoder reads [DEC] + prompt + caption, the prompt ("a
picture of ", data.prompt) is masked out of the targets, and the LM loss is label-smoothed
(loss.label_smoothing, 0.1 as BLIP). The KD plan may read the vision and decoder states and the token
distributions; the LM loss and the `lm` logit term share one chunked pass over the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dlip_ds.losses.kd_inputs import KDInputs, KDMasks
from dlip_ds.tasks.base import TaskBatch, TaskOutput
from dlip_ds.tasks.pretrain import PretrainTask, _dtype


@dataclass
class CaptioningBatch(TaskBatch):
    pixel_values: Tensor  # [B, 3, H, W]
    lm_input_ids: Tensor  # [B, L] [DEC] + prompt + caption
    lm_attention_mask: Tensor  # [B, L]
    lm_labels: Tensor  # [B, L] padding and prompt at -100


class CaptioningTask(PretrainTask):
    name = "captioning"
    batch_type = CaptioningBatch
    metric = "cider"
    kd_keys = ("vision", "decoder", "lm")

    def __init__(self, student, plan, loss_cfg):
        self.check_model(student.cfg.decoder.enabled, "the captioning task needs a decoder (decoder.enabled=true)")
        self.check_model(loss_cfg.lm > 0, f"loss.lm={loss_cfg.lm}: the captioning task trains the LM loss (set "
                                          "loss.lm > 0)")
        self.check_model(loss_cfg.itc == 0 and loss_cfg.itm == 0 and loss_cfg.itc_soft_targets == "none",
                         "the captioning task trains the LM loss only: set loss.itc=0, loss.itm=0 and "
                         "loss.itc_soft_targets=none")
        super().__init__(student, plan, loss_cfg)
        # A captioner reads neither the ITC/ITM heads nor the momentum copies: nothing trains them.
        for name in ("itc", "itm_head", "momentum"):
            if hasattr(student, name):
                getattr(student, name).requires_grad_(False)
        if not student.cfg.decoder.share:  # a standalone decoder reads no text-encoder weight either
            student.text.requires_grad_(False)
            student.fusion.requires_grad_(False)
        else:  # the shared decoder reads every text weight but the text encoder's own self-attention
            for layer in student.text.layers:
                layer.self_attn.requires_grad_(False)

    def compute(self, batch: CaptioningBatch, teacher, generator) -> TaskOutput:
        """Returns the loss `lm` and each model's KD inputs: vision taps, decoder taps, LM head inputs."""
        teacher = teacher if self.plan is not None else None
        s_req, t_req = self.plan.tap_requests() if self.plan is not None else ({}, {})
        t_image = None
        if teacher is not None:
            with torch.no_grad(), self.timer.span("teacher"):
                t_image = teacher.encode_image(batch.pixel_values.to(_dtype(teacher)), t_req.get("vision"))
        s_image = self.student.encode_image(batch.pixel_values.to(_dtype(self.student)), s_req.get("vision"))
        out = TaskOutput(losses={}, weights={}, tokens=batch.lm_attention_mask.sum(),
                         student=KDInputs(taps={"vision": s_image.taps}),
                         teacher=KDInputs(taps={"vision": t_image.taps}) if t_image is not None else None,
                         masks=KDMasks())
        out.losses["lm"] = self._language_model(batch, s_image, t_image, teacher, t_req, s_req, out)
        out.weights["lm"] = self.loss_cfg.lm
        return out
