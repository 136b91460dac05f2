"""The KD plan against real topologies: every term kind x module x attention kind, checked on the real
presets (blip-base teaching dlip-base / dlip-small / dlip-tiny, built on the meta device, so by shape
only), then run for real on tiny models of the same topology (fusion in fewer layers than the text
depth, other head counts, a shared or a separate decoder): finite, and equal to the formula on the
tapped tensors.

In blip mode the decoder runs every text layer but only the last fusion.layers carry cross-attention:
cross-attention terms map over those layers (issue 13)."""

from __future__ import annotations

import math

import pytest
import torch

TEACHER_PRESET = "blip-base"
STUDENT_PRESETS = ("dlip-base", "dlip-small", "dlip-tiny")
MODULES = ("vision", "text", "fusion", "decoder")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: on a busy machine, OpenMP threads spin-waiting make each op many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _terms():
    """(kind, module, attn) for every term that reads taps."""
    out = [("repr", m, "self") for m in MODULES] + [("attn", m, "self") for m in MODULES]
    return out + [("attn", "fusion", "cross"), ("attn", "decoder", "cross")]


def _term(student, teacher, kind, module, attn, **over):
    """A KDTerm; relation heads (a count dividing both sides' heads) where the head counts differ."""
    from dlip_ds.config import KDTerm

    s, t = student.module_info(module), teacher.module_info(module)
    relation = None if s.heads == t.heads or kind != "attn" else math.gcd(s.heads, t.heads)
    return KDTerm(kind=kind, module=module, attn=attn, relation_heads=relation, **over)


def _meta_model(preset: str):
    from dlip_ds.models.presets import preset_config
    from dlip_ds.models.vlp import VLPModel

    with torch.device("meta"):
        return VLPModel(preset_config(preset)).eval()


@pytest.fixture(scope="module")
def real_models():
    return {name: _meta_model(name) for name in (TEACHER_PRESET, *STUDENT_PRESETS)}


def _meta_taps(model) -> dict:
    """Every stage run on the meta device with every tap: shapes only, nothing computed. Masks are None
    (a meta tensor cannot say whether it holds padding)."""
    from dlip_ds.models.vlp import TapRequest

    def everything(module):
        info = model.module_info(module)
        layers = tuple(range(info.depth))
        return TapRequest(hidden=layers, self_qk=layers, cross_qk=info.cross_layers)

    b, n = 1, 8
    ids = torch.zeros(b, n, dtype=torch.long, device="meta")
    size = model.cfg.vision.image_size
    image = model.encode_image(torch.zeros(b, 3, size, size, device="meta"), everything("vision"))
    text = model.encode_text(ids, None, everything("text"))
    fused = model.fuse(image.embeds, ids, None, everything("fusion"))
    decoded = model.decode(image.embeds, ids, None, everything("decoder"))
    return {"vision": image.taps, "text": text.taps, "fusion": fused.taps, "decoder": decoded.taps}


@pytest.fixture(scope="module")
def real_taps(real_models):
    return {name: _meta_taps(model) for name, model in real_models.items()}


@pytest.mark.parametrize("student_name", STUDENT_PRESETS)
def test_every_term_maps_and_taps_on_the_real_presets(real_models, real_taps, student_name):
    """The plan accepts every term the real pair can run, maps cross terms onto cross-attention layers
    on both sides, asks each model only for taps it can return, and the tapped tensors have the shapes
    the losses take."""
    from dlip_ds.losses.distill import KDPlan

    teacher, student = real_models[TEACHER_PRESET], real_models[student_name]
    maps = (("uniform", 1), ("last-k", 2))
    terms = [_term(student, teacher, *spec, layers=layers, k=k) for layers, k in maps for spec in _terms()]
    with torch.device("meta"):
        plan = KDPlan(terms, student, teacher)
    for r in plan.terms:
        s_info, t_info = student.module_info(r.term.module), teacher.module_info(r.term.module)
        if r.term.kind == "attn" and r.term.attn == "cross":
            s_layers, t_layers = s_info.cross_layers, t_info.cross_layers
        else:
            s_layers, t_layers = tuple(range(s_info.depth)), tuple(range(t_info.depth))
        expected = len(s_layers) if r.term.layers == "uniform" else r.term.k
        assert len(r.pairs) == expected, (r.name, r.pairs)
        assert all(s in s_layers and t in t_layers for s, t in r.pairs), (r.name, r.pairs, s_layers, t_layers)
        assert r.pairs[-1] == (s_layers[-1], t_layers[-1]), (r.name, r.pairs)  # the last layers align
    for model, requests in zip((student, teacher), plan.tap_requests()):
        for module, request in requests.items():
            model._check_taps(module, request)  # what the stage checks before running
    s_taps, t_taps = real_taps[student_name], real_taps[TEACHER_PRESET]
    for r in plan.terms:
        term = r.term
        kind = "hidden" if term.kind == "repr" else f"{term.attn}_qk"
        for p, (s, t) in enumerate(r.pairs):
            h_s, h_t = s_taps[term.module][kind][s], t_taps[term.module][kind][t]
            if term.kind == "repr":  # same tokens; the projection maps the student width to the teacher's
                assert h_s.shape[:2] == h_t.shape[:2]
                weight = getattr(plan.projections[r.name], f"weight_{p}")
                assert tuple(weight.shape) == (h_t.shape[-1], h_s.shape[-1])
                continue
            (q_s, k_s), (q_t, k_t) = h_s, h_t
            assert q_s.shape[::2] == q_t.shape[::2] and k_s.shape[::2] == k_t.shape[::2], r.name  # B and N
            heads = term.relation_heads or q_s.shape[1]
            assert term.relation_heads or q_s.shape[1] == q_t.shape[1]
            assert (q_s.shape[1] * q_s.shape[3]) % heads == 0 and (q_t.shape[1] * q_t.shape[3]) % heads == 0


def test_cross_attention_maps_on_the_real_presets(real_models):
    """The exact maps: blip-base's decoder attends to the image in all 12 layers, dlip-small's in its
    last 3 of 6, dlip-tiny's in its last 2 of 4."""
    from dlip_ds.config import KDTerm
    from dlip_ds.losses.distill import KDPlan

    teacher = real_models[TEACHER_PRESET]
    assert teacher.module_info("decoder").cross_layers == tuple(range(12))
    small, tiny = real_models["dlip-small"], real_models["dlip-tiny"]
    assert small.module_info("decoder").cross_layers == (3, 4, 5)
    assert small.module_info("fusion").cross_layers == (0, 1, 2)
    assert small.module_info("text").cross_layers == ()

    def pairs(student, **kw):
        with torch.device("meta"):
            return KDPlan([KDTerm(kind="attn", attn="cross", **kw)], student, teacher).terms[0].pairs

    assert pairs(small, module="decoder", relation_heads=6) == ((3, 3), (4, 7), (5, 11))
    assert pairs(small, module="fusion", relation_heads=6) == ((0, 3), (1, 7), (2, 11))
    assert pairs(tiny, module="decoder", relation_heads=4) == ((2, 5), (3, 11))
    assert pairs(tiny, module="decoder", relation_heads=4, layers="last-k", k=2) == ((2, 10), (3, 11))
    assert pairs(small, module="decoder", relation_heads=6, layers=[[5, 11], [3, 0]]) == ((5, 11), (3, 0))


@pytest.mark.parametrize(("term", "message"), [
    # explicit pairs must name layers that attend to the image
    ({"kind": "attn", "attn": "cross", "module": "decoder", "relation_heads": 6, "layers": [[0, 0]]},
     r"loss\.kd\[1\]\.layers: student decoder layer 0 has no cross-attention; only layers \[3, 4, 5\]"),
    ({"kind": "attn", "attn": "cross", "module": "decoder", "relation_heads": 6, "layers": [[3, 12]]},
     r"loss\.kd\[1\]\.layers: teacher layer 12 out of range"),
    # last-k counts cross-attention layers: dlip-small has 3 of them
    ({"kind": "attn", "attn": "cross", "module": "decoder", "relation_heads": 6, "layers": "last-k", "k": 4},
     (r"loss\.kd\[1\]\.k=4: last-k needs 1 <= k <= min\(student cross-attention layers 3, teacher cross-attention "
      r"layers 12\)")),
    # 6 student heads against 12: relation heads needed, and they must divide both widths
    ({"kind": "attn", "attn": "self", "module": "text"}, r"loss\.kd\[1\]: student has 6 heads and teacher 12"),
    ({"kind": "attn", "attn": "cross", "module": "fusion", "relation_heads": 5},
     r"loss\.kd\[1\]\.relation_heads=5 does not divide"),
])
def test_plans_that_cannot_run_fail_before_training(real_models, term, message):
    from dlip_ds.config import ConfigError, KDTerm
    from dlip_ds.losses.distill import KDPlan

    terms = [KDTerm(kind="repr", module="vision"), KDTerm(**term)]
    with torch.device("meta"), pytest.raises(ConfigError, match=message):
        KDPlan(terms, real_models["dlip-small"], real_models[TEACHER_PRESET])


def test_cross_taps_outside_cross_layers_are_refused_before_running(real_models):
    from dlip_ds.models.vlp import TapRequest

    small = real_models["dlip-small"]
    ids = torch.zeros(1, 4, dtype=torch.long, device="meta")
    embeds = torch.zeros(1, 197, 384, device="meta")
    with pytest.raises(ValueError, match=r"decoder tap cross_qk=\[0, 2\]: only layers \[3, 4, 5\]"):
        small.decode(embeds, ids, None, TapRequest(cross_qk=(0, 2, 3)))


# --------------------------------------------------------------------------- real runs, tiny models

# blip-base's topology, small: cross-attention in every text layer, a decoder sharing all but self-attention
TINY_TEACHER = {"vision": {"width": 48, "depth": 3, "heads": 4, "image_size": 32, "patch_size": 8},
                "text": {"width": 48, "depth": 3, "heads": 4, "intermediate": 96},
                "fusion": {"mode": "blip", "layers": 3}, "decoder": {"enabled": True, "share": True}}
# the students' topology: fusion in the last layers only, fewer heads
TINY_STUDENT = {"vision": {"width": 32, "depth": 2, "heads": 2, "image_size": 32, "patch_size": 8},
                "text": {"width": 32, "depth": 3, "heads": 2, "intermediate": 64},
                "fusion": {"mode": "blip", "layers": 2}, "decoder": {"enabled": True, "share": True}}


def _tiny(over: dict, **extra):
    from dlip_ds.config import model_config_from_dict
    from dlip_ds.models.presets import preset_dict
    from dlip_ds.models.vlp import VLPModel

    d = preset_dict("test-tiny")
    for changes in (over, extra):
        for key, value in changes.items():
            d[key] = {**d.get(key, {}), **value} if isinstance(value, dict) else value
    return VLPModel(model_config_from_dict(d))


def _batch(b: int = 3, length: int = 7, vocab: int = 128) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (b, length), generator=g)
    lengths = torch.tensor([length, 4, 5])[:b]
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = ids * mask
    ids[:, 0] = 3
    labels = ids.masked_fill(mask == 0, -100)
    return {"pixel_values": torch.randn(b, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": mask,
            "itm_input_ids": ids, "lm_input_ids": ids, "lm_attention_mask": mask, "lm_labels": labels,
            "image_ids": torch.arange(b)}


def _naive_attention_kd(q_s, k_s, q_t, k_t, relation_heads, temperature, key_pad, query_pad, causal) -> float:
    """Mean over (batch, relation head, valid query row) of KL(A_t || A_s), materialised in float64."""
    def maps(q, k):
        b, h, n, d = q.shape
        r = relation_heads or h
        q = q.detach().double().transpose(1, 2).reshape(b, n, r, h * d // r).transpose(1, 2)
        k = k.detach().double().transpose(1, 2).reshape(b, k.shape[2], r, h * d // r).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / (math.sqrt(h * d / r) * temperature)
        hidden = torch.zeros_like(scores, dtype=torch.bool)
        if key_pad is not None:
            hidden |= key_pad[:, None, None, :]
        if causal:
            hidden |= torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1)
        return torch.log_softmax(scores.masked_fill(hidden, -math.inf), -1), hidden

    logp_s, hidden = maps(q_s, k_s)
    logp_t, _ = maps(q_t, k_t)
    kl = (logp_t.exp() * (logp_t - logp_s)).masked_fill(hidden, 0).sum(-1)  # [B, R, N_q]
    valid = ~hidden.all(-1)
    if query_pad is not None:
        valid &= ~query_pad[:, None, :]
    return float(kl[valid].sum() / valid.sum())


def _naive_repr(h_s, h_t, weight, bias, mask) -> float:
    err = ((h_s.detach().double() @ weight.detach().double().T + bias.detach().double() - h_t.double()) ** 2).mean(-1)
    keep = ~mask if mask is not None else torch.ones_like(err, dtype=torch.bool)
    return float(err[keep].mean())


def _expected(r, plan, student, teacher, masks) -> float:
    """The term from the tapped tensors the plan received, by the naive formulas."""
    term, total = r.term, 0.0
    mask = getattr(masks, term.module, None)
    kind = "hidden" if term.kind == "repr" else f"{term.attn}_qk"
    taps_s, taps_t = student.taps[term.module][kind], teacher.taps[term.module][kind]
    for p, (s, t) in enumerate(r.pairs):
        if term.kind == "repr":
            proj = plan.projections[r.name]
            total += _naive_repr(taps_s[s], taps_t[t], getattr(proj, f"weight_{p}"), getattr(proj, f"bias_{p}"), mask)
        elif term.attn == "cross":  # every image key is real; padded text rows are left out
            total += _naive_attention_kd(*taps_s[s], *taps_t[t], term.relation_heads, term.temperature, None, mask,
                                         False)
        else:
            total += _naive_attention_kd(*taps_s[s], *taps_t[t], term.relation_heads, term.temperature, mask, mask,
                                         term.module == "decoder")
    return total


@pytest.mark.parametrize("share", [True, False], ids=["shared-decoder", "separate-decoder"])
def test_every_term_runs_forward_and_backward_on_the_real_topology(share):
    """One PretrainTask step per term: finite loss and gradients, the term equal to its formula on the
    tapped tensors, and gradients reaching the student through it."""
    from dlip_ds.config import LossConfig
    from dlip_ds.losses.distill import KDPlan
    from dlip_ds.tasks.pretrain import PretrainTask

    torch.manual_seed(0)
    teacher = _tiny(TINY_TEACHER).eval().requires_grad_(False)
    student = _tiny(TINY_STUDENT, decoder={"enabled": True, "share": share})
    specs = _terms() if share else [t for t in _terms() if t[1] == "decoder"]
    for spec in specs:
        plan = KDPlan([_term(student, teacher, *spec, temperature=2.0)], student, teacher)
        r = plan.terms[0]
        task = PretrainTask(student, plan, LossConfig(itc=1.0, itm=1.0, lm=1.0))
        seen: dict = {}
        hook = plan.register_forward_hook(lambda mod, args, out, seen=seen: seen.update(args=args))
        student.zero_grad()
        result = task(_batch(), teacher=teacher, generator=torch.Generator().manual_seed(0))
        hook.remove()
        value = result.terms[f"raw/{r.name}"]
        assert torch.isfinite(result.loss) and float(value) > 0, (r.name, result.terms)
        assert float(value) == pytest.approx(_expected(r, plan, *seen["args"]), rel=1e-4, abs=1e-7), r.name
        result.loss.backward()
        grads = [p.grad for p in task.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), r.name
        # the term alone moves the student: its gradient reaches the tapped layers
        student.zero_grad()
        _term_loss(task, teacher, r.name).backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters()), r.name
        if spec[2] == "cross":  # decoder layers 1, 2 carry the student's cross-attention (its fusion layers 0, 1)
            assert [s for s, _ in r.pairs] == list(student.module_info(spec[1]).cross_layers), r.pairs
            assert r.pairs[-1][1] == 2, r.pairs
    assert student.module_info("decoder").cross_layers == (1, 2)
    assert teacher.module_info("decoder").cross_layers == (0, 1, 2)


def _term_loss(task, teacher, name: str):
    """The unweighted KD term `name` of one step, as a differentiable scalar."""
    out = task.compute(task.batch_type.from_dict(_batch()), teacher, torch.Generator().manual_seed(0))
    return task.plan(out.student, out.teacher, out.masks)[name]
