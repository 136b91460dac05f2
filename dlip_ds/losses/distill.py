"""The distillation plan: which teacher layers teach which student layers, and how.

A recipe lists `KDTerm`s (config.py). `KDPlan` resolves each term's layer map against the two
models, checks that the term can run on them (and fails before training with a `ConfigError` that
names `loss.kd[i]`), owns the representation projections W, b (trained and checkpointed with the
student), says which taps each model must return, and turns the taps into one loss per term:

- repr:  sum over mapped pairs of MSE(h_s W^T + b, h_t), padding masked (`repr_kd_loss`)
- attn:  sum over mapped pairs of KL(A_t || A_s) of self- or cross-attention (`attention_kd_loss`),
         causal for the decoder's self-attention
- logit: itc (similarity distributions, both directions), itm (2-way logits), lm (token
         distributions through both LM heads, `linear_kd_loss`), each T^2 * KL at temperature T

Values are unweighted; `plan.weights[name]` gives each term's weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from dlip_ds.config import MODULES, ConfigError, KDTerm, check_kd_term
from dlip_ds.kernels import attention_kd_loss, linear_kd_loss, repr_kd_loss
from dlip_ds.losses.kd_inputs import KDInputs, KDMasks
from dlip_ds.models.vlp import TapRequest


def default_kd_terms() -> list[KDTerm]:
    """The paper's findings as KD terms (design card section 1).

    Representation terms on every module with the fused (multimodal) one weighted highest
    (finding 3), the decoder distilled on its own (finding 2), logit terms on; attention terms are
    available (`KDTerm(kind="attn", ...)`) but off, since representations distil better (finding 3).
    """
    return [
        KDTerm(kind="repr", module="vision", weight=1.0),
        KDTerm(kind="repr", module="text", weight=1.0),
        KDTerm(kind="repr", module="fusion", weight=2.0),
        KDTerm(kind="repr", module="decoder", weight=1.0),
        KDTerm(kind="logit", module="itc", weight=1.0),
        KDTerm(kind="logit", module="itm", weight=1.0),
        KDTerm(kind="logit", module="lm", weight=1.0),
    ]


def resolve_layer_map(layers, k: int, student_depth: int, teacher_depth: int, where: str, *,
                      counted: str = "depth") -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs, 0-based.

    - "uniform": every student layer i learns from teacher layer round((i+1) * T / S) - 1
      (rounded half up, at least 0): the last layers align, the others spread evenly.
    - "last-k":  the last k student layers learn from the last k teacher layers, in order.
    - [[s, t], ...]: explicit pairs.
    `counted` names what the depths count, for messages.
    """
    s_depth, t_depth = student_depth, teacher_depth
    if layers == "uniform":
        return [(i, max((2 * (i + 1) * t_depth + s_depth) // (2 * s_depth) - 1, 0)) for i in range(s_depth)]
    if layers == "last-k":
        if not 1 <= k <= min(s_depth, t_depth):
            raise ConfigError(f"{where}.k={k}: last-k needs 1 <= k <= min(student {counted} {s_depth}, "
                              f"teacher {counted} {t_depth})")
        return [(s_depth - k + j, t_depth - k + j) for j in range(k)]
    if isinstance(layers, str):
        raise ConfigError(f"{where}.layers must be 'uniform', 'last-k' or a list of [student, teacher] pairs, "
                          f"got '{layers}'")
    pairs = []
    for p in layers:
        if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, int) for x in p)):
            raise ConfigError(f"{where}.layers: expected [student, teacher] integer pairs, got {p!r}")
        s, t = p
        if not 0 <= s < s_depth:
            raise ConfigError(f"{where}.layers: student layer {s} out of range (0..{s_depth - 1})")
        if not 0 <= t < t_depth:
            raise ConfigError(f"{where}.layers: teacher layer {t} out of range (0..{t_depth - 1})")
        pairs.append((s, t))
    if not pairs:
        raise ConfigError(f"{where}.layers: empty list of pairs")
    return pairs


@dataclass(frozen=True)
class ResolvedTerm:
    name: str  # unique, e.g. "kd_repr_fusion", "kd_attn_cross_decoder", "kd_logit_lm"
    term: KDTerm
    pairs: tuple[tuple[int, int], ...]  # empty for logit terms


def _term_name(term: KDTerm) -> str:
    if term.kind == "attn":
        return f"kd_attn_{term.attn}_{term.module}"
    return f"kd_{term.kind}_{term.module}"


def _info(model, module: str, who: str, where: str):
    """ModuleInfo of `module`, or a ConfigError when the model lacks it."""
    try:
        info = model.module_info(module)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{where}: the {who} has no {module} module ({e})") from e
    if info.depth < 1:
        raise ConfigError(f"{where}: the {who} has no {module} layers")
    return info


def _check_term(term: KDTerm, student, teacher, where: str) -> tuple[tuple[int, int], ...]:
    """Validate one term against both models; return its layer pairs."""
    check_kd_term(term, where)
    if term.kind == "logit":
        if term.module == "itm":
            _info(student, "fusion", "student", where), _info(teacher, "fusion", "teacher", where)
        if term.module == "lm":
            _info(student, "decoder", "student", where), _info(teacher, "decoder", "teacher", where)
            v_s, v_t = student.cfg.text.vocab_size, teacher.cfg.text.vocab_size
            if v_s != v_t:
                raise ConfigError(f"{where}: LM distillation needs one vocabulary, student has {v_s} tokens "
                                  f"and teacher {v_t}")
        return ()
    s_info = _info(student, term.module, "student", where)
    t_info = _info(teacher, term.module, "teacher", where)
    image_tokens = term.module == "vision" or (term.kind == "attn" and term.attn == "cross")
    if image_tokens and student.cfg.vision.patch_size != teacher.cfg.vision.patch_size:
        raise ConfigError(f"{where}: student and teacher cut images into different patches "
                          f"({student.cfg.vision.patch_size} vs {teacher.cfg.vision.patch_size} px), so their "
                          "image tokens do not align")
    if term.kind == "attn":
        _check_attention(term, s_info, t_info, where)
        if term.attn == "cross":
            return _cross_pairs(term, s_info, t_info, where)
    return tuple(resolve_layer_map(term.layers, term.k, s_info.depth, t_info.depth, where))


def _cross_pairs(term: KDTerm, s_info, t_info, where: str) -> tuple[tuple[int, int], ...]:
    """Layer pairs of a cross-attention term, over the layers that carry cross-attention: in blip mode
    the decoder runs every text layer but only the last fusion.layers attend to the image. "uniform" and
    "last-k" count those layers only; explicit pairs must name them."""
    s_cross, t_cross = s_info.cross_layers, t_info.cross_layers
    if isinstance(term.layers, str):
        pairs = resolve_layer_map(term.layers, term.k, len(s_cross), len(t_cross), where,
                                  counted="cross-attention layers")
        return tuple((s_cross[s], t_cross[t]) for s, t in pairs)
    pairs = resolve_layer_map(term.layers, term.k, s_info.depth, t_info.depth, where)
    for who, layer, cross in [("student", s, s_cross) for s, _ in pairs] + [("teacher", t, t_cross) for _, t in pairs]:
        if layer not in cross:
            raise ConfigError(f"{where}.layers: {who} {term.module} layer {layer} has no cross-attention; "
                              f"only layers {list(cross)} of the {who}'s {term.module} attend to the image")
    return tuple(pairs)


def _check_attention(term: KDTerm, s_info, t_info, where: str) -> None:
    if term.attn == "cross" and not (s_info.has_cross and t_info.has_cross):
        who = "student" if not s_info.has_cross else "teacher"
        raise ConfigError(f"{where}: the {who}'s {term.module} layers have no cross-attention")
    r = term.relation_heads
    if r is None:
        if s_info.heads != t_info.heads:
            raise ConfigError(f"{where}: student has {s_info.heads} heads and teacher {t_info.heads} in "
                              f"{term.module}; set relation_heads to a count dividing both widths")
        return
    for who, info in (("student", s_info), ("teacher", t_info)):
        channels = info.heads * info.head_dim
        if r < 1 or channels % r:
            raise ConfigError(f"{where}.relation_heads={r} does not divide the {who}'s {channels} "
                              f"attention channels in {term.module}")


class ReprProjection(nn.Module):
    """W_p, b_p (student width -> teacher width) for every mapped pair of one representation term.

    The parameters are this module's own (not in child Linear modules), so calling it is what makes
    ZeRO-3 gather them.
    """

    def __init__(self, num_pairs: int, student_width: int, teacher_width: int):
        super().__init__()
        self.num_pairs = num_pairs
        for p in range(num_pairs):
            init = nn.Linear(student_width, teacher_width)  # nn.Linear's initialisation
            self.register_parameter(f"weight_{p}", init.weight)
            self.register_parameter(f"bias_{p}", init.bias)

    def forward(self, h_s: list[Tensor], h_t: list[Tensor], mask: Tensor | None) -> Tensor:
        weights = [getattr(self, f"weight_{p}") for p in range(self.num_pairs)]
        biases = [getattr(self, f"bias_{p}") for p in range(self.num_pairs)]
        return repr_kd_loss(h_s, h_t, weights, biases, mask=mask)


def _logit_kl(z_s: Tensor, z_t: Tensor, temperature: float) -> Tensor:
    """T^2 * mean over rows of KL(softmax(z_t / T) || softmax(z_s / T)), in fp32."""
    logp_s = F.log_softmax(z_s.float() / temperature, dim=-1)
    logp_t = F.log_softmax(z_t.detach().float() / temperature, dim=-1)
    return temperature**2 * F.kl_div(logp_s, logp_t, log_target=True, reduction="batchmean")


def _pair_tensors(taps_s: dict, taps_t: dict, kind: str, pairs, where: str) -> tuple[list, list]:
    try:
        return [taps_s[kind][s] for s, _ in pairs], [taps_t[kind][t] for _, t in pairs]
    except KeyError as e:  # the step module did not run the taps the plan requested
        raise RuntimeError(f"{where}: missing {kind} tap {e}; pass the plan's tap_requests() to the models") from e


class KDPlan(nn.Module):
    """Distillation terms resolved against one student/teacher pair (docs/architecture.md section 5).

    `plan(student, teacher, masks)` takes each model's `KDInputs` (the taps of each stage and the
    logit-level outputs a task produced) and the `KDMasks`, and returns one loss per term.
    """

    def __init__(self, terms: list[KDTerm], student, teacher):
        super().__init__()
        resolved, seen = [], set()
        self.projections = nn.ModuleDict()
        for i, term in enumerate(terms):
            where = f"loss.kd[{i}]"
            pairs = _check_term(term, student, teacher, where)
            name = _term_name(term)
            if name in seen:  # the same kind/module twice (e.g. two layer maps): keep both, apart
                name = f"{name}_{i}"
            seen.add(name)
            if term.kind == "repr":
                s_width = student.module_info(term.module).width
                t_width = teacher.module_info(term.module).width
                self.projections[name] = ReprProjection(len(pairs), s_width, t_width)
            resolved.append(ResolvedTerm(name, term, pairs))
        self.terms: tuple[ResolvedTerm, ...] = tuple(resolved)
        self.weights: dict[str, float] = {r.name: r.term.weight for r in resolved}

    def needs(self, key: str) -> bool:
        """Whether any term reads `key`: a module (its taps) or a logit output ("itc", "itm", "lm")."""
        return any(r.term.module == key for r in self.terms)

    def term_for(self, logit: str) -> ResolvedTerm | None:
        """The logit term on `logit` ("itc", "itm", "lm") when there is exactly one, else None. A task
        that computes that term itself (the LM loss and `kd_logit_lm` in one chunked pass) reads its
        name and temperature here and hands the plan no student inputs for it."""
        found = [r for r in self.terms if r.term.kind == "logit" and r.term.module == logit]
        return found[0] if len(found) == 1 else None

    def tap_requests(self) -> tuple[dict[str, TapRequest], dict[str, TapRequest]]:
        """(student, teacher) dicts module -> TapRequest: the union of what the terms read."""
        wanted = {side: {m: {"hidden": set(), "self_qk": set(), "cross_qk": set()} for m in MODULES}
                  for side in ("student", "teacher")}
        for r in self.terms:
            if r.term.kind == "logit":
                continue
            kind = "hidden" if r.term.kind == "repr" else f"{r.term.attn}_qk"
            for s, t in r.pairs:
                wanted["student"][r.term.module][kind].add(s)
                wanted["teacher"][r.term.module][kind].add(t)

        def requests(side: str) -> dict[str, TapRequest]:
            return {m: TapRequest(**{k: tuple(sorted(v)) for k, v in kinds.items()})
                    for m, kinds in wanted[side].items() if any(kinds.values())}

        return requests("student"), requests("teacher")

    def forward(self, student: KDInputs, teacher: KDInputs, masks: KDMasks) -> dict[str, Tensor]:
        """One unweighted loss per term, named as in `self.terms`; but the single lm term is left out
        when `student.lm` is None: the task then computed it itself (`term_for`)."""
        losses = {}
        for r in self.terms:
            term, where = r.term, f"KD term '{r.name}'"
            if term.kind == "logit":
                if term.module == "lm" and student.lm is None and self.term_for("lm") is r:
                    continue  # the task computed it with its LM loss (PretrainTask._language_model)
                losses[r.name] = self._logit(term, student, teacher, masks.lm)
                continue
            mask = masks.of(term.module)
            taps_s, taps_t = student.taps.get(term.module, {}), teacher.taps.get(term.module, {})
            if term.kind == "repr":
                h_s, h_t = _pair_tensors(taps_s, taps_t, "hidden", r.pairs, where)
                losses[r.name] = self.projections[r.name](h_s, h_t, mask)
                continue
            qk_s, qk_t = _pair_tensors(taps_s, taps_t, f"{term.attn}_qk", r.pairs, where)
            if term.attn == "cross":  # text queries on image keys: every key is real, rows may be padding
                kw = {"key_padding_mask": None, "query_padding_mask": mask}
            else:
                kw = {"key_padding_mask": mask, "causal": term.module == "decoder"}
            losses[r.name] = sum(
                attention_kd_loss(qs, ks, qt, kt, relation_heads=term.relation_heads,
                                  temperature=term.temperature, **kw)
                for (qs, ks), (qt, kt) in zip(qk_s, qk_t))
        return losses

    @staticmethod
    def _logit(term: KDTerm, student: KDInputs, teacher: KDInputs, lm_mask: Tensor | None) -> Tensor:
        temp = term.temperature
        if term.module == "itc":
            s, t = student.itc, teacher.itc
            return (_logit_kl(s.i2t, t.i2t, temp) + _logit_kl(s.t2i, t.t2i, temp)) / 2
        if term.module == "itm":
            return _logit_kl(student.itm, teacher.itm, temp)
        s, t = student.lm, teacher.lm
        return linear_kd_loss(s.features, s.weight, t.features, t.weight, b_s=s.bias, b_t=t.bias, mask=lm_mask,
                              temperature=temp)

