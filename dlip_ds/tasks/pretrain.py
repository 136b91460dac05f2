"""BLIP pretraining (ITC, ITM with hard negatives, LM), distilled when a KD plan is given.

The data flow of one step (design card section 3):

  teacher stage 1 (no grad) -> student stage 1 -> ITC -> pair plan (hard negatives, drawn once)
  -> teacher stage 2 (no grad) and student stage 2 on the same pairs -> losses + KD inputs

The student runs only through its own stage methods (submodule calls, so ZeRO-3 hooks gather its
parameters). Its LM projection (`student.lm_projection()`, the tied word embedding and the LM
bias) is used outside the modules that own it: under ZeRO-3 the engine registers both with
`deepspeed.zero.register_external_parameter(task, p)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dlip_ds.kernels.linear_ce import linear_ce_kd_loss, linear_cross_entropy
from dlip_ds.losses.kd_inputs import ItcSims, KDInputs, KDMasks, LMHeadInputs
from dlip_ds.losses.pretrain import (
    IGNORE_INDEX,
    FeatureQueue,
    PairPlan,
    gather_features,
    itc_loss,
    itc_targets,
    itm_loss,
    sample_hard_negatives,
    soft_targets,
    world_info,
)
from dlip_ds.models.vlp import EncoderOutput
from dlip_ds.tasks.base import Task, TaskBatch, TaskOutput


@dataclass
class PretrainBatch(TaskBatch):
    pixel_values: Tensor  # [B, 3, H, W]
    input_ids: Tensor  # [B, L] [CLS] first (ITC)
    attention_mask: Tensor  # [B, L]
    itm_input_ids: Tensor | None = None  # [ENC] first; read when fusing
    lm_input_ids: Tensor | None = None  # [DEC] first; read when decoding
    lm_attention_mask: Tensor | None = None  # the decoder rows' own mask (a prompt makes them longer)
    lm_labels: Tensor | None = None  # lm_input_ids with padding and prompt at -100
    image_ids: Tensor | None = None  # [B]


@dataclass
class Encoded:
    """Stage 1 of one model."""

    image: EncoderOutput
    text: EncoderOutput
    temp: Tensor  # fp32 scalar

    def local_sims(self) -> Tensor:
        """[B, B] image-text similarities within this rank's batch, in fp32."""
        return self.image.feat.float() @ self.text.feat.float().T / self.temp


def _dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


class PretrainTask(Task):
    name = "pretrain"
    batch_type = PretrainBatch

    def __init__(self, student, plan, loss_cfg):
        super().__init__(student, plan, loss_cfg)
        cfg = student.cfg
        self.check_model(loss_cfg.itm == 0 or cfg.fusion.layers > 0,
                         "loss.itm > 0 but the student has no fusion layers (set loss.itm=0)")
        self.check_model(loss_cfg.lm == 0 or cfg.decoder.enabled,
                         "loss.lm > 0 but the student has no decoder (set loss.lm=0)")
        self.queue = None
        if loss_cfg.itc_soft_targets == "momentum":
            self.check_model(cfg.momentum, "loss.itc_soft_targets=momentum needs student.momentum=true")
            self.queue = FeatureQueue(cfg.embed_dim, cfg.queue_size)

    def compute(self, batch: PretrainBatch, teacher, generator) -> TaskOutput:
        """Returns losses `itc` (always), `itm` (when fusing: loss.itm > 0 or a fusion/itm KD term),
        `lm` (when loss.lm > 0), and each model's KD inputs: vision and text taps and ITC
        similarities; fusion taps and ITM logits on the pair plan; decoder taps and LM head inputs."""
        cfg = self.loss_cfg
        teacher = self._teacher_in_use(teacher)
        s_req, t_req = self.plan.tap_requests() if self.plan is not None else ({}, {})
        t = None
        if teacher is not None:
            with torch.no_grad(), self.timer.span("teacher"):
                t = self._encode(teacher, batch.pixel_values.to(_dtype(teacher)), batch, t_req)
        pixels = batch.pixel_values.to(_dtype(self.student))  # a bf16/fp16 engine does not cast inputs
        s = self._encode(self.student, pixels, batch, s_req)

        out = TaskOutput(losses={}, weights={}, tokens=batch.attention_mask.sum(),
                         student=KDInputs(taps={"vision": s.image.taps, "text": s.text.taps}),
                         teacher=KDInputs(taps={"vision": t.image.taps, "text": t.text.taps}) if t else None,
                         masks=KDMasks(text=batch.attention_mask == 0))
        out.losses["itc"], out.weights["itc"] = self._contrastive(batch, pixels, s, t, out), cfg.itc
        if self._runs("fusion", cfg.itm, "itm"):
            pairs = self._pair_plan(batch, s, t, generator)
            out.losses["itm"], out.weights["itm"] = self._match(batch, pairs, s, t, teacher, t_req, s_req, out), cfg.itm
        if self._runs("decoder", cfg.lm, "lm"):
            lm = self._language_model(batch, s.image, t.image if t else None, teacher, t_req, s_req, out)
            if lm is not None:
                out.losses["lm"], out.weights["lm"] = lm, cfg.lm
        return out

    # ------------------------------------------------------------------ what runs

    def _teacher_in_use(self, teacher):
        cfg = self.loss_cfg
        if teacher is None:
            if self.plan is not None or cfg.itc_soft_targets == "teacher":
                raise ValueError("this step distils (loss.kd or loss.itc_soft_targets=teacher) but no teacher was given")
            return None
        reads_teacher = (self.plan is not None or cfg.itc_soft_targets == "teacher"
                         or cfg.hard_negatives_from == "teacher")
        return teacher if reads_teacher else None

    def _runs(self, module: str, loss_weight: float, logit: str) -> bool:
        plan = self.plan
        return loss_weight > 0 or (plan is not None and (plan.needs(module) or plan.needs(logit)))

    def _distils(self, *keys: str) -> bool:
        return self.plan is not None and any(self.plan.needs(k) for k in keys)

    @staticmethod
    def _encode(model, pixels: Tensor, batch: PretrainBatch, taps: dict) -> Encoded:
        image = model.encode_image(pixels, taps.get("vision"))
        text = model.encode_text(batch.input_ids, batch.attention_mask, taps.get("text"))
        return Encoded(image, text, model.temperature().float())

    # ------------------------------------------------------------------ ITC

    def _contrastive(self, batch: PretrainBatch, pixels: Tensor, s: Encoded, t: Encoded | None,
                     out: TaskOutput) -> Tensor:
        """ITC: local queries against the keys of every rank, in fp32 whatever the training dtype
        ([B, B * world] is small). Soft targets from the momentum model (BLIP) or the teacher."""
        cfg = self.loss_cfg
        img, txt = s.image.feat.float(), s.text.feat.float()
        image_all, text_all = gather_features(img), gather_features(txt)
        ids_all = gather_features(batch.image_ids) if batch.image_ids is not None else None
        key_ids = ids_all if cfg.itc_same_image else None
        out.student.itc = ItcSims(img @ text_all.T / s.temp, txt @ image_all.T / s.temp)
        if self.queue is not None:
            sims, targets, tgt_i2t, tgt_t2i = self._momentum_keys(batch, pixels, img, txt, s.temp, ids_all, key_ids)
        else:
            sims = out.student.itc
            targets = self._targets(batch, key_ids, text_all.shape[0])
            tgt_i2t = tgt_t2i = targets
        if t is not None:
            with torch.no_grad():
                t_img, t_txt = t.image.feat.float(), t.text.feat.float()
                out.teacher.itc = ItcSims(t_img @ gather_features(t_txt).T / t.temp,
                                          t_txt @ gather_features(t_img).T / t.temp)
            if cfg.itc_soft_targets == "teacher":
                tgt_i2t = soft_targets(out.teacher.itc.i2t, targets, self.alpha())
                tgt_t2i = soft_targets(out.teacher.itc.t2i, targets, self.alpha())
        return itc_loss(sims.i2t, sims.t2i, tgt_i2t, tgt_t2i)

    def alpha(self) -> float:
        """The weight of the soft ITC targets at this step: loss.alpha, ramped linearly from 0 over
        loss.alpha_warmup_steps optimizer steps as BLIP's pretrain.py does over two epochs."""
        cfg = self.loss_cfg
        if cfg.alpha_warmup_steps <= 0:
            return cfg.alpha
        return cfg.alpha * min(1.0, self.step / cfg.alpha_warmup_steps)

    def _targets(self, batch: PretrainBatch, key_ids: Tensor | None, num_keys: int) -> Tensor:
        """Hard targets: this rank's queries sit at offset rank * B among the gathered keys."""
        b = batch.input_ids.shape[0]
        query_ids = batch.image_ids if key_ids is not None else None
        return itc_targets(query_ids, key_ids, num_keys, world_info()[0] * b, b, device=batch.input_ids.device)

    def _momentum_keys(self, batch, pixels, img, txt, temp, ids_all, key_ids):
        """BLIP's momentum distillation: the student's queries meet the momentum model's keys (the
        batch and the queue), and the targets mix in the momentum model's own similarities."""
        with torch.no_grad():
            feats = self.student.momentum_itc_features(pixels, batch.input_ids, batch.attention_mask)
            img_m, txt_m = (f.float() for f in feats)
            img_m_all, txt_m_all = gather_features(img_m), gather_features(txt_m)
            q_img, q_txt, q_ids = self.queue.keys()
            img_keys, txt_keys = torch.cat([img_m_all, q_img]), torch.cat([txt_m_all, q_txt])
        sims = ItcSims(img @ txt_keys.T / temp, txt @ img_keys.T / temp)
        if key_ids is not None:
            key_ids = torch.cat([key_ids, q_ids])
        targets = self._targets(batch, key_ids, txt_keys.shape[0])
        with torch.no_grad():
            tgt_i2t = soft_targets(img_m @ txt_keys.T / temp, targets, self.alpha())
            tgt_t2i = soft_targets(txt_m @ img_keys.T / temp, targets, self.alpha())
        self.queue.push(img_m_all, txt_m_all, ids_all)
        return sims, targets, tgt_i2t, tgt_t2i

    # ------------------------------------------------------------------ ITM

    def _pair_plan(self, batch: PretrainBatch, s: Encoded, t: Encoded | None, generator) -> PairPlan:
        """Hard negatives drawn once, from one model's local similarities, so that teacher and
        student fuse exactly the same pairs. Without a teacher the student's serve."""
        source = t if t is not None and self.loss_cfg.hard_negatives_from == "teacher" else s
        with torch.no_grad():
            local = source.local_sims()
        return sample_hard_negatives(local, local.T, image_ids=batch.image_ids, generator=generator)

    def _match(self, batch, pairs: PairPlan, s: Encoded, t: Encoded | None, teacher, t_req, s_req,
               out: TaskOutput) -> Tensor:
        """Fusion on the positives and hard negatives of the pair plan; the ITM loss."""
        itm_ids = batch.require("itm_input_ids", "ITM text, [ENC] first")
        ii, ti = pairs.image_index, pairs.text_index
        att = batch.attention_mask
        if self._distils("fusion", "itm"):
            with torch.no_grad(), self.timer.span("teacher"):
                t_fuse = teacher.fuse(t.image.embeds[ii], itm_ids[ti], att[ti], t_req.get("fusion"))
            out.teacher.taps["fusion"], out.teacher.itm = t_fuse.taps, t_fuse.itm_logits
        s_fuse = self.student.fuse(s.image.embeds[ii], itm_ids[ti], att[ti], s_req.get("fusion"))
        out.student.taps["fusion"], out.student.itm = s_fuse.taps, s_fuse.itm_logits
        out.masks.fusion = (att == 0)[ti]
        return itm_loss(s_fuse.itm_logits, pairs.itm_labels)

    # ------------------------------------------------------------------ LM

    def _language_model(self, batch, s_image: EncoderOutput, t_image: EncoderOutput | None, teacher, t_req, s_req,
                        out: TaskOutput) -> Tensor | None:
        """The decoder on the positives (each model reads its own image embeddings); the LM loss when
        loss.lm > 0 (None otherwise)."""
        cfg = self.loss_cfg
        lm_ids = batch.require("lm_input_ids", "decoder text, [DEC] first")
        labels = batch.require("lm_labels", "LM targets")
        # the prompt makes decoder rows longer than the ITC caption: they carry their own mask
        lm_att = batch.lm_attention_mask if batch.lm_attention_mask is not None else batch.attention_mask
        distil_lm = self._distils("lm")
        if self._distils("decoder", "lm"):
            with torch.no_grad(), self.timer.span("teacher"):
                t_dec = teacher.decode(t_image.embeds, lm_ids, lm_att, t_req.get("decoder"))
                if distil_lm:
                    out.teacher.lm = LMHeadInputs(teacher.lm_features(t_dec.hidden), *teacher.lm_projection())
            out.teacher.taps["decoder"] = t_dec.taps
        s_dec = self.student.decode(s_image.embeds, lm_ids, lm_att, s_req.get("decoder"))
        out.student.taps["decoder"] = s_dec.taps
        out.masks.decoder = lm_att == 0
        # position j predicts label j + 1; the last position predicts nothing
        out.masks.lm = F.pad(labels[:, 1:] == IGNORE_INDEX, (0, 1), value=True)
        if cfg.lm <= 0 and not distil_lm:
            return None
        head = LMHeadInputs(self.student.lm_features(s_dec.hidden), *self.student.lm_projection())
        fused = self.plan.term_for("lm") if distil_lm and cfg.lm > 0 else None
        if fused is None:
            out.student.lm = head  # for the plan's lm term(s)
        if cfg.lm <= 0:
            return None
        # chunks of 256 tokens, so the [B, L, V] logits never exist (at 1536 tokens: 36% of the
        # whole-logits peak memory, benchmarks/README.md); position j predicts label j + 1
        h, y = head.features[:, :-1], labels[:, 1:]
        kw = {"label_smoothing": cfg.label_smoothing, "chunk_size": 256}
        if fused is None:
            return linear_cross_entropy(h, head.weight, y, b=head.bias, **kw)
        # the LM loss and the plan's lm term in one pass (each chunk's student logits serve both), on
        # the same tokens (masks.lm); the plan, given no student.lm, leaves the term to this value
        t_head = out.teacher.lm
        ce, out.losses[fused.name] = linear_ce_kd_loss(
            h, head.weight, y, t_head.features[:, :-1], t_head.weight, b_s=head.bias, b_t=t_head.bias,
            temperature=fused.term.temperature, **kw)
        return ce
