"""The downstream tasks (retrieval, captioning, VQA) on tiny models: their losses against BLIP's
formulas written out here, what each refuses, the student carried over from a trained model, and the
best-checkpoint keeper."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from dlip_ds.config import ConfigError, KDTerm, LossConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _vqa_batch(vocab: int, *, seed: int = 0):
    """3 questions with 2, 1 and 3 distinct answers of uneven lengths (padding inside the batch)."""
    g = torch.Generator().manual_seed(seed)
    b, lq, counts = 3, 6, [2, 1, 3]
    q_ids = torch.randint(5, vocab, (b, lq), generator=g)
    q_mask = torch.ones(b, lq, dtype=torch.long)
    q_mask[0, 4:] = 0
    q_mask[2, 3:] = 0
    a = sum(counts)
    a_len = [3, 4, 2, 3, 5, 2]
    a_ids = torch.zeros(a, 5, dtype=torch.long)
    a_mask = torch.zeros(a, 5, dtype=torch.long)
    for i, n in enumerate(a_len):
        a_ids[i, :n] = torch.randint(5, vocab, (n,), generator=g)
        a_ids[i, 0], a_ids[i, n - 1] = 1, 2  # [DEC] ... [SEP] (test-tiny's bos/sep ids)
        a_mask[i, :n] = 1
    return {
        "pixel_values": torch.randn(b, 3, 32, 32, generator=g),
        "question_input_ids": q_ids, "question_attention_mask": q_mask,
        "answer_input_ids": a_ids, "answer_attention_mask": a_mask,
        "answer_labels": a_ids.masked_fill(a_mask == 0, -100),
        "answer_weights": torch.tensor([0.7, 0.3, 1.0, 0.5, 0.3, 0.2]),
        "answer_counts": torch.tensor(counts),
    }


def _vqa_model(tiny_model):
    from dlip_ds.models.vqa import to_vqa_model

    return to_vqa_model(tiny_model(train=True))


def test_vqa_loss_is_blips_weighted_answer_loss(tiny_model):
    """BLIP_VQA: per answer, the label-smoothed CE summed over its tokens; weighted; summed; / questions.
    Written out per answer with an explicit smoothed cross-entropy (no F.cross_entropy smoothing)."""
    from dlip_ds.tasks.vqa import VQATask

    model = _vqa_model(tiny_model).eval()
    task = VQATask(model, None, LossConfig(label_smoothing=0.1))
    batch = _vqa_batch(model.cfg.text.vocab_size)
    got = task(batch).loss

    eps, counts = 0.1, batch["answer_counts"].tolist()
    with torch.no_grad():
        image = model.encode_image(batch["pixel_values"]).embeds
    want, row = 0.0, 0
    for q, n in enumerate(counts):
        ids, mask = batch["question_input_ids"][q:q + 1], batch["question_attention_mask"][q:q + 1]
        keep = int(mask.sum())  # the question alone, unpadded: padding must not matter
        with torch.no_grad():
            states = model.fuse(image[q:q + 1], ids[:, :keep], mask[:, :keep]).hidden
        for _ in range(n):
            length = int(batch["answer_attention_mask"][row].sum())
            ans = batch["answer_input_ids"][row:row + 1, :length]
            with torch.no_grad():
                hidden = model.decode(states, ans, torch.ones_like(ans)).hidden
                logp = F.log_softmax(model.lm_logits_from_hidden(hidden)[0].double(), dim=-1)
            loss = 0.0
            for j in range(length - 1):
                target = int(ans[0, j + 1])
                loss += (1 - eps) * -logp[j, target] - eps * logp[j].mean()
            want += float(batch["answer_weights"][row]) * float(loss)
            row += 1
    want /= len(counts)
    assert got.detach().item() == pytest.approx(float(want), rel=1e-4)


def test_vqa_task_needs_vqa_topology_and_refuses_answer_cross_attention_kd(tiny_model):
    from dlip_ds.losses.distill import KDPlan
    from dlip_ds.tasks.vqa import VQATask

    with pytest.raises(ConfigError, match="decoder.context=question"):
        VQATask(tiny_model(train=True), None, LossConfig())
    student, teacher = _vqa_model(tiny_model), _vqa_model(tiny_model)
    plan = KDPlan([KDTerm(kind="attn", module="decoder", attn="cross", layers=[[1, 1]])], student, teacher)
    with pytest.raises(ConfigError, match="cross-attention KD of the answer decoder"):
        VQATask(student, plan, LossConfig())
    with pytest.raises(ConfigError, match="distils from a VQA model"):
        VQATask.check_teacher(tiny_model(), "teacher.source x")


def test_vqa_task_distils_question_decoder_and_answers(tiny_model):
    """Every KD term of the VQA plan runs and is finite; an identical teacher gives zero logit KD."""
    from dlip_ds.losses.distill import KDPlan
    from dlip_ds.tasks.vqa import VQATask

    student = _vqa_model(tiny_model)
    terms = [KDTerm(kind="repr", module=m) for m in ("vision", "fusion", "decoder")]
    terms += [KDTerm(kind="attn", module="decoder", attn="self", layers=[[1, 1]]), KDTerm(kind="logit", module="lm")]
    task = VQATask(student, KDPlan(terms, student, student), LossConfig())
    result = task(_vqa_batch(student.cfg.text.vocab_size), teacher=student)
    raw = {k[4:]: v for k, v in result.terms.items() if k.startswith("raw/")}
    assert set(raw) == {"vqa", "kd_repr_vision", "kd_repr_fusion", "kd_repr_decoder", "kd_attn_self_decoder",
                        "kd_logit_lm"}, raw
    assert all(math.isfinite(v.item()) for v in raw.values())
    assert raw["kd_logit_lm"].item() == pytest.approx(0.0, abs=1e-5)
    assert raw["kd_attn_self_decoder"].item() == pytest.approx(0.0, abs=1e-5)
    result.loss.backward()
    assert student.decoder.stack.layers[0].self_attn.query.weight.grad is not None


def test_retrieval_task_refusals_and_topology(tiny_model):
    from dlip_ds.losses.distill import KDPlan
    from dlip_ds.tasks.retrieval import RetrievalTask

    model = tiny_model(train=True)
    with pytest.raises(ConfigError, match="loss.lm=0"):
        RetrievalTask(model, None, LossConfig(itc_same_image=True))
    with pytest.raises(ConfigError, match="itc_same_image=true"):
        RetrievalTask(model, None, LossConfig(lm=0))
    plan = KDPlan([KDTerm(kind="repr", module="decoder")], model, tiny_model())
    with pytest.raises(ConfigError, match="produces no 'decoder'"):
        RetrievalTask(model, plan, LossConfig(lm=0, itc_same_image=True))
    adapted = RetrievalTask.adapt_student(model)
    assert not adapted.cfg.decoder.enabled and not hasattr(adapted, "decoder")
    assert torch.equal(adapted.vision.patch_embed.proj.weight, model.vision.patch_embed.proj.weight)


def test_captioning_trains_only_what_the_captioner_reads(tiny_model):
    from dlip_ds.tasks.captioning import CaptioningTask

    with pytest.raises(ConfigError, match="loss.itc=0"):
        CaptioningTask(tiny_model(train=True), None, LossConfig())
    model = tiny_model(train=True, momentum=True)
    task = CaptioningTask(model, None, LossConfig(itc=0, itm=0))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.cfg.text.vocab_size, (2, 7), generator=g)
    ids[:, 0] = 1
    labels = ids.clone()
    labels[:, :3] = -100  # [DEC] + a two-token prompt
    batch = {"pixel_values": torch.randn(2, 3, 32, 32, generator=g), "lm_input_ids": ids,
             "lm_attention_mask": torch.ones_like(ids), "lm_labels": labels}
    task(batch).loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert got == trainable  # nothing trainable is left without a gradient (ZeRO would reduce zeros)
    assert not any(n.startswith(("itc.", "itm_head.", "momentum.")) or ".self_attn." in n and n.startswith("text.")
                   for n in trainable)
    assert any(n.startswith("decoder.self_attn.") for n in trainable) and "text.embeddings.word_embeddings.weight" in got


def test_student_from_source_in_the_tasks_topology(tmp_path, tiny_model):
    """student.source: the run's student is the source model in the task's topology, its weights kept,
    the recipe's model fields applied (momentum on for retrieval: copies of the online encoders)."""
    from dlip_ds.engine.build import student_from_source
    from dlip_ds.models.dlip_format import save_model
    from dlip_ds.recipe import recipe_from_dict
    from dlip_ds.tasks import task_class

    source = tiny_model()
    save_model(source, tmp_path / "src")
    recipe = recipe_from_dict({"task": "retrieval", "student": {"source": str(tmp_path / "src"), "momentum": True},
                               "loss": {"lm": 0, "itc_same_image": True}})
    recipe.student.model.text.vocab_size = source.cfg.text.vocab_size
    student = student_from_source(recipe, task_class("retrieval"))
    assert student.cfg.momentum and not student.cfg.decoder.enabled
    assert torch.equal(student.momentum.vision.patch_embed.proj.weight, source.vision.patch_embed.proj.weight)
    assert torch.equal(student.text.layers[1].cross_attn.key.weight, source.text.layers[1].cross_attn.key.weight)

    vqa_recipe = recipe_from_dict({"task": "vqa", "student": {"source": str(tmp_path / "src")}})
    vqa_recipe.student.model.text.vocab_size = source.cfg.text.vocab_size
    vqa = student_from_source(vqa_recipe, task_class("vqa"))
    assert vqa.cfg.decoder.context == "question" and not vqa.cfg.decoder.share
    recipe.student.model.text.vocab_size += 1
    with pytest.raises(ConfigError, match="vocabulary"):
        student_from_source(recipe, task_class("retrieval"))
    with pytest.raises(ConfigError, match="preset or source"):
        recipe_from_dict({"student": {"source": "x", "preset": "test-tiny"}})


def test_best_keeper_keeps_the_best_whole_and_survives_a_restart(tmp_path, tiny_model):
    from dlip_ds.engine.evaluation import BestKeeper
    from dlip_ds.models.load import load_model

    keeper = BestKeeper(tmp_path, "r_mean")
    a, b = tiny_model(seed=1), tiny_model(seed=2)
    assert keeper.offer(10, {"r_mean": 50.0}, a, None)
    assert not keeper.offer(20, {"r_mean": 40.0}, b, None)
    again = BestKeeper(tmp_path, "r_mean")  # a resumed run compares against what is on disk
    assert again.best["step"] == 10 and not again.offer(30, {"r_mean": 50.0}, b, None)
    assert torch.equal(load_model(tmp_path / "best").vision.patch_embed.proj.weight, a.vision.patch_embed.proj.weight)
    assert again.offer(40, {"r_mean": 60.0}, b, None)
    assert torch.equal(load_model(tmp_path / "best").vision.patch_embed.proj.weight, b.vision.patch_embed.proj.weight)
    assert json.loads((tmp_path / "best" / "best.json").read_text())["step"] == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no temporary directory left
    with pytest.raises(KeyError, match="r_mean"):
        again.offer(50, {"cider": 1.0}, b, None)
