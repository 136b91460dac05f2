"""transformers' BlipForQuestionAnswering in and out, against transformers itself at two sizes: question
states, answer-decoder logits and loss, generated answers (greedy and beam), export and round trip.

Question padding: BLIP's answer decoder does not attend to it (its forward and rank pass the question mask).
transformers 5's BLIP text layers drop the cross-attention mask (BlipTextLayer hands it on as
`attention_mask`, and BlipTextSelfAttention reads `encoder_attention_mask` for cross-attention), and its
`generate` passes all ones anyway: so the answer decoder is compared on unpadded questions, and padded
questions are compared with each question alone, unpadded, in transformers."""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import perturbed

import dlip_ds
from dlip_ds.config import ConfigError
from dlip_ds.models.hf_blip import export_hf_blip
from dlip_ds.models.vqa import to_vqa_model

pytestmark = pytest.mark.usefixtures("one_thread")

# transformers' VQA model has one encoder_hidden_size for both cross-attentions: vision width == text width
SIZES = {
    "narrow": {"vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
               "text": {"vocab_size": 99, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "max_position_embeddings": 40}},
    "wide": {"vision": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3,
                        "num_attention_heads": 3, "image_size": 48, "patch_size": 16, "layer_norm_eps": 1e-6},
             "text": {"vocab_size": 150, "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 3,
                      "num_attention_heads": 6, "max_position_embeddings": 50, "layer_norm_eps": 1e-6,
                      "hidden_act": "gelu_new"}},
}
TOL = 1e-4
SEP = 2
SEP_BIAS = {"narrow": 0.9, "wide": 0.5}  # [SEP] likelier, so that answers end at different lengths


def hf_config(size: str):
    s = SIZES[size]
    vocab, width = s["text"]["vocab_size"], s["vision"]["hidden_size"]
    return transformers.BlipConfig(
        vision_config=s["vision"],
        text_config={**s["text"], "encoder_hidden_size": width, "bos_token_id": vocab - 2, "sep_token_id": SEP,
                     "pad_token_id": 0},
        image_text_hidden_size=16)


@pytest.fixture(scope="module")
def hf_vqa(tmp_path_factory):
    """Per size: a random BlipForQuestionAnswering, saved, and our model loaded from its directory."""
    out = {}
    for i, size in enumerate(SIZES):
        torch.manual_seed(i)
        hf = perturbed(transformers.BlipForQuestionAnswering(hf_config(size)), 30 + i)
        with torch.no_grad():
            hf.text_decoder.cls.predictions.bias[SEP] += SEP_BIAS[size]
        d = tmp_path_factory.mktemp(f"hf-vqa-{size}")
        hf.save_pretrained(d)
        out[size] = (hf, dlip_ds.load_model(d), d)
    return out


def inputs(size: str, b: int = 3, n: int = 8, seed: int = 0, padded: bool = True):
    """Images, questions (padded rows unless told otherwise; real ids behind the padding) and answers
    ([DEC] first, padded)."""
    s = SIZES[size]
    vocab = s["text"]["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    px = torch.randn(b, 3, s["vision"]["image_size"], s["vision"]["image_size"], generator=g)
    ids = torch.randint(3, vocab - 2, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    if padded:
        mask[1, 5:] = 0
        mask[2, 3:] = 0
    ans = torch.randint(3, vocab - 2, (b, 5), generator=g)
    ans[:, 0] = vocab - 2
    ans_mask = torch.ones_like(ans)
    ans_mask[0, 3:] = 0
    return px, ids, mask, ans, ans_mask


def hf_question_and_logits(hf, px, ids, mask, ans, ans_mask):
    with torch.no_grad():
        image = hf.vision_model(pixel_values=px).last_hidden_state
        q = hf.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image).last_hidden_state
        logits = hf.text_decoder(input_ids=ans, attention_mask=ans_mask, encoder_hidden_states=q,
                                 encoder_attention_mask=mask).logits
    return q, logits


def our_question_and_logits(model, px, ids, mask, ans, ans_mask):
    with torch.no_grad():
        q = model.fuse(model.encode_image(px).embeds, ids, mask).hidden
        hidden = model.decode(q, ans, ans_mask, context_mask=mask).hidden
        return q, model.lm_logits_from_hidden(hidden)


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("size", list(SIZES))
def test_hf_vqa_conformance(hf_vqa, size):
    hf, ours, _ = hf_vqa[size]
    c = ours.cfg
    assert c.decoder.context == "question" and not c.decoder.share and c.fusion.layers == c.text.depth
    px, ids, mask, ans, ans_mask = inputs(size, padded=False)
    (q, logits), (our_q, our_logits) = (hf_question_and_logits(hf, px, ids, mask, ans, ans_mask),
                                        our_question_and_logits(ours, px, ids, mask, ans, ans_mask))
    assert max_diff(our_q, q) <= TOL
    assert max_diff(our_logits, logits) <= TOL
    # transformers' own forward (question mask on the answer decoder's cross-attention): its loss from our logits
    labels = ans.masked_fill(ans_mask == 0, -100)
    with torch.no_grad():
        loss = hf(input_ids=ids, pixel_values=px, attention_mask=mask, decoder_input_ids=ans,
                  decoder_attention_mask=ans_mask, labels=labels).loss
    ours_loss = torch.nn.functional.cross_entropy(our_logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                                  label_smoothing=hf.config.text_config.label_smoothing)
    assert abs(loss.item() - ours_loss.item()) <= TOL


def hf_answers(hf, px, ids, mask, **kw) -> list[list[int]]:
    with torch.no_grad():
        out = hf.generate(input_ids=ids, pixel_values=px, attention_mask=mask, **kw).tolist()
    bos = hf.config.text_config.bos_token_id
    assert all(row[0] == bos for row in out)
    return [row[1:row.index(SEP)] if SEP in row else row[1:] for row in out]


@pytest.mark.parametrize("size", list(SIZES))
def test_padded_questions_match_each_question_alone(hf_vqa, size):
    hf, ours, _ = hf_vqa[size]
    px, ids, mask, ans, ans_mask = inputs(size, seed=5)
    our_q, our_logits = our_question_and_logits(ours, px, ids, mask, ans, ans_mask)
    q, _ = hf_question_and_logits(hf, px, ids, mask, ans, ans_mask)
    assert max_diff(our_q, q) <= TOL  # the question encoder masks its own padding in transformers too
    for b in range(3):
        n = int(mask[b].sum())
        _, alone = hf_question_and_logits(hf, px[b:b + 1], ids[b:b + 1, :n], mask[b:b + 1, :n], ans[b:b + 1],
                                          ans_mask[b:b + 1])
        assert max_diff(our_logits[b:b + 1], alone) <= TOL, b


@pytest.mark.parametrize("size", list(SIZES))
def test_generated_answers_match_transformers(hf_vqa, size):
    hf, ours, _ = hf_vqa[size]
    px, ids, mask, _, _ = inputs(size, b=4, seed=1, padded=False)  # transformers' generate attends to padding
    lengths = set()
    for beams in (1, 3):
        kw = {"num_beams": beams, "max_length": 10, "min_length": 1}
        got = ours.vqa_answer(px, ids, mask, **kw)
        assert got == hf_answers(hf, px, ids, mask, **kw), kw
        lengths |= {len(a) for a in got}
    assert len(lengths) > 2  # answers ended on [SEP] at several lengths, some ran to max_length
    # padded questions answer as each question alone, unpadded, does in transformers
    px, ids, mask, _, _ = inputs(size, b=3, seed=2)
    got = ours.vqa_answer(px, ids, mask, num_beams=3)
    for b in range(3):
        n = int(mask[b].sum())
        assert [got[b]] == hf_answers(hf, px[b:b + 1], ids[b:b + 1, :n], mask[b:b + 1, :n], num_beams=3,
                                      max_length=10, min_length=1), b


@pytest.mark.parametrize("size", list(SIZES))
def test_export_round_trip(hf_vqa, size, tmp_path):
    _, ours, _ = hf_vqa[size]
    export_hf_blip(ours, tmp_path, task="vqa")
    hf, info = transformers.BlipForQuestionAnswering.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    args = inputs(size, seed=3, padded=False)
    for a, b in zip(hf_question_and_logits(hf.eval(), *args), our_question_and_logits(ours, *args)):
        assert max_diff(a, b) <= TOL
    back = dlip_ds.load_model(tmp_path)
    want = {k: v for k, v in ours.state_dict().items() if not k.startswith(("itc.", "itm_head."))}  # not in BLIP_VQA
    got = back.state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items())


def test_export_converted_pretrained_model(tiny_model, tmp_path):
    """A pretrained model (shared decoder) -> to_vqa_model -> transformers: the same question states and logits."""
    ours = perturbed(to_vqa_model(tiny_model(seed=4)), 5)
    export_hf_blip(ours, tmp_path, task="vqa")
    hf = transformers.BlipForQuestionAnswering.from_pretrained(tmp_path).eval()
    args = inputs("narrow", seed=4, padded=False)
    for a, b in zip(hf_question_and_logits(hf, *args), our_question_and_logits(ours, *args)):
        assert max_diff(a, b) <= TOL


def test_export_cli_vqa(tiny_model, tmp_path):
    from dlip_ds.cli import main
    from dlip_ds.models.dlip_format import save_model

    save_model(to_vqa_model(tiny_model()), tmp_path / "src")
    assert main(["export", str(tmp_path / "src"), "--out", str(tmp_path / "hf"), "--format", "hf-blip",
                 "--hf-task", "vqa"]) == 0
    assert transformers.BlipForQuestionAnswering.from_pretrained(tmp_path / "hf") is not None


def test_export_refuses_what_transformers_cannot_express(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="decoder.context must be 'question'.*to_vqa_model"):
        export_hf_blip(tiny_model(), tmp_path, task="vqa")
    wide = to_vqa_model(tiny_model(vision={"width": 48, "heads": 2}))
    with pytest.raises(ConfigError, match="vision.width=48 != text.width=32"):
        export_hf_blip(wide, tmp_path, task="vqa")
    with pytest.raises(ConfigError, match="export it with task='vqa'"):
        export_hf_blip(to_vqa_model(tiny_model()), tmp_path, task="captioning")


def test_import_refuses_mismatched_cross_width(tmp_path):
    cfg = hf_config("narrow")
    cfg.text_config.encoder_hidden_size = 48
    cfg.vision_config.hidden_size = 48
    transformers.BlipForQuestionAnswering(cfg).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="encoder_hidden_size=48 != hidden_size=32"):
        dlip_ds.load_model(tmp_path)
