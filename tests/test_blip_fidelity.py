"""Fidelity to Salesforce BLIP (issue 13): beam search under both length-normalisation rules against a
naive beam search written here, BLIP's cut of the prompt off the caption, the rule reaching
`CaptionSettings`, and Salesforce `.pth` loading that reads ViT heads and [DEC]/[SEP] ids from configs.

BLIP's published captions came from transformers 4.15 (`BeamSearchScorer` + `BeamHypotheses`: a
finished hypothesis scores sum(log p) / len(every token before [SEP]); at max_length the running beams
join; an image is done when the best of its 2 * beams candidates over the current length cannot beat the
worst kept hypothesis). transformers >= 4.36 divides by the generated tokens, [SEP] included, and treats
reaching max_length as finishing. Both are written out below, one image at a time, recomputing the whole
decoder at every step (no cache), in float64 so that no near-tie flips.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import salesforce_vision_key

from dlip_ds.config import ConfigError
from dlip_ds.models.generate import strip_prompt
from dlip_ds.models.load import load_model

BOS, SEP = 1, 2
SETTINGS_SEED = 0


# --------------------------------------------------------------------------- beam search: the two rules


def beam_model(seed: int, vocab: int = 40, bos: int = BOS, sep: int = SEP):
    """test-tiny with weights shaken (peaked next-token distributions) and [SEP] made likely, so that
    beams finish at different lengths and the two rules disagree on some images."""
    torch.manual_seed(seed)
    m = load_model("test-tiny", text={"vocab_size": vocab, "bos_token_id": bos, "sep_token_id": sep})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
        m.lm_head.bias[sep] += 2.0
    return m.double().eval()


@torch.no_grad()
def naive_beam(m, image, start, beams, max_length, min_length, penalty, rule):
    """One image's caption (generated ids before [SEP]) by the rule of transformers < 4.36 ("total") or >= 4.36."""
    n_start = len(start)

    def next_logp(seqs):  # the whole decoder on the whole sequences, every step
        ids = torch.tensor(seqs)
        hidden = m.decode(image.expand(len(seqs), -1, -1), ids, torch.ones_like(ids)).hidden[:, -1]
        rows = F.log_softmax(m.lm_logits_from_hidden(hidden), -1).tolist()
        for seq, row in zip(seqs, rows):
            for t in set(seq):  # repetition penalty, then min length: transformers' processor order
                row[t] = row[t] * penalty if row[t] < 0 else row[t] / penalty
            if len(seq) < min_length:
                row[SEP] = -math.inf
        return rows

    hyps, worst = [], 1e9

    def add(score, seq):  # BeamHypotheses.add
        nonlocal worst
        if len(hyps) < beams or score > worst:
            hyps.append((score, seq))
            if len(hyps) > beams:
                hyps.remove(min(hyps, key=lambda h: h[0]))
            worst = min(h[0] for h in hyps)

    running = [(0.0, list(start))] + [(-1e9, list(start))] * (beams - 1)
    open_ = True
    while True:
        cur = len(running[0][1])
        rows = next_logp([seq for _, seq in running])
        cands = sorted(((s + v, seq + [t]) for (s, seq), row in zip(running, rows) for t, v in enumerate(row)),
                       key=lambda c: -c[0])[: 2 * beams]
        nxt = []
        if rule == "total":
            for rank, (s, seq) in enumerate(cands):
                if seq[-1] == SEP:
                    if rank < beams:
                        add(s / cur, seq[:-1])  # the hypothesis without [SEP]: prompt and [DEC] counted
                else:
                    nxt.append((s, seq))
                if len(nxt) == beams:
                    break
            open_ = not (len(hyps) == beams and worst >= cands[0][0] / cur)
            running = nxt
            if not open_ or cur + 1 >= max_length:
                break
        else:
            for rank, (s, seq) in enumerate(cands):
                if seq[-1] == SEP or cur + 1 >= max_length:
                    if rank < beams and open_:
                        add(s / (cur + 1 - n_start), seq)  # generated tokens, [SEP] included
                elif len(nxt) < beams:
                    nxt.append((s, seq))
            running, cur = nxt, cur + 1
            if not running or cur >= max_length:
                break
            open_ = not (len(hyps) == beams and running[0][0] / (cur - n_start) <= worst)
            if not open_:
                break
    if rule == "total" and open_:  # BeamSearchScorer.finalize
        for s, seq in running:
            add(s / len(seq), seq)
    best = max(hyps, key=lambda h: h[0])[1][n_start:]
    return best[: best.index(SEP)] if SEP in best else best


@pytest.mark.parametrize("beams,penalty,max_length,min_length", [(3, 1.0, 12, 4), (4, 1.3, 10, 5)])
def test_beam_search_follows_both_rules(beams, penalty, max_length, min_length):
    m = beam_model(2)
    px = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2)).double()
    image = m.encode_image(px).embeds
    prompt = [7, 8]
    got = {}
    for rule in ("generated", "total"):
        got[rule] = m.generate(px, prompt=prompt, num_beams=beams, max_length=max_length, min_length=min_length,
                               repetition_penalty=penalty, length_norm=rule)
        want = [naive_beam(m, image[i:i + 1], [BOS, *prompt], beams, max_length, min_length, penalty, rule)
                for i in range(len(px))]
        assert got[rule] == want, rule
    assert got["generated"] == m.generate(px, prompt=prompt, num_beams=beams, max_length=max_length,
                                          min_length=min_length, repetition_penalty=penalty)  # the default
    if beams == 3:  # the case is not degenerate: the rules pick other captions for some images
        assert any(a != b for a, b in zip(got["generated"], got["total"]))
        assert any(len(c) < max_length - 3 for c in got["total"])  # some ended on [SEP]
    with pytest.raises(ValueError, match="length_norm"):
        m.generate(px, prompt=prompt, num_beams=1, length_norm="blip")


# --------------------------------------------------------------------------- the prompt cut


@pytest.fixture
def tokenizer(tmp_path):
    from dlip_ds.data.text import load_tokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "picture", "of", "dog", "cat", "red", "##s", "on",
             "the", "grass", "sofa", "blue", "ball"]
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.txt").write_text("\n".join(words) + "\n")
    return load_tokenizer(tmp_path / "tok")  # + [DEC] (bos) and [ENC], as BLIP's


def test_prompt_is_cut_as_blip_does(tokenizer):
    """BLIP: `caption[len(self.prompt):]` on the decoded prompt + caption."""
    ids = {w: tokenizer.convert_tokens_to_ids(w) for w in ("##s", "dog", "on", "grass")}
    prompt_ids = tokenizer("a picture of ", add_special_tokens=False).input_ids
    gen = [ids["dog"], ids["on"], ids["grass"]]
    assert strip_prompt(tokenizer, "a picture of ", prompt_ids, gen) == "dog on grass"
    # a word piece first joins the prompt's last word ("ofs"): BLIP drops len(prompt) characters regardless
    assert tokenizer.decode(prompt_ids + [ids["##s"], *gen], skip_special_tokens=True) == "a picture ofs dog on grass"
    assert strip_prompt(tokenizer, "a picture of ", prompt_ids, [ids["##s"], *gen]) == "dog on grass"
    # the uncased tokenizer lower-cases the prompt: the text no longer starts with it, BLIP still cuts
    upper_ids = tokenizer("A picture of ", add_special_tokens=False).input_ids
    assert upper_ids == prompt_ids
    assert strip_prompt(tokenizer, "A picture of ", upper_ids, gen) == "dog on grass"


def test_generate_cuts_the_prompt_text(tokenizer):
    torch.manual_seed(0)
    m = load_model("test-tiny", text={"vocab_size": len(tokenizer)}).eval()
    piece = tokenizer.convert_tokens_to_ids("##s")
    with torch.no_grad():
        m.lm_head.bias[piece] += 6.0  # captions start with a word piece, which joins the prompt's "of"
    px = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompt_ids = tokenizer("a picture of ", add_special_tokens=False).input_ids
    ids = m.generate(px, prompt=prompt_ids, num_beams=2, max_length=12, min_length=6)
    caps = m.generate(px, tokenizer, prompt="A picture of ", num_beams=2, max_length=12, min_length=6)
    for cap, gen in zip(caps, ids, strict=True):
        full = tokenizer.decode(prompt_ids + gen, skip_special_tokens=True)
        assert gen[0] == piece and full.startswith("a picture ofs")
        assert cap == full[len("A picture of "):].strip()


def test_caption_settings_carry_the_rule(tokenizer):
    from dlip_ds.eval.captioning import CaptionSettings, generate_captions

    assert CaptionSettings().length_norm == "generated"

    class Images:  # the part of an EvalSet that captioning reads
        image_ids = (0, 1, 2, 3)

        @staticmethod
        def image_batches(batch_size, transform):
            px = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
            yield from px.split(batch_size)

    m = beam_model(SETTINGS_SEED, len(tokenizer), tokenizer.bos_token_id, tokenizer.sep_token_id).float()
    kw = {"num_beams": 3, "max_length": 12, "min_length": 4, "prompt": "a picture of "}
    caps = generate_captions(m, Images, tokenizer, settings=CaptionSettings(**kw, length_norm="total"), batch_size=2,
                             progress=False)
    px = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    total = m.generate(px, tokenizer, **kw, length_norm="total")
    assert [c["caption"] for c in caps] == total
    assert total != m.generate(px, tokenizer, **kw)  # the rule made a difference here


# --------------------------------------------------------------------------- Salesforce .pth


def salesforce_checkpoint(tmp_path, *, vision_width=64, vision_heads=4, vocab=40):
    """A `models/blip_retrieval.py`-layout .pth from a random transformers BLIP retrieval model (vision keys
    renamed as the official conversion does, inverted), and the model for reference."""
    import transformers

    cfg = transformers.BlipConfig(
        vision_config={"hidden_size": vision_width, "intermediate_size": 2 * vision_width, "num_hidden_layers": 1,
                       "num_attention_heads": vision_heads, "image_size": 32, "patch_size": 16,
                       "layer_norm_eps": 1e-6},
        text_config={"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
                     "num_attention_heads": 4, "max_position_embeddings": 40, "pad_token_id": 0},
        image_text_hidden_size=16)
    torch.manual_seed(0)
    ret = transformers.BlipForImageTextRetrieval(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ret.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    state = {}
    for key, value in ret.state_dict().items():
        state[salesforce_vision_key(key)] = value
    med = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 48,
           "vocab_size": vocab, "layer_norm_eps": 1e-12, "hidden_act": "gelu", "max_position_embeddings": 40}
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state}, tmp_path / "model_base_retrieval.pth")
    (tmp_path / "med_config.json").write_text(json.dumps(med))
    return tmp_path / "model_base_retrieval.pth", ret


def itc_sims(model, ret, vocab):
    g = torch.Generator().manual_seed(3)
    px = torch.randn(2, 3, 32, 32, generator=g)
    ids = torch.randint(3, vocab - 2, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = ret(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=False).itm_score
        img, txt = model.itc_features(px, ids, mask)
    return img @ txt.T, ref


def test_salesforce_vit_heads_from_a_config_else_guessed_with_a_warning(tmp_path, caplog):
    pth, ret = salesforce_checkpoint(tmp_path / "ckpt", vision_width=64, vision_heads=4)
    with caplog.at_level(logging.WARNING):
        guessed = load_model(pth)
    assert guessed.cfg.vision.heads == 1  # 64 // 64: BLIP's head width, wrong for this model
    assert "assuming 1" in caplog.text and "attention heads" in caplog.text
    sims, ref = itc_sims(guessed, ret, 40)
    assert (sims - ref).abs().max() > 1e-3  # the wrong count gives other features

    caplog.clear()
    (tmp_path / "vision.yaml").write_text("vision_config:\n  num_attention_heads: 4\n")
    for source in ({"heads": 4}, tmp_path / "vision.yaml"):
        with caplog.at_level(logging.WARNING):
            model = load_model(pth, vision_config=source)
        assert model.cfg.vision.heads == 4 and "assuming" not in caplog.text
        sims, ref = itc_sims(model, ret, 40)
        assert (sims - ref).abs().max() < 1e-4
    # a med config that carries the vision section (transformers' BlipConfig layout)
    med = json.loads((tmp_path / "ckpt" / "med_config.json").read_text())
    (tmp_path / "med_with_vision.json").write_text(json.dumps({**med, "vision_config": {"num_attention_heads": 4}}))
    assert load_model(pth, med_config=tmp_path / "med_with_vision.json").cfg.vision.heads == 4
    assert load_model(pth, vision={"heads": 2}, vision_config={"heads": 4}).cfg.vision.heads == 2  # explicit wins
    with pytest.raises(ConfigError, match="vision config .*: no such file"):
        load_model(pth, vision_config=tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="vision_config is for Salesforce BLIP .pth files"):
        load_model("test-tiny", vision_config={"heads": 4})


def test_salesforce_vit_heads_from_blip_vit_name(tmp_path):
    """BLIP's training configs name the ViT (`vit: base` -> 12 heads of 64)."""
    pth, _ = salesforce_checkpoint(tmp_path / "ckpt", vision_width=768, vision_heads=12)
    (tmp_path / "caption_coco.yaml").write_text("vit: 'base'\nimage_size: 384\n")
    assert load_model(pth, vision_config=tmp_path / "caption_coco.yaml").cfg.vision.heads == 12


def test_salesforce_token_ids_from_the_tokenizer(tmp_path, tokenizer):
    vocab = len(tokenizer)
    pth, _ = salesforce_checkpoint(tmp_path / "ckpt", vocab=vocab, vision_heads=1)
    defaults = load_model(pth)  # no tokenizer anywhere: bert-base-uncased + [DEC] + [ENC]'s ids stay
    assert (defaults.cfg.text.bos_token_id, defaults.cfg.text.sep_token_id) == (30522, 102)
    want = (tokenizer.bos_token_id, tokenizer.sep_token_id)
    assert want == (len(tokenizer) - 2, 3)  # [DEC] after the 18 words; [SEP] is the 4th
    passed = load_model(pth, tokenizer=tokenizer)
    assert (passed.cfg.text.bos_token_id, passed.cfg.text.sep_token_id) == want
    tokenizer.save_pretrained(str(tmp_path / "ckpt" / "tokenizer"))  # found beside the checkpoint
    beside = load_model(pth)
    assert (beside.cfg.text.bos_token_id, beside.cfg.text.sep_token_id) == want
