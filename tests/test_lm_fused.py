"""The student's LM loss through the chunked output projection (`kernels/linear_ce.py`): alone, and
fused with the LM logit KD in one pass; equal to the whole-logits computation it replaced, and the
pretraining task never forms [B, L, V] student logits."""

from __future__ import annotations

import functools
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # importing dlip_ds.kernels may import triton

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dlip_ds.config import KDTerm, LossConfig, model_config_from_dict
from dlip_ds.kernels import linear_ce_kd_loss, linear_cross_entropy, linear_kd_loss
from dlip_ds.losses import distill
from dlip_ds.losses.distill import KDPlan
from dlip_ds.losses.pretrain import lm_loss
from dlip_ds.models.presets import preset_dict
from dlip_ds.models.vlp import VLPModel
from dlip_ds.tasks import pretrain
from dlip_ds.tasks.pretrain import PretrainTask

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors on a shared 2-core machine
    yield
    torch.set_num_threads(threads)


class Largest(TorchDispatchMode):
    """Records the shapes of the tensors ops allocate (views, like w.t(), are not counted)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor) and not func.is_view:
                self.shapes.append(tuple(x.shape))
        return out

    def most_with_last_dim(self, v: int) -> int:
        return max((torch.Size(s).numel() for s in self.shapes if s and s[-1] == v), default=0)


def lm_case(seed=0, b=3, length=9, width=12, t_width=20, vocab=53, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, length, width, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(vocab, width, generator=g, dtype=dtype).mul_(0.5).requires_grad_()
    bias = torch.randn(vocab, generator=g, dtype=dtype).mul_(0.1).requires_grad_()
    h_t, w_t = torch.randn(b, length, t_width, generator=g, dtype=dtype), torch.randn(vocab, t_width, generator=g, dtype=dtype)
    b_t = torch.randn(vocab, generator=g, dtype=dtype)
    labels = torch.randint(0, vocab, (b, length), generator=g)
    labels[:, :2] = -100  # [DEC] and a prompt token
    labels[1, 6:] = -100  # padding
    return h, w, bias, h_t, w_t, b_t, labels


@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_linear_cross_entropy_equals_lm_loss(chunk):
    h, w, b, *_, labels = lm_case()
    got = linear_cross_entropy(h[:, :-1], w, labels[:, 1:], b=b, label_smoothing=0.1, chunk_size=chunk)
    want = lm_loss(F.linear(h, w, b), labels, 0.1)  # the whole-logits LM loss the task used to compute
    assert (got - want).abs().item() <= 1e-5
    for a, e in zip(torch.autograd.grad(got * 2, (h, w, b)), torch.autograd.grad(want * 2, (h, w, b))):
        assert (a - e).abs().max().item() <= 1e-5
    none = linear_cross_entropy(h[:, :-1], w, torch.full_like(labels[:, 1:], -100), b=b)
    assert none.item() == 0.0 and torch.autograd.grad(none, h)[0].abs().max() == 0


def test_linear_cross_entropy_gradcheck_and_checks():
    h, w, b, *_, labels = lm_case(1, b=2, length=5, width=4, vocab=7, dtype=torch.float64)
    fn = lambda h_, w_, b_: linear_cross_entropy(h_, w_, labels, b=b_, label_smoothing=0.2, chunk_size=3)
    assert torch.autograd.gradcheck(fn, (h, w, b))
    with pytest.raises(ValueError, match="targets must be int64"):
        linear_cross_entropy(h, w, labels.float())
    with pytest.raises(ValueError, match="label_smoothing"):
        linear_cross_entropy(h, w, labels, label_smoothing=1.0)


@pytest.mark.parametrize("chunk", [3, 1024])
def test_fused_ce_and_kd_equal_the_unfused_pair(chunk):
    h, w, b, h_t, w_t, b_t, labels = lm_case(2)
    temperature = 2.0
    ce, kd = linear_ce_kd_loss(h[:, :-1], w, labels[:, 1:], h_t[:, :-1], w_t, b_s=b, b_t=b_t, label_smoothing=0.1,
                               temperature=temperature, chunk_size=chunk)
    ref_ce = lm_loss(F.linear(h, w, b), labels, 0.1)
    mask = F.pad(labels[:, 1:] == -100, (0, 1), value=True)  # the task's masks.lm
    ref_kd = linear_kd_loss(h, w, h_t, w_t, b_s=b, b_t=b_t, mask=mask, temperature=temperature, backend="torch")
    assert (ce - ref_ce).abs().item() <= 1e-5 and (kd - ref_kd).abs().item() <= 1e-5
    # each output carries its own gradient: weighted together, and each alone
    for fused, ref in ((2 * ce + 3 * kd, 2 * ref_ce + 3 * ref_kd), (ce, ref_ce), (kd, ref_kd)):
        got = torch.autograd.grad(fused, (h, w, b), retain_graph=True)
        want = torch.autograd.grad(ref, (h, w, b), retain_graph=True)
        for a, e in zip(got, want):
            assert (a - e).abs().max().item() <= 1e-5


def test_chunked_ce_never_holds_whole_logits():
    h, w, b, h_t, w_t, b_t, labels = lm_case(3, b=4, length=16, vocab=997)
    vocab, scored = w.shape[0], int((labels[:, 1:] != -100).sum())
    for fn in (lambda: (linear_cross_entropy(h[:, :-1], w, labels[:, 1:], b=b, chunk_size=4),),
               lambda: linear_ce_kd_loss(h[:, :-1], w, labels[:, 1:], h_t[:, :-1], w_t, b_s=b, b_t=b_t, chunk_size=4)):
        with Largest() as probe:
            torch.autograd.grad(sum(fn()), (h, w, b))
        assert probe.most_with_last_dim(vocab) <= 4 * vocab < scored * vocab  # one chunk's logits at most


# --------------------------------------------------------------------------- the task

TEACHER = {"vision": {"width": 48, "depth": 3, "heads": 4},
           "text": {"width": 48, "depth": 3, "heads": 4, "intermediate": 96}, "fusion": {"layers": 3}}


def tiny(seed: int, teacher: bool = False) -> VLPModel:
    torch.manual_seed(seed)
    d = preset_dict("test-tiny")
    d["text"]["vocab_size"] = 131  # no other activation of the tiny models ends in this size
    for k, v in (TEACHER if teacher else {}).items():
        d[k] = {**d.get(k, {}), **v}
    return VLPModel(model_config_from_dict(d))


def lm_batch(b=4, length=8, vocab=128) -> dict:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, vocab, (b, length), generator=g)
    att = torch.ones(b, length, dtype=torch.long)
    att[1, 5:], att[3, 6:] = 0, 0
    ids[att == 0] = 0
    lm_ids = ids.clone()
    lm_ids[:, 0] = 1  # [DEC]
    labels = lm_ids.masked_fill(att == 0, -100)
    labels[:, 0] = -100
    return {"pixel_values": torch.randn(b, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": att,
            "itm_input_ids": ids.clone(), "lm_input_ids": lm_ids, "lm_attention_mask": att, "lm_labels": labels,
            "image_ids": torch.arange(b)}


def run_step(task, teacher, batch):
    task.zero_grad(set_to_none=True)
    with Largest() as probe:
        out = task(batch, teacher=teacher, generator=torch.Generator().manual_seed(1))
        out.loss.backward()
    grads = {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}
    return out, grads, probe


def test_task_fused_lm_equals_whole_logits(monkeypatch):
    student, teacher = tiny(0), tiny(1, teacher=True).eval()
    terms = [KDTerm(kind="logit", module="lm", weight=1.5, temperature=2.0), KDTerm(kind="repr", module="decoder")]
    task = PretrainTask(student, KDPlan(terms, student, teacher), LossConfig(itm=0.0, lm=2.0, label_smoothing=0.1))
    batch = lm_batch()
    b, length, vocab = *batch["lm_input_ids"].shape, student.cfg.text.vocab_size
    fused, fused_grads, probe = run_step(task, teacher, batch)
    assert probe.most_with_last_dim(vocab) < b * length * vocab  # the student's [B, L, V] logits never existed
    # the path it replaced: whole logits for the LM loss, the plan's own whole-logits KD term
    whole_ce = functools.partial(linear_cross_entropy, backend="torch")
    monkeypatch.setattr(pretrain, "linear_cross_entropy", whole_ce)
    monkeypatch.setattr(distill, "linear_kd_loss", functools.partial(linear_kd_loss, backend="torch"))
    monkeypatch.setattr(KDPlan, "term_for", lambda self, logit: None)
    ref, ref_grads, probe = run_step(task, teacher, batch)
    assert probe.most_with_last_dim(vocab) >= b * (length - 1) * vocab  # the probe sees whole logits
    for name in ("raw/lm", "raw/kd_logit_lm", "weighted/lm", "weighted/kd_logit_lm"):
        assert abs(fused.terms[name].item() - ref.terms[name].item()) <= 1e-5, name
    assert fused.terms["raw/lm"].item() > 0 and fused.terms["raw/kd_logit_lm"].item() > 0
    assert abs(fused.loss.item() - ref.loss.item()) <= 1e-5
    assert fused_grads.keys() == ref_grads.keys()
    names = {id(p): n for n, p in task.named_parameters()}
    head = [names[id(p)] for p in student.lm_projection() if p is not None]  # the LM weight (and bias)
    assert head and all(n in fused_grads for n in head)
    for name, g in ref_grads.items():
        assert (fused_grads[name] - g).abs().max().item() <= 1e-5, name
