"""What each study trains and what it compares: variants as `--set` overrides on the demo-distill
recipe, findings as the paper's expected direction between two variants.

Light on purpose (stdlib and `dlip_ds.config`): `dlip-ds --help` imports it through the CLI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from dlip_ds.config import CROSS_MODULES, ConfigError, did_you_mean

STUDIES = ("modules", "decoder", "information", "init")
RECIPE = "demo-distill"  # every variant starts from the demo's distillation recipe
SEED0 = 42  # TrainConfig's default seed: seed i of a variant trains with SEED0 + i
RELATIONS = (">", "<", "≈")
# demo-distill starts its student from the teacher's weights; the studies start theirs random unless a
# variant says otherwise, so that what they vary is all that differs (the init study measures the rest)
RANDOM_INIT = (("student.init.vision", "random"), ("student.init.text", "random"))
# demo-distill's learning rate is tuned for a student that starts from the teacher's weights; a random
# student's contrastive loss collapses there (the demo's baseline: 12.9 mean recall at 3e-3 on seed 42; at
# 2e-3, 13.1 and 10.2 on seeds 43 and 44), so every variant trains at the rate the studies were first measured with
STUDY_LR = (("train.lr", "1.0e-3"),)


@dataclass(frozen=True)
class Variant:
    name: str  # the run's directory: studies/NAME/runs/<name>-s<seed>
    label: str  # what it changes, for the table
    overrides: tuple[tuple[str, str], ...] = ()  # --set key=value (values are YAML)


@dataclass(frozen=True)
class Finding:
    claim: str  # the paper's finding, in words
    a: str
    relation: str  # the paper's expected direction between variants a and b: > | < | ≈
    b: str
    metrics: tuple[str, ...] = ("mean_recall", "cider")


@dataclass(frozen=True)
class Study:
    name: str
    title: str
    student: str  # the common student, in words
    variants: tuple[Variant, ...]
    findings: tuple[Finding, ...]
    steps: dict[str, int]  # scale name -> optimizer steps per variant
    common: tuple[tuple[str, str], ...] = ()  # overrides every variant shares
    costs: tuple[tuple[str, str], ...] = ()  # (a, b): report a's training time per step against b's
    notes: str = ""
    names: tuple[str, ...] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "names", tuple(v.name for v in self.variants))
        for f in self.findings:
            if f.relation not in RELATIONS or f.a not in self.names or f.b not in self.names:
                raise ValueError(f"study {self.name}: bad finding {f}")

    def overrides(self, variant: Variant) -> dict[str, str]:
        return {**dict(RANDOM_INIT), **dict(STUDY_LR), **dict(self.common), **dict(variant.overrides)}


# ----------------------------------------------------------------------------- KD terms


def repr_term(module: str, weight: float = 1.0) -> dict:
    return {"kind": "repr", "module": module, "weight": weight}


def attn_term(module: str) -> dict:
    # Cross-attention in the multimodal modules (how text attends to the image), self-attention in
    # the encoders. Teacher and demo student differ in heads (4 vs 2): relation heads compare them.
    kind = "cross" if module in CROSS_MODULES else "self"
    return {"kind": "attn", "module": module, "attn": kind, "relation_heads": 2, "weight": 1.0}


LOGIT_TERMS = [{"kind": "logit", "module": m, "weight": 1.0} for m in ("itc", "itm", "lm")]


def kd(*terms: dict) -> tuple[str, str]:
    """The `loss.kd` override: the whole list, as YAML (JSON is YAML)."""
    return ("loss.kd", json.dumps(list(terms), separators=(",", ":")))


def recipe_kd() -> list[dict]:
    """demo-distill's own KD terms, as written in the recipe."""
    from dlip_ds.recipe import load_recipe_dict

    return load_recipe_dict(RECIPE)["loss"]["kd"]


# ----------------------------------------------------------------------------- the four studies
# Quick steps fit 15 minutes per study on 2 shared cores once the quick teacher exists: seconds per step
# measured at batch 32 (demo-student with its teacher ~0.3, the modules reference ~0.45, the init student
# ~0.65), plus ~40 s per run for the DeepSpeed start, export and evaluation.


def _modules() -> Study:
    # ALBEF-style fusion (layers stacked after the text encoder) so that vision, text and fusion are
    # three separate stacks and halving one removes only its own layers.
    common = (("student.fusion.mode", "albef"), ("student.vision.depth", "4"), ("student.text.depth", "4"),
              ("student.fusion.layers", "2"))
    return Study(
        name="modules", title="which modules to compress",
        student="demo-student widths (64), vision 4 layers, text 4 layers, 2 ALBEF-style fusion layers",
        common=common,
        variants=(
            Variant("reference", "vision 4, text 4, fusion 2 layers"),
            Variant("vision-half", "vision 4 -> 2 layers", (("student.vision.depth", "2"),)),
            Variant("text-half", "text 4 -> 2 layers", (("student.text.depth", "2"),)),
            Variant("fusion-1", "fusion 2 -> 1 layer", (("student.fusion.layers", "1"),)),
            Variant("fusion-4", "fusion 2 -> 4 layers", (("student.fusion.layers", "4"),)),
        ),
        findings=(
            Finding("image and text encoders matter equally", "vision-half", "≈", "text-half"),
            Finding("a large fusion module is unnecessary", "fusion-4", "≈", "reference"),
            Finding("a moderate fusion module helps", "reference", ">", "fusion-1"),
        ),
        steps={"full": 1500, "quick": 250, "ci": 2},
    )


def _decoder() -> Study:
    terms = recipe_kd()
    without = [t for t in terms if (t["kind"], t["module"]) not in (("repr", "decoder"), ("logit", "lm"))]
    return Study(
        name="decoder", title="distilling the captioning decoder",
        student="demo-student (the demo's), demo-distill's KD terms",
        variants=(
            Variant("distilled", "demo-distill as is (repr decoder + logit lm)", (kd(*terms),)),
            Variant("not-distilled", "without repr decoder and logit lm", (kd(*without),)),
        ),
        findings=(Finding("the decoder must be distilled separately", "distilled", ">", "not-distilled",
                          metrics=("cider",)),),
        steps={"full": 3000, "quick": 800, "ci": 2},
        notes="Mean recall is shown for context; the paper's claim is about captioning.",
    )


def _information() -> Study:
    mods = ("vision", "text", "fusion", "decoder")
    reprs, attns = [repr_term(m) for m in mods], [attn_term(m) for m in mods]
    return Study(
        name="information", title="what information to distil",
        student="demo-student (the demo's); every variant keeps the logit terms (ITC, ITM, LM) and teacher "
                "hard negatives, all terms weighted 1",
        variants=(
            Variant("logits-only", "no feature terms", (kd(*LOGIT_TERMS),)),
            Variant("repr", "representations of all 4 modules", (kd(*reprs, *LOGIT_TERMS),)),
            Variant("attn", "attention of all 4 modules", (kd(*attns, *LOGIT_TERMS),)),
            Variant("repr+attn", "representations and attention of all 4", (kd(*reprs, *attns, *LOGIT_TERMS),)),
            Variant("unimodal", "representations of vision, text", (kd(*reprs[:2], *LOGIT_TERMS),)),
            Variant("multimodal", "representations of fusion, decoder", (kd(*reprs[2:], *LOGIT_TERMS),)),
        ),
        findings=(
            Finding("representations transfer better than attention", "repr", ">", "attn"),
            Finding("multimodal information transfers better than unimodal", "multimodal", ">", "unimodal"),
        ),
        steps={"full": 1500, "quick": 250, "ci": 2},
        costs=(("attn", "repr"), ("repr+attn", "repr"), ("repr", "logits-only")),
        notes="Attention terms: self-attention of vision and text, cross-attention of fusion and decoder "
              "(relation heads 2, the fused attention-KD kernels).",
    )


def _init() -> Study:
    return Study(
        name="init", title="initialising the student from the teacher",
        student="demo-student (the demo's), demo-distill's KD terms; the teacher's layers by weight selection "
                "(every k-th layer, an evenly spaced subset of each tensor, whole heads)",
        variants=(
            Variant("random", "both random"),
            Variant("vision-teacher", "vision from the teacher", (("student.init.vision", "teacher"),)),
            Variant("text-teacher", "text from the teacher", (("student.init.text", "teacher"),)),
            Variant("both-teacher", "vision and text from the teacher (demo-distill)",
                    (("student.init.vision", "teacher"), ("student.init.text", "teacher"))),
        ),
        findings=(
            Finding("initialising the vision encoder from the teacher matters", "vision-teacher", ">", "random"),
            Finding("initialising the text encoder matters little", "text-teacher", "≈", "random"),
        ),
        steps={"full": 1500, "quick": 400, "ci": 2},
        notes="student.init: teacher takes every k-th teacher layer and, the student being narrower, an evenly "
              "spaced subset of each tensor (models/select.py).",
    )


_BUILDERS = {"modules": _modules, "decoder": _decoder, "information": _information, "init": _init}


def study(name: str) -> Study:
    if name not in _BUILDERS:
        raise ConfigError(f"unknown study '{name}'{did_you_mean(name, STUDIES)}; known: {', '.join(STUDIES)}")
    return _BUILDERS[name]()
