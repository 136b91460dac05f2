"""`dlip-ds study`: one study end to end at CI size (its numbers are meaningless; their plumbing is
checked), a second call that redoes nothing, every other study's variants built against the same CI
teacher without training, and the measured direction computed from given numbers."""

from __future__ import annotations

import json
import math

import pytest
from helpers import evenly

from dlip_ds.cli import main
from dlip_ds.studies import plan
from dlip_ds.studies.report import (
    REL_TOL,
    direction,
    finding_rows,
    judge,
    summarise,
    variant_rows,
    verdict,
)


@pytest.fixture(scope="module")
def study_out(tmp_path_factory):
    """The decoder study (two variants) at CI size; its CI teacher serves the other tests."""
    out = tmp_path_factory.mktemp("study") / "out"
    with pytest.MonkeyPatch.context() as mp:
        # Without Java: METEOR's Java start (~14 s per evaluation here) scores nothing a study reads;
        # CIDEr is computed either way (on whitespace tokens instead of PTB's).
        for module in ("dlip_ds.eval.captioning", "dlip_ds.eval.cli"):
            mp.setattr(f"{module}.find_java", lambda: None)
        assert main(["study", "decoder", "--ci", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_decoder_study_end_to_end(study_out):
    from dlip_ds.recipe import load_recipe

    home = study_out / "studies" / "decoder"
    rep = json.loads((home / "study.json").read_text())
    study = plan.study("decoder")
    assert list(rep["variants"]) == ["distilled", "not-distilled"] and rep["seeds"] == [plan.SEED0]
    for name, v in rep["variants"].items():
        (run,) = v["runs"]
        # the run trained what the variant says, against the demo's teacher, for the study's steps
        recipe = load_recipe(str(home / "runs" / f"{name}-s42" / "config.yaml"))
        terms = {(t.kind, t.module) for t in recipe.loss.kd}
        assert (("repr", "decoder") in terms) == (("logit", "lm") in terms) == (name == "distilled")
        assert recipe.teacher.source == str(study_out / "runs" / "teacher" / "student")
        assert recipe.train.max_steps == study.steps["ci"] and recipe.train.seed == 42
        assert recipe.train.lr == float(dict(plan.STUDY_LR)["train.lr"])  # not demo-distill's rate
        # the numbers are what `dlip-ds evaluate` wrote for that run
        metrics = json.loads((home / "eval" / f"{name}-s42" / "metrics.json").read_text())
        assert run["mean_recall"] == pytest.approx(metrics["retrieval"]["r_mean"]) == v["mean"]["mean_recall"]
        assert run["cider"] == pytest.approx(metrics["captioning"]["cider"])
        assert run["step_s"] > 0 and math.isfinite(run["step_s"]) and run["params"] > 0
    (f,) = rep["findings"]
    assert (f["metric"], f["a"], f["expected"], f["b"]) == ("cider", "distilled", ">", "not-distilled")
    assert f["measured"] == direction([rep["variants"]["distilled"]["runs"][0]["cider"]],
                                      [rep["variants"]["not-distilled"]["runs"][0]["cider"]])
    assert f["reproduced"] == (f["measured"] == ">")
    md = (home / "study.md").read_text()
    assert "| distilled |" in md and "| not-distilled |" in md and "distilled > not-distilled" in md
    assert ("reproduced in 1 of 1" if f["reproduced"] else "reproduced in 0 of 1") in md
    assert (home / "study.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_second_call_redoes_nothing(study_out, monkeypatch, capsys):
    """Finished runs and evaluations are reused: no training, no evaluation, not even the teacher's."""
    from dlip_ds.studies import runner

    def refuse(*args, **kwargs):
        raise AssertionError(f"redone: {args[:1]}")

    for name in ("train_run", "evaluate_run", "pretrain_models"):
        monkeypatch.setattr(runner, name, refuse)
    before = json.loads((study_out / "studies" / "decoder" / "study.json").read_text())
    assert main(["study", "decoder", "--ci", "--out", str(study_out)]) == 0
    after = json.loads((study_out / "studies" / "decoder" / "study.json").read_text())
    assert after["variants"] == before["variants"] and after["findings"] == before["findings"]
    out = capsys.readouterr().out
    assert "study decoder 2/2: not-distilled seed 42" in out and "finding (paper)" in out


@pytest.mark.slow
@pytest.mark.parametrize("name", [s for s in plan.STUDIES if s != "decoder"])
def test_variants_build_against_the_demo_teacher(study_out, name):
    """Every variant's overrides load on demo-distill and build the student, its initialisation from the
    teacher and its KD plan against the CI demo teacher (what training would do first)."""
    import torch

    from dlip_ds.data import load_tokenizer
    from dlip_ds.engine.build import fit_to_tokenizer
    from dlip_ds.engine.teacher import load_teacher
    from dlip_ds.losses.distill import KDPlan
    from dlip_ds.models.init import init_student
    from dlip_ds.models.vlp import VLPModel
    from dlip_ds.recipe import load_recipe

    study = plan.study(name)
    tokenizer = load_tokenizer(study_out / "data" / "tokenizer")
    source = study_out / "runs" / "teacher" / "student"
    teacher = None
    built = {}
    for v in study.variants:  # what engine.build.build_task does, with the teacher loaded once
        sets = [f"{k}={x}" for k, x in study.overrides(v).items()] + [f"teacher.source={source}"]
        recipe = fit_to_tokenizer(load_recipe(plan.RECIPE, sets), tokenizer)
        teacher = teacher or load_teacher(recipe.teacher)
        student = VLPModel(recipe.student.model)
        init_student(student, recipe.student.init, teacher=teacher)
        built[v.name] = (recipe, student, KDPlan(recipe.loss.kd, student, teacher))
    if name == "modules":  # each variant halves one module of the reference (or doubles the fusion)
        depth = {n: (r.student.model.vision.depth, r.student.model.text.depth, r.student.model.fusion.layers)
                 for n, (r, _, _) in built.items()}
        assert depth == {"reference": (4, 4, 2), "vision-half": (2, 4, 2), "text-half": (4, 2, 2),
                         "fusion-1": (4, 4, 1), "fusion-4": (4, 4, 4)}
        assert {r.student.model.fusion.mode for r, _, _ in built.values()} == {"albef"}
    if name == "information":
        terms = {n: sorted(t.name for t in kd_plan.terms) for n, (_, _, kd_plan) in built.items()}
        logits = ["kd_logit_itc", "kd_logit_itm", "kd_logit_lm"]
        assert terms["logits-only"] == logits
        assert terms["unimodal"] == sorted(logits + ["kd_repr_vision", "kd_repr_text"])
        assert terms["multimodal"] == sorted(logits + ["kd_repr_fusion", "kd_repr_decoder"])
        assert {t for t in terms["attn"] if "attn" in t} == {"kd_attn_self_vision", "kd_attn_self_text",
                                                              "kd_attn_cross_fusion", "kd_attn_cross_decoder"}
        assert set(terms["repr+attn"]) == set(terms["repr"]) | set(terms["attn"])
    # Initialisation: the teacher's weights (weight selection: every k-th layer, evenly spaced columns) only
    # where the variant asks; every other student starts random, whatever demo-distill's own default.
    tv, words = teacher.vision.blocks[-1].mlp.fc1.weight, teacher.text.embeddings.word_embeddings.weight
    for n, (recipe, student, _) in built.items():
        fc1, width = student.vision.blocks[-1].mlp.fc1.weight, student.cfg.vision.width
        cols = evenly(tv.shape[1], width)
        vision = fc1.shape == (len(evenly(tv.shape[0], fc1.shape[0])), width) and torch.equal(
            fc1, tv[evenly(tv.shape[0], fc1.shape[0])][:, cols])
        text = student.cfg.text.width == width and torch.equal(student.text.embeddings.word_embeddings.weight,
                                                                 words[:, cols])
        assert (vision, text) == (n in ("vision-teacher", "both-teacher"), n in ("text-teacher", "both-teacher")), n
        assert (recipe.student.init.vision == "teacher") == vision, n


def test_study_names_and_findings_are_consistent():
    for name in plan.STUDIES:
        s = plan.study(name)
        assert len(set(s.names)) == len(s.names) and s.findings
        assert set(s.steps) == {"full", "quick", "ci"}
    with pytest.raises(Exception, match="unknown study 'modulez'.*did you mean 'modules'"):
        plan.study("modulez")


def test_seeds_must_be_positive(tmp_path, capsys):
    assert main(["study", "init", "--ci", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert "--seeds must be >= 1" in capsys.readouterr().err


def test_direction_from_given_numbers():
    assert direction([41.2], [40.8]) == "≈"  # within 3%
    assert direction([41.2], [38.0]) == ">" and direction([38.0], [41.2]) == "<"
    assert direction([100.0], [100.0 * (1 - REL_TOL) + 0.01]) == "≈"
    # a gap beyond 3% but within two standard errors of the seeds' spread is no direction
    assert direction([40.0, 50.0], [41.0, 42.0]) == "≈"
    assert direction([45.0, 45.2], [41.0, 41.2]) == ">"
    assert direction([float("nan")], [1.0]) == "n/a" and direction([], [1.0]) == "n/a"


def _runs(**values):
    return {n: [{"mean_recall": r, "cider": c, "step_s": 0.5, "params": 1000} for r, c in pairs]
            for n, pairs in values.items()}


def test_findings_table_from_given_numbers():
    study = plan.study("modules")
    results = _runs(**{"reference": [(40.0, 90.0)], "vision-half": [(41.2, 80.0)], "text-half": [(40.8, 70.0)],
                       "fusion-1": [(35.0, 88.0)], "fusion-4": [(45.0, 91.0)]})
    variants = summarise(study, results)
    found = {(f["a"], f["b"], f["metric"]): f for f in judge(study, variants)}
    recall = found[("vision-half", "text-half", "mean_recall")]
    assert (recall["expected"], recall["measured"], recall["reproduced"]) == ("≈", "≈", True)
    cider = found[("vision-half", "text-half", "cider")]
    assert (cider["measured"], cider["reproduced"]) == (">", False)
    assert found[("reference", "fusion-1", "mean_recall")]["reproduced"]  # 40 > 35
    large = found[("fusion-4", "reference", "mean_recall")]
    assert (large["measured"], large["reproduced"]) == (">", False)  # 45 vs 40: the large one helped here
    rows = finding_rows({"findings": list(found.values())})
    assert ["image and text encoders matter equally", "mean recall", "vision-half ≈ text-half",
            "vision-half 41.20 vs text-half 40.80 (≈)", "yes"] in rows
    text = verdict({"findings": list(found.values())})
    assert "reproduced in 3 of 6" in text and "a large fusion module is unnecessary (mean recall: NOT reproduced" in text


def test_variant_table_gives_mean_and_spread_over_seeds():
    study = plan.study("decoder")
    variants = summarise(study, _runs(**{"distilled": [(40.0, 90.0), (41.0, 92.0)], "not-distilled": [(39.0, 80.0)]}))
    rows = variant_rows({"variants": variants})
    assert rows[1][:5] == ["distilled", study.variants[0].label, "1K", "40.50 ± 0.71", "91.00 ± 1.41"]
    assert rows[2][3:5] == ["39.00", "80.00"]  # one seed: no spread
