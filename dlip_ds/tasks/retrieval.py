"""Image-text retrieval fine-tuning (BLIP's `BLIP_Retrieval`), distilled when a KD plan is given.

The pretraining step without the decoder: ITC whose positives are every pair of the same image (in
the batch and in the momentum feature queue, which carries image ids), soft targets from the momentum
model (BLIP) or the fine-tuned teacher, alpha ramped over loss.alpha_warmup_steps (BLIP: the first
epoch); ITM on hard negatives drawn from ITC similarities, never a pair of the same image. The KD plan
may read every encoder (vision, text, fusion) and the ITC/ITM logits.
"""

from __future__ import annotations

import copy
import dataclasses

from dlip_ds.config import ModelConfig
from dlip_ds.models.vlp import VLPModel
from dlip_ds.tasks.pretrain import PretrainTask


class RetrievalTask(PretrainTask):
    name = "retrieval"
    metric = "r_mean"
    kd_keys = ("vision", "text", "fusion", "itc", "itm")

    def __init__(self, student, plan, loss_cfg):
        self.check_model(loss_cfg.lm == 0, f"loss.lm={loss_cfg.lm}: the retrieval task trains ITC and ITM only "
                                           "(set loss.lm=0)")
        self.check_model(loss_cfg.itc_same_image, "the retrieval task needs loss.itc_same_image=true: captions "
                                                  "of one image are all positives (BLIP_Retrieval)")
        self.check_model(student.cfg.fusion.layers > 0, "the retrieval task needs fusion layers for ITM")
        super().__init__(student, plan, loss_cfg)

    @classmethod
    def student_config(cls, cfg: ModelConfig) -> ModelConfig:
        """BLIP_Retrieval has no decoder: a pretrained student's is dropped."""
        return dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, enabled=False))

    @classmethod
    def adapt_student(cls, model: VLPModel) -> VLPModel:
        if not model.cfg.decoder.enabled:
            return model
        state = {k: v for k, v in model.state_dict().items() if not k.startswith(("decoder.", "lm_head."))}
        adapted = VLPModel(cls.student_config(copy.deepcopy(model.cfg)))
        adapted.load_state_dict(state)
        return adapted
