"""The KD plan: layer maps, validation against the two models, projections, and term values
against naive re-computations (explicit loops over rows and tokens)."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from helpers import naive_attention_kl, naive_logit_kl, naive_repr

from dlip_ds.config import ConfigError, KDTerm
from dlip_ds.losses.distill import KDPlan, default_kd_terms, resolve_layer_map
from dlip_ds.losses.kd_inputs import ItcSims, KDInputs, KDMasks, LMHeadInputs
from dlip_ds.models.vlp import TapRequest

# --------------------------------------------------------------------------- layer maps


def test_uniform_map_matches_formula():
    for s in range(1, 7):
        for t in range(1, 13):
            got = resolve_layer_map("uniform", 1, s, t, "loss.kd[0]")
            expected = []
            for i in range(s):
                x = Fraction((i + 1) * t, s)  # round half up, exactly
                expected.append((i, max(int(x + Fraction(1, 2)) - 1, 0)))
            assert got == expected
    # the common 12 -> 6 / 12 -> 4 cases, spelled out
    assert resolve_layer_map("uniform", 1, 6, 12, "x") == [(0, 1), (1, 3), (2, 5), (3, 7), (4, 9), (5, 11)]
    assert resolve_layer_map("uniform", 1, 4, 12, "x") == [(0, 2), (1, 5), (2, 8), (3, 11)]


def test_last_k_and_explicit_maps():
    assert resolve_layer_map("last-k", 2, 4, 12, "x") == [(2, 10), (3, 11)]
    assert resolve_layer_map([[0, 3], [1, 7]], 1, 2, 8, "x") == [(0, 3), (1, 7)]
    with pytest.raises(ConfigError, match=r"loss\.kd\[3\]\.k=5"):
        resolve_layer_map("last-k", 5, 4, 12, "loss.kd[3]")
    with pytest.raises(ConfigError, match=r"loss\.kd\[2\]\.layers: teacher layer 9 out of range"):
        resolve_layer_map([[0, 9]], 1, 2, 8, "loss.kd[2]")
    with pytest.raises(ConfigError, match=r"student layer -1"):
        resolve_layer_map([[-1, 0]], 1, 2, 8, "loss.kd[2]")
    with pytest.raises(ConfigError, match=r"loss\.kd\[0\]\.layers must be"):
        resolve_layer_map("every-other", 1, 2, 8, "loss.kd[0]")


# --------------------------------------------------------------------------- validation


@pytest.fixture(scope="module")
def models(kd_model):
    torch.manual_seed(0)
    return kd_model(), kd_model(teacher=True)


OK = KDTerm(kind="repr", module="text")


@pytest.mark.parametrize("term, student_changes, message", [
    (KDTerm(kind="repr", module="text", layers=[[0, 3]]), {}, r"teacher layer 3 out of range"),
    (KDTerm(kind="repr", module="vision", layers="last-k", k=3), {}, r"\.k=3"),
    (KDTerm(kind="attn", module="text"), {}, r"2 heads and teacher 4 .* set relation_heads"),
    (KDTerm(kind="attn", module="text", relation_heads=5), {}, r"relation_heads=5 does not divide the student's 32"),
    (KDTerm(kind="attn", module="text", attn="cross", relation_heads=2), {}, r"text layers have no cross-attention"),
    (KDTerm(kind="repr", module="decoder"), {"decoder": {"enabled": False}}, r"student has no decoder"),
    (KDTerm(kind="logit", module="lm"), {"decoder": {"enabled": False}}, r"student has no decoder"),
    (KDTerm(kind="repr", module="fusion"), {"fusion": {"layers": 0}}, r"student has no fusion layers"),
    (KDTerm(kind="logit", module="itm"), {"fusion": {"layers": 0}}, r"student has no fusion layers"),
    (KDTerm(kind="logit", module="lm"), {"text": {"vocab_size": 100}}, r"student has 100 tokens and teacher 128"),
    (KDTerm(kind="repr", module="vision"), {"vision": {"patch_size": 16}}, r"different patches"),
    (KDTerm(kind="attn", module="fusion", attn="cross", relation_heads=2), {"vision": {"patch_size": 16}},
     r"different patches"),
    (KDTerm(kind="repr", module="itc"), {}, r"module must be one of"),
    (KDTerm(kind="logit", module="fusion"), {}, r"module must be one of \('itc', 'itm', 'lm'\)"),
    (KDTerm(kind="feature", module="text"), {}, r"kind must be repr\|attn\|logit"),
    (KDTerm(kind="attn", module="text", attn="diagonal", relation_heads=2), {}, r"attn must be 'self' or 'cross'"),
    (KDTerm(kind="logit", module="itc", temperature=0.0), {}, r"temperature must be > 0"),
])
def test_plan_validation_names_the_term(models, kd_model, term, student_changes, message):
    student = kd_model(**student_changes) if student_changes else models[0]
    with pytest.raises(ConfigError, match=r"^loss\.kd\[1\]" + r".*" + message):
        KDPlan([OK, term], student, models[1])


def test_plan_accepts_defaults_and_relation_heads(models):
    student, teacher = models
    plan = KDPlan(default_kd_terms() + [KDTerm(kind="attn", module="decoder", attn="cross", relation_heads=2)],
                  student, teacher)
    assert [r.name for r in plan.terms] == ["kd_repr_vision", "kd_repr_text", "kd_repr_fusion", "kd_repr_decoder",
                                            "kd_logit_itc", "kd_logit_itm", "kd_logit_lm", "kd_attn_cross_decoder"]
    # the paper's findings: fused representation weighted highest, decoder distilled, no attention by default
    weights = {r.name: r.term.weight for r in plan.terms}
    assert weights["kd_repr_fusion"] == max(weights.values())
    assert not any(t.kind == "attn" for t in default_kd_terms())
    assert {t.module for t in default_kd_terms() if t.kind == "repr"} == {"vision", "text", "fusion", "decoder"}


def test_projections_and_tap_requests(models):
    student, teacher = models
    terms = [KDTerm(kind="repr", module="vision", layers="last-k", k=2),
             KDTerm(kind="repr", module="fusion", layers=[[0, 0], [1, 2]]),
             KDTerm(kind="attn", module="fusion", attn="cross", layers=[[1, 1]], relation_heads=2),
             KDTerm(kind="repr", module="fusion", layers=[[1, 1]])]  # same module twice: a distinct name
    plan = KDPlan(terms, student, teacher)
    assert [r.name for r in plan.terms][-1] == "kd_repr_fusion_3"
    proj = plan.projections["kd_repr_vision"]
    assert proj.num_pairs == 2 and proj.weight_0.shape == (48, 32) and proj.bias_1.shape == (48,)
    state = plan.state_dict()  # checkpointed with the step module that owns the plan
    assert "projections.kd_repr_fusion.weight_1" in state and "projections.kd_repr_fusion_3.bias_0" in state
    assert sum(p.numel() for p in plan.parameters()) == 5 * (32 * 48 + 48)
    s_req, t_req = plan.tap_requests()
    assert s_req == {"vision": TapRequest(hidden=(0, 1)), "fusion": TapRequest(hidden=(0, 1), cross_qk=(1,))}
    assert t_req == {"vision": TapRequest(hidden=(1, 2)), "fusion": TapRequest(hidden=(0, 1, 2), cross_qk=(1,))}


# --------------------------------------------------------------------------- term values


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_repr_and_attention_terms_match_naive(models):
    student, teacher = models
    b, n, nv = 2, 5, 4
    terms = [KDTerm(kind="repr", module="text"),  # pairs (0, 1), (1, 2)
             KDTerm(kind="attn", module="decoder", attn="self", layers="last-k", k=1, relation_heads=4,
                    temperature=2.0),
             KDTerm(kind="attn", module="fusion", attn="cross", layers=[[0, 2]], relation_heads=2)]
    plan = KDPlan(terms, student, teacher)
    pad = torch.zeros(b, n, dtype=torch.bool)
    pad[1, 3:] = True
    s_text = {"hidden": {0: _rand(b, n, 32, seed=1), 1: _rand(b, n, 32, seed=2)}}
    t_text = {"hidden": {i: _rand(b, n, 48, seed=10 + i) for i in range(3)}}
    s_dec = {"self_qk": {1: (_rand(b, 2, n, 16, seed=3), _rand(b, 2, n, 16, seed=4))}}
    t_dec = {"self_qk": {2: (_rand(b, 4, n, 12, seed=5), _rand(b, 4, n, 12, seed=6))}}
    s_fus = {"cross_qk": {0: (_rand(b, 2, n, 16, seed=7), _rand(b, 2, nv, 16, seed=8))}}
    t_fus = {"cross_qk": {2: (_rand(b, 4, n, 12, seed=9), _rand(b, 4, nv, 12, seed=20))}}
    out = plan(KDInputs(taps={"text": s_text, "decoder": s_dec, "fusion": s_fus}),
               KDInputs(taps={"text": t_text, "decoder": t_dec, "fusion": t_fus}),
               KDMasks(text=pad, decoder=pad, fusion=pad))
    proj = plan.projections["kd_repr_text"]
    expected = naive_repr([s_text["hidden"][0], s_text["hidden"][1]], [t_text["hidden"][1], t_text["hidden"][2]],
                          [proj.weight_0, proj.weight_1], [proj.bias_0, proj.bias_1], pad)
    assert abs(out["kd_repr_text"].item() - expected) < 1e-4
    expected = naive_attention_kl(*s_dec["self_qk"][1], *t_dec["self_qk"][2], key_pad=pad, query_pad=pad, causal=True,
                                  r=4, temperature=2.0)
    assert abs(out["kd_attn_self_decoder"].item() - expected) < 1e-5
    expected = naive_attention_kl(*s_fus["cross_qk"][0], *t_fus["cross_qk"][2], query_pad=pad, r=2)
    assert abs(out["kd_attn_cross_fusion"].item() - expected) < 1e-5
    # gradients reach the projections (trained with the student) and the student's tensors
    out["kd_repr_text"].backward()
    assert proj.weight_0.grad is not None and proj.bias_1.grad.abs().sum() > 0


def test_logit_terms_match_naive(models):
    student, teacher = models
    plan = KDPlan([KDTerm(kind="logit", module="itc", temperature=2.0), KDTerm(kind="logit", module="itm"),
                   KDTerm(kind="logit", module="lm", temperature=1.5)], student, teacher)
    b, n, v = 3, 4, 128
    s_itc, t_itc = (_rand(b, 6, seed=1), _rand(b, 6, seed=2)), (_rand(b, 6, seed=3), _rand(b, 6, seed=4))
    s_itm, t_itm = _rand(3 * b, 2, seed=5), _rand(3 * b, 2, seed=6)
    s_lm = (_rand(b, n, 32, seed=7), _rand(v, 32, seed=8), _rand(v, seed=9))
    t_lm = (_rand(b, n, 32, seed=10), _rand(v, 32, seed=11), _rand(v, seed=12))
    lm_mask = torch.zeros(b, n, dtype=torch.bool)
    lm_mask[:, -1] = True
    lm_mask[0, :2] = True
    out = plan(KDInputs(itc=ItcSims(*s_itc), itm=s_itm, lm=LMHeadInputs(*s_lm)),
               KDInputs(itc=ItcSims(*t_itc), itm=t_itm, lm=LMHeadInputs(*t_lm)), KDMasks(lm=lm_mask))
    expected = (naive_logit_kl(s_itc[0], t_itc[0], 2.0) + naive_logit_kl(s_itc[1], t_itc[1], 2.0)) / 2
    assert abs(out["kd_logit_itc"].item() - expected) < 1e-5
    assert abs(out["kd_logit_itm"].item() - naive_logit_kl(s_itm, t_itm)) < 1e-5
    z_s, z_t = s_lm[0] @ s_lm[1].T + s_lm[2], t_lm[0] @ t_lm[1].T + t_lm[2]
    assert abs(out["kd_logit_lm"].item() - naive_logit_kl(z_s, z_t, 1.5, lm_mask)) < 1e-4
