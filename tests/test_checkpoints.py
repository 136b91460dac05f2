"""Checkpoints in and out, against the references: transformers' BLIP (conformance at two sizes, export
round trip, generation), Salesforce-layout state dicts made by renaming keys, timm ViT, transformers BERT."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from helpers import evenly, perturbed, salesforce_vision_key
from safetensors.torch import load_file, save_file

import dlip_ds
from dlip_ds.config import ConfigError, InitConfig
from dlip_ds.models.dlip_format import save_model
from dlip_ds.models.hf_blip import export_hf_blip
from dlip_ds.models.init import init_student, pick_layers

SIZES = {
    "narrow": {
        "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                   "image_size": 32, "patch_size": 8},
        "text": {"vocab_size": 99, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "max_position_embeddings": 40},
        "proj": 16,
    },
    "wide": {  # other norms and activations too, so that those config fields are exercised
        "vision": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 3,
                   "image_size": 48, "patch_size": 16, "layer_norm_eps": 1e-6},
        "text": {"vocab_size": 150, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
                 "num_attention_heads": 4, "max_position_embeddings": 50, "layer_norm_eps": 1e-6,
                 "hidden_act": "gelu_new"},
        "proj": 24,
    },
}
TOL = 1e-4


def hf_config(size: str):
    s = SIZES[size]
    vocab = s["text"]["vocab_size"]
    return transformers.BlipConfig(
        vision_config={**s["vision"], "initializer_range": 0.02},
        text_config={**s["text"], "bos_token_id": vocab - 2, "sep_token_id": 2, "pad_token_id": 0},
        image_text_hidden_size=s["proj"])


def inputs(size: str, b: int = 3, n: int = 9, seed: int = 0):
    s = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    px = torch.randn(b, 3, s["vision"]["image_size"], s["vision"]["image_size"], generator=g)
    ids = torch.randint(3, s["text"]["vocab_size"] - 2, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return px, ids, mask


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """Per size: a random BlipForImageTextRetrieval and BlipForConditionalGeneration, saved to disk."""
    out = {}
    for i, size in enumerate(SIZES):
        torch.manual_seed(i)
        ret = perturbed(transformers.BlipForImageTextRetrieval(hf_config(size)), 10 + i)
        cap = perturbed(transformers.BlipForConditionalGeneration(hf_config(size)), 20 + i)
        d = tmp_path_factory.mktemp(f"hf-{size}")
        ret.save_pretrained(d / "retrieval")
        cap.save_pretrained(d / "captioning")
        out[size] = (ret, cap, d)
    return out


def hf_scores(ret, px, ids, mask):
    with torch.no_grad():
        sims = ret(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=False).itm_score
        itm = ret(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=True).itm_score
    return sims, itm


def our_scores(model, px, ids, mask):
    with torch.no_grad():
        img, txt = model.itc_features(px, ids, mask)
        return img @ txt.T, model.itm_logits(px, ids, mask)


def hf_lm(cap, px, ids, mask):
    with torch.no_grad():
        return cap(pixel_values=px, input_ids=ids, attention_mask=mask).logits


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------- transformers BLIP in


@pytest.mark.parametrize("size", list(SIZES))
def test_hf_retrieval_conformance(hf_models, size):
    ret, _, d = hf_models[size]
    ours = dlip_ds.load_model(d / "retrieval")
    assert not ours.cfg.decoder.enabled and ours.cfg.fusion.layers == ours.cfg.text.depth
    px, ids, mask = inputs(size)
    (sims, itm), (our_sims, our_itm) = hf_scores(ret, px, ids, mask), our_scores(ours, px, ids, mask)
    assert max_diff(our_sims, sims) <= TOL
    assert max_diff(our_itm, itm) <= TOL


@pytest.mark.parametrize("size", list(SIZES))
def test_hf_captioning_conformance(hf_models, size):
    _, cap, d = hf_models[size]
    ours = dlip_ds.load_model(d / "captioning")
    assert ours.cfg.decoder.enabled and not ours.cfg.decoder.share
    px, ids, mask = inputs(size)
    with torch.no_grad():
        logits = ours.lm_logits(px, ids, mask)
    assert max_diff(logits, hf_lm(cap, px, ids, mask)) <= TOL


@pytest.mark.parametrize("size", list(SIZES))
def test_generation_matches_transformers(hf_models, size):
    _, cap, d = hf_models[size]
    ours = dlip_ds.load_model(d / "captioning")
    sep, bos = cap.config.text_config.sep_token_id, cap.config.text_config.bos_token_id
    with torch.no_grad():  # make [SEP] likely so that beams finish at different lengths
        cap.text_decoder.cls.predictions.bias[sep] += 1.5
        ours.lm_head.bias[sep] += 1.5
    px, _, _ = inputs(size, b=4)
    prompt = [7, 8]
    for beams, penalty in ((1, 1.0), (1, 1.3), (3, 1.0), (4, 1.2)):
        kw = {"num_beams": beams, "max_length": 14, "min_length": 5, "repetition_penalty": penalty}
        start = torch.tensor([[bos] + prompt + [sep]] * 4)
        with torch.no_grad():
            ref = cap.generate(pixel_values=px, input_ids=start, **kw).tolist()
        ref = [row[3:] for row in ref]
        ref = [row[: row.index(sep)] if sep in row else row for row in ref]
        assert ours.generate(px, prompt=prompt, **kw) == ref, kw
    assert any(len(r) < 11 for r in ref)  # some captions ended on [SEP]


# --------------------------------------------------------------------------- transformers BLIP out


@pytest.fixture
def tiny(tiny_model):
    """tiny(**overrides): conftest's test-tiny (seed 0), then perturbed like the transformers references."""
    return lambda **over: perturbed(tiny_model(**over), 3)


@pytest.mark.parametrize("share", [True, False])
def test_export_hf_round_trip(tmp_path, share, tiny):
    ours = tiny(decoder={"share": share})
    px, ids, mask = inputs("narrow")
    ids = ids.clamp(max=120)
    export_hf_blip(ours, tmp_path / "r")
    ret, info = transformers.BlipForImageTextRetrieval.from_pretrained(tmp_path / "r", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    (sims, itm), (our_sims, our_itm) = hf_scores(ret.eval(), px, ids, mask), our_scores(ours, px, ids, mask)
    assert max_diff(our_sims, sims) <= TOL and max_diff(our_itm, itm) <= TOL

    export_hf_blip(ours, tmp_path / "c", task="captioning")
    cap, info = transformers.BlipForConditionalGeneration.from_pretrained(tmp_path / "c", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert max_diff(ours.lm_logits(px, ids, mask), hf_lm(cap.eval(), px, ids, mask)) <= TOL
    # and back in: the captioner's decoder gives the same logits again
    back = dlip_ds.load_model(tmp_path / "c")
    with torch.no_grad():
        assert max_diff(back.lm_logits(px, ids, mask), ours.lm_logits(px, ids, mask)) <= TOL


def test_export_hf_refuses_other_topologies(tmp_path, tiny):
    with pytest.raises(ConfigError, match="fusion.mode='albef'"):
        export_hf_blip(tiny(fusion={"mode": "albef", "layers": 1}), tmp_path)
    with pytest.raises(ConfigError, match="fusion.layers=1 < text.depth=2"):
        export_hf_blip(tiny(fusion={"layers": 1}), tmp_path)
    with pytest.raises(ConfigError, match="decoder.enabled=false"):
        export_hf_blip(tiny(decoder={"enabled": False}), tmp_path, task="captioning")


# --------------------------------------------------------------------------- Salesforce BLIP .pth


def salesforce_state(ret, cap=None, momentum=None) -> dict:
    """A `models/blip_pretrain.py` state dict: the decoder ties every weight but self-attention to the
    text encoder (as `tie_encoder_decoder_weights` does), momentum copies `*_m`, temperature and queues."""
    state = {}
    for k, v in ret.state_dict().items():
        state[salesforce_vision_key(k)] = v  # text_encoder.*, vision_proj, text_proj, itm_head keep their names
    state["text_encoder.embeddings.position_ids"] = torch.arange(40)[None]  # a buffer older torch saved
    if cap is not None:
        for k, v in cap.state_dict().items():
            if k.startswith("text_decoder.bert."):
                enc = k.replace("text_decoder.bert.", "text_encoder.")
                state[k] = v if ".attention." in k else state[enc]
            elif k.startswith("text_decoder.cls."):
                state[k] = v
        state["text_decoder.cls.predictions.decoder.weight"] = state["text_encoder.embeddings.word_embeddings.weight"]
    if momentum is not None:
        for k, v in momentum.state_dict().items():
            if k.startswith("vision_model."):
                state[salesforce_vision_key(k).replace("visual_encoder.", "visual_encoder_m.")] = v
            elif k.startswith("text_encoder."):
                state[k.replace("text_encoder.", "text_encoder_m.")] = v
            elif k.startswith(("vision_proj.", "text_proj.")):
                state[k.replace("_proj.", "_proj_m.")] = v
        state["temp"] = torch.tensor(0.05)
        state["image_queue"] = torch.randn(16, 64)
        state["text_queue"] = torch.randn(16, 64)
        state["queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return state


def med_config(size: str) -> dict:
    t = hf_config(size).text_config
    return {"architectures": ["BertModel"], "hidden_size": t.hidden_size, "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads, "intermediate_size": t.intermediate_size,
            "vocab_size": t.vocab_size, "layer_norm_eps": t.layer_norm_eps, "hidden_act": t.hidden_act,
            "max_position_embeddings": t.max_position_embeddings, "encoder_width": 32, "add_cross_attention": True}


def test_salesforce_pretrain_checkpoint(hf_models, tmp_path):
    ret, cap, _ = hf_models["narrow"]
    mom = perturbed(transformers.BlipForImageTextRetrieval(hf_config("narrow")), 99)
    state = salesforce_state(ret, cap, mom)
    torch.save({"model": state, "epoch": 3}, tmp_path / "model_base.pth")
    (tmp_path / "med_config.json").write_text(json.dumps(med_config("narrow")))
    # BLIP's ViTs have 64-wide heads and eps 1e-6; this tiny one says otherwise
    ours = dlip_ds.load_model(tmp_path / "model_base.pth", vision={"heads": 2, "layer_norm_eps": 1e-5})
    assert ours.cfg.decoder.share and ours.cfg.momentum
    px, ids, mask = inputs("narrow")
    (sims, itm), (our_sims, our_itm) = hf_scores(ret, px, ids, mask), our_scores(ours, px, ids, mask)
    assert max_diff(our_sims, sims) <= TOL and max_diff(our_itm, itm) <= TOL
    # reference captioner: transformers BLIP holding the tied decoder BLIP pretraining has
    ref = transformers.BlipForConditionalGeneration(hf_config("narrow")).eval()
    ref_state = {"vision_model." + k: v for k, v in ret.vision_model.state_dict().items()}
    ref_state.update({k: v for k, v in state.items() if k.startswith("text_decoder.")})
    ref.load_state_dict(ref_state, strict=False)
    missing = set(ref.state_dict()) - set(ref_state)
    assert not missing, missing
    with torch.no_grad():
        assert max_diff(ours.lm_logits(px, ids, mask), hf_lm(ref, px, ids, mask)) <= TOL
        img_m, txt_m = ours.momentum_itc_features(px, ids, mask)
    assert max_diff(img_m @ txt_m.T, hf_scores(mom, px, ids, mask)[0]) <= TOL
    assert ours.temperature().item() == pytest.approx(0.05)


def test_salesforce_captioner_checkpoint(hf_models, tmp_path, caplog):
    """`models/blip.py` BLIP_Decoder: visual_encoder + text_decoder only (its own, untied weights)."""
    _, cap, _ = hf_models["wide"]
    state = {salesforce_vision_key(k): v for k, v in cap.state_dict().items()}
    torch.save(state, tmp_path / "model_base_caption.pth")
    (tmp_path / "med.json").write_text(json.dumps(med_config("wide")))
    ours = dlip_ds.load_model(tmp_path / "model_base_caption.pth", med_config=tmp_path / "med.json",
                              vision={"heads": 3})
    assert ours.cfg.decoder.enabled and not ours.cfg.decoder.share and not ours.cfg.momentum
    assert "text" in caplog.text  # the text encoder stays random, and says so
    px, ids, mask = inputs("wide")
    with torch.no_grad():
        assert max_diff(ours.lm_logits(px, ids, mask), hf_lm(cap, px, ids, mask)) <= TOL
    state["text_decoder.cls.predictions.decoder.weight"] = torch.zeros_like(
        state["text_decoder.cls.predictions.decoder.weight"])
    torch.save(state, tmp_path / "untied.pth")
    with pytest.raises(ConfigError, match="tied"):
        dlip_ds.load_model(tmp_path / "untied.pth", med_config=tmp_path / "med.json", vision={"heads": 3})


def test_refuses_pickled_objects(tmp_path):
    torch.save({"model": {"x": torch.zeros(1)}, "args": InitConfig()}, tmp_path / "evil.pth")
    with pytest.raises(ConfigError, match="weights-only"):
        dlip_ds.load_model(tmp_path / "evil.pth")


# --------------------------------------------------------------------------- our format


def test_our_format_round_trip_and_strict_keys(tmp_path, tiny):
    ours = tiny(momentum=True)
    save_model(ours, tmp_path / "m")
    back = dlip_ds.load_model(tmp_path / "m")
    assert back.cfg == ours.cfg
    for (k, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    # without momentum copies in the file, momentum=True copies the online weights
    save_model(tiny(), tmp_path / "plain")
    m = dlip_ds.load_model(tmp_path / "plain", momentum=True)
    assert torch.equal(m.momentum.vision.pos_embed, m.vision.pos_embed)
    # a larger image size resizes the position embeddings
    assert dlip_ds.load_model(tmp_path / "plain", vision={"image_size": 48}).vision.pos_embed.shape[1] == 37

    state = load_file(str(tmp_path / "plain" / "model.safetensors"))
    state.pop("text.layers.1.mlp.fc2.weight")
    state["text.layers.9.mlp.fc2.weight"] = torch.zeros(1)
    state["itm_head.weight"] = torch.zeros(3, 32)
    save_file(state, str(tmp_path / "plain" / "model.safetensors"))
    with pytest.raises(ConfigError) as err:
        dlip_ds.load_model(tmp_path / "plain")
    msg = str(err.value)
    assert "missing keys (1): text.layers.1.mlp.fc2.weight" in msg
    assert "unexpected keys (1): text.layers.9.mlp.fc2.weight" in msg
    assert "itm_head.weight: checkpoint (3, 32) vs model (2, 32)" in msg
    with pytest.raises(ConfigError, match="not a preset"):
        dlip_ds.load_model(tmp_path / "nothing-here")


# --------------------------------------------------------------------------- student initialisation


def test_vision_from_timm_file_matches_timm_features(tmp_path, tiny):
    import timm
    ref = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3,
                                                           num_heads=3, num_classes=10)
    ref = perturbed(ref, 5)
    save_file(ref.state_dict(), str(tmp_path / "vit.safetensors"))
    student = tiny(vision={"width": 48, "depth": 3, "heads": 3})
    init_student(student, InitConfig(vision=f"timm:{tmp_path / 'vit.safetensors'}"))
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(student.encode_image(px).embeds, ref.forward_features(px)) <= 1e-5
    # a shallower student takes every k-th block, ending at the last
    torch.save(ref.state_dict(), tmp_path / "vit.pth")
    shallow = tiny(vision={"width": 48, "depth": 1, "heads": 3})
    init_student(shallow, InitConfig(vision=f"timm:{tmp_path / 'vit.pth'}"))
    assert torch.equal(shallow.vision.blocks[0].attn.qkv.weight, ref.blocks[2].attn.qkv.weight)
    with pytest.raises(ConfigError, match="does not fit"):
        init_student(tiny(), InitConfig(vision=f"timm:{tmp_path / 'vit.pth'}"))


def test_text_from_bert_directory_matches_bert(tmp_path, tiny):
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, max_position_embeddings=64)
    bert = perturbed(transformers.BertModel(cfg), 6)
    bert.save_pretrained(tmp_path / "bert")
    student = tiny()
    init_student(student, InitConfig(text=f"bert:{tmp_path / 'bert'}"))
    ids = torch.randint(0, 40, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        ref = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        assert max_diff(student.encode_text(ids, mask).embeds[mask.bool()], ref[mask.bool()]) <= 1e-5
    with pytest.raises(ConfigError, match="width"):
        init_student(tiny(text={"width": 64, "intermediate": 256}), InitConfig(text=f"bert:{tmp_path / 'bert'}"))


def test_inherit_every_kth_teacher_layer(tiny):
    assert pick_layers(12, 6) == [1, 3, 5, 7, 9, 11] and pick_layers(4, 4) == [0, 1, 2, 3]
    teacher = tiny(vision={"depth": 4}, text={"depth": 4}, fusion={"layers": 4})
    student = tiny(vision={"depth": 2}, text={"depth": 2}, fusion={"layers": 1}, momentum=True)
    init_student(student, InitConfig(vision="teacher", text="teacher"), teacher)
    assert torch.equal(student.vision.blocks[0].mlp.fc1.weight, teacher.vision.blocks[1].mlp.fc1.weight)
    assert torch.equal(student.vision.blocks[1].attn.qkv.weight, teacher.vision.blocks[3].attn.qkv.weight)
    assert torch.equal(student.text.layers[0].self_attn.query.weight, teacher.text.layers[1].self_attn.query.weight)
    assert torch.equal(student.text.layers[1].cross_attn.key.weight, teacher.text.layers[3].cross_attn.key.weight)
    assert torch.equal(student.decoder.self_attn[1].value.weight, teacher.decoder.self_attn[3].value.weight)
    assert torch.equal(student.momentum.vision.blocks[0].mlp.fc1.weight, teacher.vision.blocks[1].mlp.fc1.weight)
    with pytest.raises(ConfigError, match="student is larger.*width: student 64 vs teacher 32"):
        init_student(tiny(vision={"width": 64}), InitConfig(vision="teacher"), teacher)
    with pytest.raises(ConfigError, match="needs a teacher"):
        init_student(student, InitConfig(text="teacher"))


def test_narrower_student_takes_a_subset_of_the_teacher(tiny):
    """Weight selection: every tensor an evenly spaced subset, whole heads where the head size matches,
    so the student's residual stream starts as a sub-stream of the teacher's."""
    big = {"width": 64, "heads": 4}  # head size 16, as the student's (32 wide, 2 heads)
    teacher = tiny(vision={**big, "depth": 4}, text={**big, "intermediate": 256, "depth": 4}, fusion={"layers": 4})
    student = tiny(vision={"depth": 2}, text={"depth": 2}, fusion={"layers": 1})
    init_student(student, InitConfig(vision="teacher", text="teacher"), teacher)
    cols = evenly(64, 32)
    heads = [*range(16), *range(48, 64)]  # heads 0 and 3 of 4
    qkv_rows = [b * 64 + i for b in range(3) for i in heads]
    t_block, s_block = teacher.vision.blocks[3], student.vision.blocks[1]
    assert torch.equal(s_block.attn.qkv.weight, t_block.attn.qkv.weight[qkv_rows][:, cols])
    assert torch.equal(s_block.attn.proj.weight, t_block.attn.proj.weight[cols][:, heads])
    assert torch.equal(s_block.mlp.fc1.weight, t_block.mlp.fc1.weight[evenly(256, 128)][:, cols])
    t_layer, s_layer = teacher.text.layers[3], student.text.layers[1]
    assert torch.equal(s_layer.cross_attn.key.weight, t_layer.cross_attn.key.weight[heads][:, cols])
    assert torch.equal(s_layer.self_attn.out.weight, t_layer.self_attn.out.weight[cols][:, heads])
    assert torch.equal(student.decoder.self_attn[1].query.weight, teacher.decoder.self_attn[3].query.weight[heads][:, cols])
    assert torch.equal(student.lm_head.dense.weight, teacher.lm_head.dense.weight[cols][:, cols])
    px, ids = torch.randn(2, 3, 32, 32), torch.randint(3, 120, (2, 7))
    with torch.no_grad():  # the first residual states: the teacher's at the kept dimensions
        assert torch.equal(student.vision.patch_embed(px), teacher.vision.patch_embed(px)[..., cols])
        emb = student.text.embeddings.word_embeddings(ids)
        assert torch.equal(emb, teacher.text.embeddings.word_embeddings(ids)[..., cols])
    with pytest.raises(ConfigError, match="intermediate: student 512 vs teacher 256"):
        init_student(tiny(text={"intermediate": 512}), InitConfig(text="teacher"), teacher)


# --------------------------------------------------------------------------- CLI


def test_export_cli(tmp_path, capsys, tiny):
    from dlip_ds.cli import main

    save_model(tiny(), tmp_path / "src")
    assert main(["export", str(tmp_path / "src"), "--out", str(tmp_path / "hf"), "--format", "hf-blip"]) == 0
    assert transformers.BlipForImageTextRetrieval.from_pretrained(tmp_path / "hf") is not None
    assert main(["export", "test-tiny", "--out", str(tmp_path / "ours")]) == 0
    assert dlip_ds.load_model(tmp_path / "ours").cfg == dlip_ds.load_model("test-tiny").cfg
    assert main(["export", "test-tiny", "--out", str(tmp_path / "x"), "--format", "hf-blip"]) == 0
    assert main(["export", "dlip-tiny", "--out", str(tmp_path / "y"), "--format", "hf-blip"]) == 2
    assert "fusion.layers=2 < text.depth=4" in capsys.readouterr().err
    # a training run directory: its student is exported
    run = tmp_path / "run"
    student = tiny(fusion={"mode": "albef", "layers": 1})
    save_model(student, run / "student")
    (run / "config.yaml").write_text("name: run\n")
    assert main(["export", str(run), "--out", str(tmp_path / "from-run")]) == 0
    back = dlip_ds.load_model(tmp_path / "from-run")
    assert back.cfg == student.cfg and torch.equal(back.fusion[0].mlp.fc1.weight, student.fusion[0].mlp.fc1.weight)
