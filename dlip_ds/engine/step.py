"""One training step's forward: pretraining objectives plus distillation, as one nn.Module.

`StepModule` is what `deepspeed.initialize` wraps: it owns the student, the KD plan (with its
representation projections) and the ITC momentum queue, so all of them are trained, sharded and
checkpointed together. The frozen teacher is passed to `forward` and is never part of this module.
The data flow is design card section 3:

  teacher stage 1 (no grad) -> student stage 1 -> ITC -> pair plan (hard negatives, once)
  -> teacher stage 2 (no grad) and student stage 2 on the same pairs -> pretrain + KD losses

The student runs only through its own stage methods (submodule calls, so ZeRO-3 hooks gather its
parameters). Its LM projection (`student.lm_projection()`, the tied word embedding and the LM
bias) is used outside the modules that own it: under ZeRO-3 the engine registers both with
`deepspeed.zero.register_external_parameter(step_module, p)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlip_ds.config import ConfigError, LossConfig
from dlip_ds.losses.distill import KDPlan
from dlip_ds.losses.pretrain import (
    IGNORE_INDEX,
    FeatureQueue,
    gather_features,
    itc_loss,
    itc_targets,
    itm_loss,
    lm_loss,
    sample_hard_negatives,
    soft_targets,
    world_info,
)
from dlip_ds.models.vlp import VLPModel


@dataclass
class StepResult:
    loss: Tensor  # the scalar to back-propagate
    # detached scalars: "raw/<term>" unweighted, "weighted/<term>" as summed into `loss`
    # (terms: itc, itm, lm and the plan's kd_* names)
    terms: dict[str, Tensor]
    tokens: Tensor  # non-padding text tokens in this rank's batch (for tokens/s)


def _require(batch: dict, key: str, why: str) -> Tensor:
    if key not in batch:
        raise KeyError(f"batch has no '{key}' ({why}); batches are described in docs/architecture.md section 3")
    return batch[key]


def _unwrap(teacher):
    """The VLPModel inside a DeepSpeed InferenceEngine (which keeps it as `.module`)."""
    return teacher.module if hasattr(teacher, "module") and not isinstance(teacher, VLPModel) else teacher


class StepModule(nn.Module):
    def __init__(self, student: VLPModel, plan: KDPlan | None, loss_cfg: LossConfig):
        super().__init__()
        cfg = student.cfg
        if loss_cfg.itc_soft_targets not in ("none", "momentum", "teacher"):
            raise ConfigError(f"loss.itc_soft_targets must be none|momentum|teacher, got '{loss_cfg.itc_soft_targets}'")
        if loss_cfg.hard_negatives_from not in ("teacher", "student"):
            raise ConfigError(f"loss.hard_negatives_from must be teacher|student, got '{loss_cfg.hard_negatives_from}'")
        if loss_cfg.itm > 0 and cfg.fusion.layers == 0:
            raise ConfigError("loss.itm > 0 but the student has no fusion layers (set loss.itm=0)")
        if loss_cfg.lm > 0 and not cfg.decoder.enabled:
            raise ConfigError("loss.lm > 0 but the student has no decoder (set loss.lm=0)")
        self.student = student
        self.plan = plan
        self.loss_cfg = loss_cfg
        self.queue = None
        if loss_cfg.itc_soft_targets == "momentum":
            if not cfg.momentum:
                raise ConfigError("loss.itc_soft_targets=momentum needs student.momentum=true")
            self.queue = FeatureQueue(cfg.embed_dim, cfg.queue_size)

    def _needs(self, module: str, loss_weight: float, logit: str) -> bool:
        plan = self.plan
        return loss_weight > 0 or (plan is not None and (plan.needs(module) or plan.needs(logit)))

    def forward(self, batch: dict, teacher: VLPModel | None = None,
                generator: torch.Generator | None = None) -> StepResult:
        cfg, student, plan = self.loss_cfg, self.student, self.plan
        teacher = _unwrap(teacher) if teacher is not None else None
        if teacher is None and (plan is not None or cfg.itc_soft_targets == "teacher"):
            raise ValueError("this step distils (loss.kd or loss.itc_soft_targets=teacher) but no teacher was given")
        # pretraining has no teacher to ask for hard negatives: the student's similarities serve
        negatives_from_teacher = teacher is not None and cfg.hard_negatives_from == "teacher"
        if teacher is not None and plan is None and cfg.itc_soft_targets != "teacher" and not negatives_from_teacher:
            teacher = None  # nothing reads it
        s_req, t_req = plan.tap_requests() if plan is not None else ({}, {})
        pixels = _require(batch, "pixel_values", "images")
        ids = _require(batch, "input_ids", "ITC text")
        att = _require(batch, "attention_mask", "text padding")
        image_ids = batch.get("image_ids")
        pad = att == 0
        b = ids.shape[0]

        # ---- stage 1: unimodal encoders
        if teacher is not None:
            t_dtype = next(teacher.parameters()).dtype
            with torch.no_grad():
                t_img = teacher.encode_image(pixels.to(t_dtype), t_req.get("vision"))
                t_txt = teacher.encode_text(ids, att, t_req.get("text"))
                t_temp = teacher.temperature().float()
        pixels = pixels.to(next(student.parameters()).dtype)  # a bf16/fp16 engine does not cast inputs
        s_img = student.encode_image(pixels, s_req.get("vision"))
        s_txt = student.encode_text(ids, att, s_req.get("text"))
        # similarities in fp32 whatever the training dtype: [B, B * world] is small
        img_feat, txt_feat, temp = s_img.feat.float(), s_txt.feat.float(), student.temperature().float()

        # ---- ITC: local queries against keys gathered from every rank
        rank, _ = world_info()
        image_all, text_all = gather_features(img_feat), gather_features(txt_feat)
        ids_all = gather_features(image_ids) if image_ids is not None else None
        key_ids = ids_all if cfg.itc_same_image else None
        own_i2t, own_t2i = img_feat @ text_all.T / temp, txt_feat @ image_all.T / temp
        if self.queue is not None:
            with torch.no_grad():
                img_m, txt_m = (f.float() for f in student.momentum_itc_features(pixels, ids, att))
                img_m_all, txt_m_all = gather_features(img_m), gather_features(txt_m)
                q_img, q_txt, q_ids = self.queue.keys()
                img_keys, txt_keys = torch.cat([img_m_all, q_img]), torch.cat([txt_m_all, q_txt])
            # BLIP: the student's queries meet the momentum keys (batch + queue)
            sim_i2t, sim_t2i = img_feat @ txt_keys.T / temp, txt_feat @ img_keys.T / temp
            if key_ids is not None:
                key_ids = torch.cat([key_ids, q_ids])
            targets = itc_targets(image_ids if key_ids is not None else None, key_ids, txt_keys.shape[0],
                                  rank * b, b, device=ids.device)
            with torch.no_grad():
                tgt_i2t = soft_targets(img_m @ txt_keys.T / temp, targets, cfg.alpha)
                tgt_t2i = soft_targets(txt_m @ img_keys.T / temp, targets, cfg.alpha)
            self.queue.push(img_m_all, txt_m_all, ids_all)
        else:
            sim_i2t, sim_t2i = own_i2t, own_t2i
            targets = itc_targets(image_ids if key_ids is not None else None, key_ids, text_all.shape[0],
                                  rank * b, b, device=ids.device)
            tgt_i2t = tgt_t2i = targets
        if teacher is not None:
            with torch.no_grad():
                t_img_all = gather_features(t_img.feat.float())
                t_txt_all = gather_features(t_txt.feat.float())
                t_i2t, t_t2i = t_img.feat.float() @ t_txt_all.T / t_temp, t_txt.feat.float() @ t_img_all.T / t_temp
            if cfg.itc_soft_targets == "teacher":
                tgt_i2t, tgt_t2i = soft_targets(t_i2t, targets, cfg.alpha), soft_targets(t_t2i, targets, cfg.alpha)
        losses = {"itc": itc_loss(sim_i2t, sim_t2i, tgt_i2t, tgt_t2i)}
        weights = {"itc": cfg.itc}
        s_out = {"vision": s_img.taps, "text": s_txt.taps, "itc": (own_i2t, own_t2i)}
        t_out = {"vision": t_img.taps, "text": t_txt.taps, "itc": (t_i2t, t_t2i)} if teacher is not None else {}
        masks: dict[str, Tensor | None] = {"vision": None, "text": pad}

        # ---- stage 2: fusion on positive + hard negative pairs, decoder on the positives
        if self._needs("fusion", cfg.itm, "itm"):
            itm_ids = _require(batch, "itm_input_ids", "ITM text, [ENC] first")
            with torch.no_grad():  # the pair plan: drawn once, from one model's local similarities
                src_img, src_txt, src_temp = ((t_img.feat, t_txt.feat, t_temp) if negatives_from_teacher
                                              else (img_feat, txt_feat, temp))
                local = src_img.float() @ src_txt.float().T / src_temp.float()
            pairs = sample_hard_negatives(local, local.T, image_ids=image_ids, generator=generator)
            ii, ti = pairs.image_index, pairs.text_index
            if plan is not None and (plan.needs("fusion") or plan.needs("itm")):
                with torch.no_grad():
                    t_fuse = teacher.fuse(t_img.embeds[ii], itm_ids[ti], att[ti], t_req.get("fusion"))
                t_out.update(fusion=t_fuse.taps, itm=t_fuse.itm_logits)
            s_fuse = student.fuse(s_img.embeds[ii], itm_ids[ti], att[ti], s_req.get("fusion"))
            s_out.update(fusion=s_fuse.taps, itm=s_fuse.itm_logits)
            masks["fusion"] = pad[ti]
            losses["itm"], weights["itm"] = itm_loss(s_fuse.itm_logits, pairs.itm_labels), cfg.itm

        if self._needs("decoder", cfg.lm, "lm"):
            lm_ids = _require(batch, "lm_input_ids", "decoder text, [DEC] first")
            labels = _require(batch, "lm_labels", "LM targets")
            # the prompt makes decoder rows longer than the ITC caption: they carry their own mask
            lm_att = batch.get("lm_attention_mask", att)
            distil_lm = plan is not None and plan.needs("lm")
            if plan is not None and (plan.needs("decoder") or distil_lm):
                with torch.no_grad():
                    t_dec = teacher.decode(t_img.embeds, lm_ids, lm_att, t_req.get("decoder"))
                    t_lm = (teacher.lm_features(t_dec.hidden), *teacher.lm_projection()) if distil_lm else None
                t_out.update(decoder=t_dec.taps, lm=t_lm)
            s_dec = student.decode(s_img.embeds, lm_ids, lm_att, s_req.get("decoder"))
            s_out["decoder"] = s_dec.taps
            masks["decoder"] = lm_att == 0
            # position j predicts label j + 1; the last position predicts nothing
            masks["lm"] = F.pad(labels[:, 1:] == IGNORE_INDEX, (0, 1), value=True)
            if cfg.lm > 0 or distil_lm:
                h_s = student.lm_features(s_dec.hidden)
                w_s, b_s = student.lm_projection()
                s_out["lm"] = (h_s, w_s, b_s)
                if cfg.lm > 0:
                    losses["lm"] = lm_loss(F.linear(h_s, w_s, b_s), labels, cfg.label_smoothing)
                    weights["lm"] = cfg.lm

        # ---- distillation
        if plan is not None:
            kd = plan(s_out, t_out, masks)
            losses.update(kd)
            weights.update(plan.weights)
        weighted = {name: weights[name] * value for name, value in losses.items()}
        terms = {f"raw/{n}": v.detach() for n, v in losses.items()}
        terms.update({f"weighted/{n}": v.detach() for n, v in weighted.items()})
        return StepResult(loss=sum(weighted.values()), terms=terms, tokens=att.sum().detach())
