"""Salesforce BLIP's fine-tuned checkpoints (`model_base_retrieval_coco.pth`, `model_base_caption_capfilt_large.pth`,
`model_base_vqa_capfilt_large.pth`): each built from random transformers BLIP modules in BLIP's key layout (vision
names through the official conversion inverted, BERT names as they are), loaded with `load_model`, and checked
against the transformers modules they came from."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from helpers import perturbed, salesforce_vision_key

import dlip_ds
from dlip_ds.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, TEXT_W, BOS, SEP, PAD = 60, 32, 58, 2, 0
TOL = 1e-4


def text_config(encoder_width: int) -> dict:
    return {"vocab_size": VOCAB, "hidden_size": TEXT_W, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 40, "encoder_hidden_size": encoder_width,
            "bos_token_id": BOS, "sep_token_id": SEP, "pad_token_id": PAD}


def blip_config(vision_width: int) -> transformers.BlipConfig:
    return transformers.BlipConfig(
        vision_config={"hidden_size": vision_width, "intermediate_size": 2 * vision_width, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 16, "layer_norm_eps": 1e-6},
        text_config=text_config(vision_width), image_text_hidden_size=16)


def save_pth(tmp_path, name: str, state: dict, vision_width: int):
    """BLIP's `{"model": state}` file with its med_config.json beside it (BLIP's keys; encoder_width is what
    the text encoder's cross-attention reads)."""
    med = {"architectures": ["BertModel"], "hidden_size": TEXT_W, "num_hidden_layers": 2, "num_attention_heads": 4,
           "intermediate_size": 48, "vocab_size": VOCAB, "max_position_embeddings": 40, "layer_norm_eps": 1e-12,
           "hidden_act": "gelu", "encoder_width": vision_width, "add_cross_attention": True}
    torch.save({"model": state}, tmp_path / name)
    (tmp_path / "med_config.json").write_text(json.dumps(med))
    return tmp_path / name


def load(path):
    return dlip_ds.load_model(path, vision={"heads": 2}, text={"bos_token_id": BOS, "sep_token_id": SEP})


def inputs(seed: int = 0, b: int = 3, n: int = 7):
    g = torch.Generator().manual_seed(seed)
    px = torch.randn(b, 3, 32, 32, generator=g)
    ids = torch.randint(5, VOCAB - 3, (b, n), generator=g)
    ids[:, 0] = VOCAB - 1  # [ENC] (or [CLS]: any id; both sides read the same)
    mask = torch.ones(b, n, dtype=torch.long)
    mask[1, 5:] = 0
    return px, ids, mask


def renamed(module, prefix_from: str = "", prefix_to: str = "") -> dict:
    return {salesforce_vision_key(k.replace(prefix_from, prefix_to, 1)): v for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------- retrieval


def test_retrieval_checkpoint(tmp_path):
    """blip_retrieval.py: encoders, ITC/ITM heads, momentum copies, temp and the queues (idx_queue included)."""
    torch.manual_seed(0)
    ret = perturbed(transformers.BlipForImageTextRetrieval(blip_config(48)), 1, scale=0.2)
    mom = perturbed(transformers.BlipForImageTextRetrieval(blip_config(48)), 2, scale=0.2)
    state = renamed(ret)
    for k, v in renamed(mom).items():
        if k.startswith(("visual_encoder.", "text_encoder.")):
            state[k.replace("_encoder.", "_encoder_m.", 1)] = v
        elif k.startswith(("vision_proj.", "text_proj.")):
            state[k.replace("_proj.", "_proj_m.", 1)] = v
    state.update({"temp": torch.tensor(0.07), "image_queue": torch.randn(16, 64), "text_queue": torch.randn(16, 64),
                  "idx_queue": torch.full((1, 64), -100), "ptr_queue": torch.zeros(1, dtype=torch.long)})
    ours = load(save_pth(tmp_path, "model_base_retrieval_coco.pth", state, 48))
    assert not ours.cfg.decoder.enabled and ours.cfg.momentum and ours.cfg.fusion.layers == 2
    assert ours.temperature().item() == pytest.approx(0.07)
    px, ids, mask = inputs()
    with torch.no_grad():
        sims = ret(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=False).itm_score
        itm = ret(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=True).itm_score
        sims_m = mom(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=False).itm_score
        img, txt = ours.itc_features(px, ids, mask)
        img_m, txt_m = ours.momentum_itc_features(px, ids, mask)
        assert (img @ txt.T - sims).abs().max() < TOL and (img_m @ txt_m.T - sims_m).abs().max() < TOL
        assert (ours.itm_logits(px, ids, mask) - itm).abs().max() < TOL


# --------------------------------------------------------------------------- captioning


def test_captioning_checkpoint(tmp_path, caplog):
    """blip.py BLIP_Decoder: visual_encoder + text_decoder only -> vision and a decoder of its own."""
    torch.manual_seed(0)
    cap = perturbed(transformers.BlipForConditionalGeneration(blip_config(48)), 3, scale=0.2)
    ours = load(save_pth(tmp_path, "model_base_caption_capfilt_large.pth", renamed(cap), 48))
    assert ours.cfg.decoder.enabled and not ours.cfg.decoder.share and ours.cfg.decoder.context == "image"
    assert "no weights for itc." in caplog.text and "keep their initialisation" in caplog.text  # heads, text encoder
    px, ids, mask = inputs(1)
    with torch.no_grad():
        ref = cap(pixel_values=px, input_ids=ids, attention_mask=mask).logits
        assert (ours.lm_logits(px, ids, mask) - ref).abs().max() < TOL
        for kw in ({"num_beams": 1, "max_length": 9, "min_length": 3}, {"num_beams": 3, "max_length": 9}):
            theirs = cap.generate(px, **kw)  # [DEC] first, stops at [SEP], pads with [PAD]
            expected = [[t for t in row[1:] if t not in (SEP, PAD)] for row in theirs.tolist()]
            assert ours.generate(px, prompt=[], min_length=kw.get("min_length", 5), num_beams=kw["num_beams"],
                                 max_length=kw["max_length"]) == expected


# --------------------------------------------------------------------------- VQA


def blip_vqa(vision_width: int):
    """transformers' BlipForQuestionAnswering with BLIP_VQA's answer decoder: transformers gives both of its
    cross-attentions the vision width, BLIP's decoder reads the question states (its med config's
    encoder_width, the text width), so the decoder is rebuilt with that width."""
    torch.manual_seed(0)
    vqa = transformers.BlipForQuestionAnswering(blip_config(vision_width))
    decoder_config = transformers.BlipTextConfig(**text_config(TEXT_W))
    vqa.text_decoder = transformers.models.blip.modeling_blip_text.BlipTextLMHeadModel(decoder_config)
    vqa.text_decoder.tie_weights()
    return perturbed(vqa, 4, scale=0.2)


@pytest.mark.parametrize("vision_width", [32, 48])  # 32: the widths alone cannot tell the decoders apart
def test_vqa_checkpoint(tmp_path, vision_width):
    """blip_vqa.py: question encoder (cross-attention in every layer), answer decoder reading the question."""
    vqa = blip_vqa(vision_width)
    state = renamed(vqa)
    assert not any(k.startswith(("vision_proj", "itm_head", "temp")) for k in state)
    ours = load(save_pth(tmp_path, "model_base_vqa_capfilt_large.pth", state, vision_width))
    assert ours.cfg.decoder.context == "question" and not ours.cfg.decoder.share and not ours.cfg.momentum
    for k, v in vqa.text_decoder.state_dict().items():  # the answer decoder landed whole, not in the text encoder
        if k == "bert.embeddings.word_embeddings.weight":
            assert torch.equal(ours.decoder.stack.embeddings.word_embeddings.weight, v)
    px, ids, mask = inputs(2)
    answer = torch.tensor([[BOS, 7, 9, 11, SEP], [BOS, 12, SEP, PAD, PAD], [BOS, 5, 6, 8, SEP]])
    answer_mask = (answer != PAD).long()
    with torch.no_grad():
        image = vqa.vision_model(pixel_values=px).last_hidden_state
        question = vqa.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image).last_hidden_state
        q_ours = ours.fuse(ours.encode_image(px).embeds, ids, mask).hidden
        assert (q_ours - question).abs().max() < TOL
        logits = ours.lm_logits_from_hidden(ours.decode(q_ours, answer, answer_mask, context_mask=mask).hidden)
        for r in range(len(ids)):  # the reference reads each question cut to its length: its padding unseen
            # (transformers 5.24's text decoder mishandles encoder_attention_mask here, so it is not passed)
            ref = vqa.text_decoder(input_ids=answer[r:r + 1], attention_mask=answer_mask[r:r + 1],
                                   encoder_hidden_states=question[r:r + 1, :int(mask[r].sum())]).logits
            assert (logits[r:r + 1] - ref).abs().max() < TOL
        # generation: transformers' (and BLIP's) answers a question without padding the same way
        full = torch.ones_like(mask)
        theirs = vqa.generate(input_ids=ids, pixel_values=px, attention_mask=full, num_beams=3, max_length=6)
        expected = [[t for t in row[1:] if t not in (SEP, PAD)] for row in theirs.tolist()]
        assert ours.vqa_answer(px, ids, full, num_beams=3, max_length=6) == expected


# --------------------------------------------------------------------------- refusals


def test_unknown_layouts_are_refused_naming_file_and_keys(tmp_path):
    ret = renamed(perturbed(transformers.BlipForImageTextRetrieval(blip_config(32)), 5, scale=0.2))
    nlvr = {k: v for k, v in ret.items() if not k.startswith(("vision_proj", "text_proj", "itm_head"))}
    nlvr["cls_head.0.weight"] = torch.zeros(2, 32)  # blip_nlvr.py
    with pytest.raises(ConfigError, match=r"model_nlvr\.pth: not a Salesforce BLIP.*cls_head unknown"):
        load(save_pth(tmp_path, "model_nlvr.pth", nlvr, 32))
    feature = {k: v for k, v in nlvr.items() if not k.startswith("cls_head")}  # BLIP_Base: no heads, no decoder
    with pytest.raises(ConfigError, match=r"top-level keys are text_encoder, visual_encoder; expected"):
        load(save_pth(tmp_path, "model_base_features.pth", feature, 32))
    text_only = {k: v for k, v in ret.items() if k.startswith("text_encoder.")}
    with pytest.raises(ConfigError, match="text_only.pth: not a Salesforce BLIP"):
        load(save_pth(tmp_path, "text_only.pth", text_only, 32))
    # transformers' own answer decoder reads vision-width states: not a BLIP_VQA decoder when the widths differ
    torch.manual_seed(0)
    hf_vqa = renamed(transformers.BlipForQuestionAnswering(blip_config(48)))
    with pytest.raises(ConfigError, match=r"crossattention.self.key.weight reads 48-wide states.*question states"):
        load(save_pth(tmp_path, "hf_vqa.pth", hf_vqa, 48))
