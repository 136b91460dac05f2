"""PretrainTask on the test-tiny preset: pretraining and distillation terms against naive
re-computations from the models' own task methods and taps; gradients; teacher dtypes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    naive_attention_kl,
    naive_ce_rows,
    naive_lm,
    naive_logit_kl,
    naive_repr,
    naive_softmax,
)

from dlip_ds.config import ConfigError, KDTerm, LossConfig
from dlip_ds.losses.distill import KDPlan, default_kd_terms
from dlip_ds.losses.pretrain import sample_hard_negatives
from dlip_ds.tasks.pretrain import PretrainTask

B, L = 4, 7


def make_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (B, L), generator=g)
    att = torch.ones(B, L, dtype=torch.long)
    att[1, 4:] = 0
    att[3, 5:] = 0
    ids[att == 0] = 0
    itm_ids, lm_ids = ids.clone(), ids.clone()
    itm_ids[:, 0], lm_ids[:, 0] = 4, 1  # [ENC], [DEC]
    # a prompt makes decoder rows longer than ITC rows: row 1 gets two more real tokens
    lm_att = att.clone()
    lm_att[1, 4:6] = 1
    lm_ids[1, 4:6] = torch.randint(3, 128, (2,), generator=g)
    labels = lm_ids.masked_fill(lm_att == 0, -100)
    labels[:, :2] = -100  # [DEC] and a one-token prompt
    return {"pixel_values": torch.randn(B, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": att,
            "itm_input_ids": itm_ids, "lm_input_ids": lm_ids, "lm_attention_mask": lm_att, "lm_labels": labels,
            "image_ids": torch.tensor([0, 1, 1, 2])}


def one_hot(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64)


@torch.no_grad()
def local_pairs(model, batch, seed):
    """The pair plan the step draws: hard negatives from `model`'s local ITC similarities."""
    img, txt = model.itc_features(batch["pixel_values"].to(next(model.parameters()).dtype), batch["input_ids"],
                                  batch["attention_mask"])
    sim = img.float() @ txt.float().T / model.temperature().float()
    return sample_hard_negatives(sim, sim.T, image_ids=batch["image_ids"], generator=torch.Generator().manual_seed(seed))


def test_pretraining_terms_match_naive(kd_model):
    torch.manual_seed(0)
    student = kd_model()
    step = PretrainTask(student, None, LossConfig(hard_negatives_from="student", itc=1.0, itm=0.5, lm=2.0))
    batch = make_batch()
    out = step(batch, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        img, txt = student.itc_features(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        temp = student.temperature()
        itc = (naive_ce_rows(img @ txt.T / temp, one_hot(B)) + naive_ce_rows(txt @ img.T / temp, one_hot(B))) / 2
        pairs = local_pairs(student, batch, 7)
        ii, ti = pairs.image_index, pairs.text_index
        itm_logits = student.itm_logits(batch["pixel_values"][ii], batch["itm_input_ids"][ti],
                                        batch["attention_mask"][ti])
        itm = naive_ce_rows(itm_logits, F.one_hot(pairs.itm_labels, 2).double())
        lm_logits = student.lm_logits(batch["pixel_values"], batch["lm_input_ids"], batch["lm_attention_mask"])
        lm = naive_lm(lm_logits, batch["lm_labels"], 0.1)
    assert abs(out.terms["raw/itc"].item() - itc) < 1e-5
    assert abs(out.terms["raw/itm"].item() - itm) < 1e-5
    assert abs(out.terms["raw/lm"].item() - lm) < 1e-5
    assert abs(out.terms["weighted/lm"].item() - 2.0 * lm) < 1e-5
    assert abs(out.loss.item() - (itc + 0.5 * itm + 2.0 * lm)) < 1e-4
    assert out.tokens.item() == int(batch["attention_mask"].sum())
    assert not any(k.startswith("raw/kd") for k in out.terms)
    again = step(batch, generator=torch.Generator().manual_seed(7))  # the pair plan is deterministic
    assert again.loss.item() == out.loss.item()
    # captions of one image (image_ids 1, 1) are both positives when asked
    same = PretrainTask(student, None, LossConfig(hard_negatives_from="student", itc_same_image=True))(batch)
    ids = batch["image_ids"]
    targets = (ids[:, None] == ids[None, :]).double()
    targets = targets / targets.sum(1, keepdim=True)
    with torch.no_grad():
        itc = (naive_ce_rows(img @ txt.T / temp, targets) + naive_ce_rows(txt @ img.T / temp, targets)) / 2
    assert abs(same.terms["raw/itc"].item() - itc) < 1e-5


ATTN_TERMS = [KDTerm(kind="attn", module="text", relation_heads=2, temperature=2.0),
              KDTerm(kind="attn", module="fusion", attn="cross", relation_heads=4, layers="last-k", k=1),
              KDTerm(kind="attn", module="decoder", relation_heads=2, layers=[[0, 0], [1, 2]])]


@pytest.fixture(scope="module")
def distill_run(kd_model):
    torch.manual_seed(0)
    student, teacher = kd_model(), kd_model(teacher=True)
    plan = KDPlan(default_kd_terms() + ATTN_TERMS, student, teacher)
    step = PretrainTask(student, plan, LossConfig(hard_negatives_from="teacher"))
    batch = make_batch(1)
    out = step(batch, teacher=teacher, generator=torch.Generator().manual_seed(3))
    out.loss.backward()
    return step, teacher, batch, out


def test_distill_step_gradients(distill_run):
    step, teacher, _, out = distill_run
    assert torch.isfinite(out.loss)
    names = {"itc", "itm", "lm", "kd_repr_vision", "kd_repr_text", "kd_repr_fusion", "kd_repr_decoder", "kd_logit_itc",
             "kd_logit_itm", "kd_logit_lm", "kd_attn_self_text", "kd_attn_cross_fusion", "kd_attn_self_decoder"}
    assert set(out.terms) == {f"raw/{n}" for n in names} | {f"weighted/{n}" for n in names}
    assert out.terms["weighted/kd_repr_fusion"].item() == pytest.approx(2.0 * out.terms["raw/kd_repr_fusion"].item())
    assert sum(out.terms[f"weighted/{n}"] for n in names).item() == pytest.approx(out.loss.item(), rel=1e-6)
    missing = [n for n, p in step.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []  # every student parameter and every projection learns
    assert any(n.startswith("plan.projections.") for n, _ in step.named_parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(n.startswith("teacher") for n in step.state_dict())


def test_distill_terms_match_naive_from_taps(distill_run):
    step, teacher, batch, out = distill_run
    student, plan = step.student, step.plan
    s_req, t_req = plan.tap_requests()
    px, ids, att, pad = batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["attention_mask"] == 0
    pairs = local_pairs(teacher, batch, 3)  # hard negatives from the teacher's similarities
    ii, ti = pairs.image_index, pairs.text_index
    taps, itc, itm, lm = {}, {}, {}, {}
    with torch.no_grad():
        for who, model in (("s", student), ("t", teacher)):
            req = s_req if who == "s" else t_req
            img = model.encode_image(px, req.get("vision"))
            txt = model.encode_text(ids, att, req.get("text"))
            fus = model.fuse(img.embeds[ii], batch["itm_input_ids"][ti], att[ti], req.get("fusion"))
            dec = model.decode(img.embeds, batch["lm_input_ids"], batch["lm_attention_mask"], req.get("decoder"))
            taps[who] = {"vision": img.taps, "text": txt.taps, "fusion": fus.taps, "decoder": dec.taps}
            temp = model.temperature()
            itc[who] = (img.feat @ txt.feat.T / temp, txt.feat @ img.feat.T / temp)
            itm[who] = fus.itm_logits
            lm[who] = model.lm_logits_from_hidden(dec.hidden)
    masks = {"vision": None, "text": pad, "fusion": pad[ti], "decoder": batch["lm_attention_mask"] == 0}
    for r in plan.terms:
        term, got = r.term, out.terms[f"raw/{r.name}"].item()
        if term.kind == "repr":
            proj = plan.projections[r.name]
            expected = naive_repr([taps["s"][term.module]["hidden"][s] for s, _ in r.pairs],
                                  [taps["t"][term.module]["hidden"][t] for _, t in r.pairs],
                                  [getattr(proj, f"weight_{p}") for p in range(len(r.pairs))],
                                  [getattr(proj, f"bias_{p}") for p in range(len(r.pairs))], masks[term.module])
        elif term.kind == "attn":
            kind, cross = f"{term.attn}_qk", term.attn == "cross"
            expected = sum(naive_attention_kl(*taps["s"][term.module][kind][s], *taps["t"][term.module][kind][t],
                                              key_pad=None if cross else masks[term.module],
                                              query_pad=masks[term.module], causal=term.module == "decoder",
                                              r=term.relation_heads, temperature=term.temperature)
                           for s, t in r.pairs)
        elif term.module == "itc":
            expected = (naive_logit_kl(itc["s"][0], itc["t"][0]) + naive_logit_kl(itc["s"][1], itc["t"][1])) / 2
        elif term.module == "itm":
            expected = naive_logit_kl(itm["s"], itm["t"])
        else:
            not_predicting = F.pad(batch["lm_labels"][:, 1:] == -100, (0, 1), value=True)
            expected = naive_logit_kl(lm["s"], lm["t"], skip=not_predicting)
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-5), r.name


def test_bf16_teacher_matches_fp32_teacher(kd_model):
    torch.manual_seed(0)
    student, teacher = kd_model(), kd_model(teacher=True)
    plan = KDPlan(default_kd_terms() + ATTN_TERMS[:1], student, teacher)
    step = PretrainTask(student, plan, LossConfig(hard_negatives_from="student"))
    batch = make_batch(2)
    ref = step(batch, teacher=teacher, generator=torch.Generator().manual_seed(0))
    low = step(batch, teacher=teacher.to(torch.bfloat16), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(low.loss) and low.loss.dtype == torch.float32
    for name, value in ref.terms.items():
        assert low.terms[name].item() == pytest.approx(value.item(), rel=5e-2, abs=5e-3), name
    low.loss.backward()
    assert all(p.grad is not None for p in step.parameters())
    # a bf16 student (as under a bf16 DeepSpeed engine) gets its inputs cast and keeps fp32 losses
    step.to(torch.bfloat16)
    half = step(batch, teacher=teacher, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(half.loss) and half.loss.dtype == torch.float32
    assert half.loss.item() == pytest.approx(ref.loss.item(), rel=0.1)
    half.loss.backward()


def test_teacher_soft_targets(kd_model):
    torch.manual_seed(0)
    student, teacher = kd_model(), kd_model(teacher=True)
    alpha = 0.4
    step = PretrainTask(student, None, LossConfig(itc_soft_targets="teacher", alpha=alpha, itm=0.0, lm=0.0))
    batch = make_batch(3)
    out = step(batch, teacher=teacher)
    assert set(out.terms) == {"raw/itc", "weighted/itc"}
    with torch.no_grad():
        s_img, s_txt = student.itc_features(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        t_img, t_txt = teacher.itc_features(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        s_temp, t_temp = student.temperature(), teacher.temperature()

        def targets(ref):
            return torch.tensor([[alpha * p + (1 - alpha) * (i == j) for j, p in enumerate(naive_softmax(row.tolist()))]
                                 for i, row in enumerate(ref)], dtype=torch.float64)

        expected = (naive_ce_rows(s_img @ s_txt.T / s_temp, targets(t_img @ t_txt.T / t_temp))
                    + naive_ce_rows(s_txt @ s_img.T / s_temp, targets(t_txt @ t_img.T / t_temp))) / 2
    assert out.terms["raw/itc"].item() == pytest.approx(expected, abs=1e-5)


def test_momentum_queue_soft_targets(kd_model):
    torch.manual_seed(0)
    student = kd_model(momentum=True, queue_size=6)
    student.reset_momentum()
    alpha = 0.4
    step = PretrainTask(student, None, LossConfig(itc_soft_targets="momentum", alpha=alpha, itm=0.0, lm=0.0,
                                                hard_negatives_from="student"))
    assert {"queue.image_feat", "queue.ptr"} <= set(step.state_dict())
    b1, b2 = make_batch(4), make_batch(5)
    step(b1)
    assert int(step.queue.filled) == B
    out = step(b2)
    assert int(step.queue.filled) == 6  # wrapped: the queue keeps its newest entries
    with torch.no_grad():
        args = lambda b: (b["pixel_values"], b["input_ids"], b["attention_mask"])
        img, txt = student.itc_features(*args(b2))
        img_m, txt_m = student.momentum_itc_features(*args(b2))
        q_img, q_txt = student.momentum_itc_features(*args(b1))  # the queue held batch 1 before step 2
        img_keys, txt_keys = torch.cat([img_m, q_img]), torch.cat([txt_m, q_txt])
        temp = student.temperature()
        hard = torch.cat([one_hot(B), torch.zeros(B, B, dtype=torch.float64)], dim=1)

        def targets(ref):
            return alpha * torch.softmax(ref.double(), 1) + (1 - alpha) * hard

        expected = (naive_ce_rows(img @ txt_keys.T / temp, targets(img_m @ txt_keys.T / temp))
                    + naive_ce_rows(txt @ img_keys.T / temp, targets(txt_m @ img_keys.T / temp))) / 2
    assert out.terms["raw/itc"].item() == pytest.approx(expected, abs=1e-5)


def test_step_errors(kd_model):
    student, teacher = kd_model(), kd_model(teacher=True)
    plan = KDPlan([KDTerm(kind="repr", module="vision")], student, teacher)
    with pytest.raises(ValueError, match="no teacher was given"):
        PretrainTask(student, plan, LossConfig())(make_batch())
    with pytest.raises(ConfigError, match=r"loss\.itm > 0 but the student has no fusion"):
        PretrainTask(kd_model(fusion={"layers": 0}), None, LossConfig())
    with pytest.raises(ConfigError, match=r"loss\.lm > 0 but the student has no decoder"):
        PretrainTask(kd_model(decoder={"enabled": False}), None, LossConfig())
    with pytest.raises(ConfigError, match="needs student.momentum=true"):
        PretrainTask(student, None, LossConfig(itc_soft_targets="momentum"))
    batch = make_batch()
    del batch["lm_labels"]
    with pytest.raises(KeyError, match="lm_labels"):
        PretrainTask(student, None, LossConfig(hard_negatives_from="student"))(batch)
