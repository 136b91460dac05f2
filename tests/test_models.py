"""The MED model: stages, taps, masks, sharing, momentum, generation, presets (tiny models, CPU)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dlip_ds.config import ConfigError
from dlip_ds.models.presets import PRESETS, preset_config, preset_dict
from dlip_ds.models.vit import resize_pos_embed
from dlip_ds.models.vlp import TapRequest, VLPModel


def batch(b=3, n=9, vocab=128, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    px = torch.randn(b, 3, size, size, generator=g)
    ids = torch.randint(3, vocab, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    return px, ids, mask


def heads(x, h):
    b, n, d = x.shape
    return x.view(b, n, h, d // h).transpose(1, 2)


def test_no_parameter_held_directly_and_temperature_clamped(tiny_model):
    m = tiny_model()
    assert list(m.parameters(recurse=False)) == []
    with torch.no_grad():
        m.itc.temp.fill_(3.0)
    assert m.temperature().item() == pytest.approx(0.5)
    with torch.no_grad():
        m.itc.temp.fill_(1e-6)
    assert m.temperature().item() == pytest.approx(0.001)


def test_task_shapes_and_normalised_features(tiny_model):
    m = tiny_model()
    px, ids, mask = batch()
    img, txt = m.itc_features(px, ids, mask)
    assert img.shape == txt.shape == (3, 16)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3)) and torch.allclose(txt.norm(dim=-1), torch.ones(3))
    assert m.itm_logits(px, ids, mask).shape == (3, 2)
    assert m.lm_logits(px, ids, mask).shape == (3, 9, 128)


def test_padding_does_not_leak(tiny_model):
    """Features of a padded text equal those of the same text without its padding."""
    m = tiny_model()
    px, ids, mask = batch()
    img = m.encode_image(px).embeds
    full_txt = m.encode_text(ids, mask).embeds
    full_fuse = m.fuse(img, ids, mask).hidden
    full_dec = m.decode(img, ids, mask).hidden
    n = 4  # row 2 has 4 real tokens
    short = ids[2:3, :n]
    ones = torch.ones(1, n, dtype=torch.long)
    assert torch.allclose(m.encode_text(short, ones).embeds, full_txt[2:3, :n], atol=1e-5)
    assert torch.allclose(m.fuse(img[2:3], short, ones).hidden, full_fuse[2:3, :n], atol=1e-5)
    assert torch.allclose(m.decode(img[2:3], short, ones).hidden, full_dec[2:3, :n], atol=1e-5)


def test_decoder_is_causal_and_encoder_is_not(tiny_model):
    m = tiny_model()
    px, ids, mask = batch()
    mask = torch.ones_like(mask)
    img = m.encode_image(px).embeds
    ids2 = ids.clone()
    ids2[:, 5] = (ids[:, 5] + 1) % 128
    a, b = m.decode(img, ids, mask).hidden, m.decode(img, ids2, mask).hidden
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6)
    assert not torch.allclose(a[:, 5:], b[:, 5:], atol=1e-4)
    a, b = m.encode_text(ids, mask).embeds, m.encode_text(ids2, mask).embeds
    assert not torch.allclose(a[:, :5], b[:, :5], atol=1e-4)


def test_taps_return_only_what_was_asked_and_match_projections(tiny_model):
    m = tiny_model()
    px, ids, mask = batch()
    v = m.encode_image(px, TapRequest(hidden=(0,), self_qk=(1,)))
    assert set(v.taps["hidden"]) == {0} and set(v.taps["self_qk"]) == {1} and not v.taps["cross_qk"]
    # q/k of vision block 1 = its qkv projection of norm1(hidden of block 0)
    blk = m.vision.blocks[1]
    q, k, _ = blk.attn.qkv(blk.norm1(v.taps["hidden"][0])).chunk(3, dim=-1)
    assert torch.allclose(v.taps["self_qk"][1][0], heads(q, 2), atol=1e-6)
    assert torch.allclose(v.taps["self_qk"][1][1], heads(k, 2), atol=1e-6)

    t = m.encode_text(ids, mask, TapRequest(hidden=(0, 1), self_qk=(1,)))
    assert set(t.taps["hidden"]) == {0, 1} and set(t.taps["self_qk"]) == {1}
    assert torch.equal(t.taps["hidden"][1], t.embeds)
    layer = m.text.layers[1]
    assert torch.allclose(t.taps["self_qk"][1][0], heads(layer.self_attn.query(t.taps["hidden"][0]), 2), atol=1e-6)

    f = m.fuse(v.embeds, ids, mask, TapRequest(cross_qk=(0, 1), hidden=(1,)))
    assert set(f.taps["cross_qk"]) == {0, 1} and not f.taps["self_qk"]
    assert torch.equal(f.taps["hidden"][1], f.hidden)
    q, k = f.taps["cross_qk"][0]
    assert q.shape == (3, 2, 9, 16) and k.shape == (3, 2, 17, 16)
    assert torch.allclose(k, heads(m.text.layers[0].cross_attn.key(v.embeds), 2), atol=1e-6)

    d = m.decode(v.embeds, ids, mask, TapRequest(self_qk=(0,), cross_qk=(1,)))
    assert set(d.taps["self_qk"]) == {0} and set(d.taps["cross_qk"]) == {1} and not d.taps["hidden"]
    emb = m.text.embeddings(ids)  # shared decoder: the text embeddings, its own self-attention
    assert torch.allclose(d.taps["self_qk"][0][0], heads(m.decoder.self_attn[0].query(emb), 2), atol=1e-6)

    with pytest.raises(ValueError, match="out of range"):
        m.encode_text(ids, mask, TapRequest(hidden=(2,)))
    with pytest.raises(ValueError, match="cross"):
        m.encode_text(ids, mask, TapRequest(cross_qk=(0,)))


def test_sdpa_attention_equals_naive_softmax(tiny_model):
    """A BERT self-attention layer with padding = the materialised softmax(QK^T/sqrt(d) + mask) V."""
    m = tiny_model()
    _, ids, mask = batch()
    x = m.text.embeddings(ids)
    attn = m.text.layers[0].self_attn
    out, (q, k) = attn(x, mask=mask.bool()[:, None, None, :], return_qk=True)
    v = heads(attn.value(x), 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
    assert torch.allclose(out, attn.norm(x + attn.out(ctx)), atol=1e-5)


def test_fusion_layers_blip_partial_and_albef(tiny_model):
    m = tiny_model(text={"depth": 3}, fusion={"layers": 1})
    assert [layer.has_cross for layer in m.text.layers] == [False, False, True]
    assert m.module_info("fusion").depth == 1 and m.module_info("decoder").depth == 3
    px, ids, mask = batch()
    img = m.encode_image(px).embeds
    f = m.fuse(img, ids, mask, TapRequest(cross_qk=(0,), hidden=(0,)))
    assert torch.equal(f.taps["hidden"][0], f.hidden)
    with pytest.raises(ValueError):
        m.fuse(img, ids, mask, TapRequest(hidden=(1,)))
    # unimodal pass skips cross-attention: the text features ignore the image entirely
    again = tiny_model(text={"depth": 3}, fusion={"layers": 1})
    assert torch.allclose(m.encode_text(ids, mask).feat, again.encode_text(ids, mask).feat)

    a = tiny_model(fusion={"mode": "albef", "layers": 2})
    assert len(a.fusion) == 2 and not any(layer.has_cross for layer in a.text.layers)
    info = a.module_info("fusion")
    assert (info.depth, info.has_cross) == (2, True) and a.module_info("decoder").depth == 4
    img = a.encode_image(px).embeds
    f = a.fuse(img, ids, mask, TapRequest(hidden=(1,), self_qk=(0,)))
    assert torch.equal(f.taps["hidden"][1], f.hidden) and a.itm_logits(px, ids, mask).shape == (3, 2)
    assert a.lm_logits(px, ids, mask).shape == (3, 9, 128)


def test_decoder_sharing_and_tied_lm_head(tiny_model):
    shared = tiny_model()
    own = {n for n, _ in shared.decoder.named_parameters()}
    assert own and all(n.startswith("self_attn.") for n in own)
    weight, bias = shared.lm_projection()
    assert weight is shared.text.embeddings.word_embeddings.weight and bias is shared.lm_head.bias
    px, ids, mask = batch()
    hidden = shared.decode(shared.encode_image(px).embeds, ids, mask).hidden
    ref = shared.lm_head(hidden) @ weight.T + bias
    assert torch.allclose(shared.lm_logits_from_hidden(hidden), ref, atol=1e-6)
    # gradients of the LM loss reach the decoder's self-attention and the shared weights,
    # never the text encoder's own self-attention
    shared.lm_logits(px, ids, mask).sum().backward()
    assert shared.decoder.self_attn[0].query.weight.grad is not None
    assert shared.text.layers[0].mlp.fc1.weight.grad is not None
    assert shared.text.layers[0].self_attn.query.weight.grad is None

    sep = tiny_model(decoder={"share": False})
    assert sep.lm_projection()[0] is sep.decoder.stack.embeddings.word_embeddings.weight
    assert sum(p.numel() for p in sep.decoder.parameters()) > sum(p.numel() for p in shared.decoder.parameters())
    nodec = tiny_model(decoder={"enabled": False})
    with pytest.raises(ConfigError, match="decoder"):
        nodec.lm_logits(px, ids, mask)


def test_position_embeddings_interpolate_for_other_image_sizes(tiny_model):
    m = tiny_model()
    px = torch.randn(2, 3, 48, 48)
    pos = m.vision.pos_embed
    # reference: bicubic resize of the 4x4 grid to 6x6, done by hand
    grid = pos[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 36, -1)
    resized = resize_pos_embed(pos, (6, 6))
    assert torch.allclose(resized[:, 1:], ref, atol=1e-6) and torch.equal(resized[:, :1], pos[:, :1])
    out = m.encode_image(px).embeds
    assert out.shape == (2, 37, 32)
    big = tiny_model(vision={"image_size": 48})
    state = {k: v for k, v in m.state_dict().items()}
    state["vision.pos_embed"] = resized
    big.load_state_dict(state)
    assert torch.allclose(big.encode_image(px).embeds, out, atol=1e-5)


def test_drop_path_only_in_training(tiny_model):
    m = tiny_model(vision={"drop_path": 0.5})
    px = torch.randn(4, 3, 32, 32)
    assert torch.equal(m.encode_image(px).embeds, m.encode_image(px).embeds)
    m.train()
    torch.manual_seed(0)
    a = m.encode_image(px).embeds
    torch.manual_seed(1)
    assert not torch.allclose(a, m.encode_image(px).embeds)


def test_momentum_copies_update_as_ema(tiny_model):
    m = tiny_model(momentum=True, momentum_coef=0.9)
    px, ids, mask = batch()
    i, t = m.itc_features(px, ids, mask)
    im, tm = m.momentum_itc_features(px, ids, mask)
    assert torch.allclose(i, im, atol=1e-6) and torch.allclose(t, tm, atol=1e-6) and not im.requires_grad
    assert all(not p.requires_grad for p in m.momentum.parameters())
    before = m.momentum.vision.blocks[0].attn.qkv.weight.clone()
    with torch.no_grad():
        m.vision.blocks[0].attn.qkv.weight.add_(1.0)
    m.momentum_update()
    expect = 0.9 * before + 0.1 * m.vision.blocks[0].attn.qkv.weight
    assert torch.allclose(m.momentum.vision.blocks[0].attn.qkv.weight, expect, atol=1e-6)
    with pytest.raises(ConfigError):
        tiny_model().momentum_update()


@pytest.fixture
def tokenizer(tmp_path):
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "picture", "of", "dog", "cat", "red", "##s", "on",
             "the", "grass", "sofa", "blue", "ball"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizerFast.from_pretrained(str(tmp_path))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    assert len(tok) == len(words) + 1
    return tok


def test_generate_greedy_and_beam_match_a_naive_decoder(tokenizer, tiny_model):
    """Greedy without a cache (full recompute each step) is the reference for the cached loop;
    beam search must score at least as well as greedy under the same length normalisation."""
    m = tiny_model(text={"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                         "sep_token_id": tokenizer.sep_token_id})
    px = torch.randn(2, 3, 32, 32)
    prompt = tokenizer("a picture of", add_special_tokens=False).input_ids
    got = m.generate(px, prompt=prompt, num_beams=1, max_length=10, min_length=7, repetition_penalty=1.5)
    img = m.encode_image(px).embeds
    seq = torch.tensor([[tokenizer.bos_token_id] + prompt] * 2)
    with torch.no_grad():
        while seq.shape[1] < 10:
            logits = m.lm_logits_from_hidden(m.decode(img, seq, torch.ones_like(seq)).hidden[:, -1])
            seen = logits.gather(1, seq)
            logits.scatter_(1, seq, torch.where(seen < 0, seen * 1.5, seen / 1.5))
            if seq.shape[1] < 7:
                logits[:, tokenizer.sep_token_id] = -float("inf")
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    ref = [[t for t in row[4:]] for row in seq.tolist()]
    ref = [r[: r.index(tokenizer.sep_token_id)] if tokenizer.sep_token_id in r else r for r in ref]
    assert got == ref

    def score(ids):  # length-normalised log-probability of the generated tokens, as beam search ranks them
        full = torch.tensor([[tokenizer.bos_token_id] + prompt + ids])
        with torch.no_grad():
            lp = m.lm_logits_from_hidden(m.decode(img[:1], full, torch.ones_like(full)).hidden).log_softmax(-1)
        tgt = full[0, 4:]
        return lp[0, 3:-1].gather(1, tgt[:, None]).sum().item() / len(tgt)

    greedy = m.generate(px[:1], prompt=prompt, num_beams=1, max_length=9, min_length=9)[0]
    beam = m.generate(px[:1], prompt=prompt, num_beams=4, max_length=9, min_length=9)[0]
    assert len(beam) == len(greedy) == 5
    assert score(beam) >= score(greedy) - 1e-5


def test_generate_with_tokenizer_strips_prompt(tokenizer, tiny_model):
    m = tiny_model(text={"vocab_size": len(tokenizer)})
    px = torch.randn(2, 3, 32, 32)
    caps = m.generate(px, tokenizer, prompt="a picture of ", num_beams=2, max_length=12, min_length=6)
    ids = m.generate(px, prompt=tokenizer("a picture of", add_special_tokens=False).input_ids, num_beams=2,
                     max_length=12, min_length=6)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)
    prompt_ids = tokenizer("a picture of", add_special_tokens=False).input_ids
    for cap, gen in zip(caps, ids):
        full = tokenizer.decode(prompt_ids + gen, skip_special_tokens=True)
        assert full.startswith("a picture of") and cap == full[len("a picture of"):].strip()
    with pytest.raises(ValueError, match="tokenizer"):
        m.generate(px)


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_validate(name):
    cfg = preset_config(name)
    assert cfg.vision.width % cfg.vision.heads == 0


def test_preset_sizes():
    def count(name):
        with torch.device("meta"):
            return sum(p.numel() for p in VLPModel(preset_config(name)).parameters())

    teacher = count("blip-base")
    assert 240e6 < teacher < 260e6  # ViT-B/16 + BERT-base with cross-attention + decoder self-attention
    assert count("dlip-small") <= 0.224 * teacher
    assert 0.4 <= count("dlip-base") / teacher <= 0.6
    assert count("dlip-tiny") < count("dlip-small")
    assert count("demo-student") <= count("demo-teacher") / 4
    with pytest.raises(ConfigError, match="did you mean 'blip-base'"):
        preset_dict("blip-bse")


def test_import_is_light_and_names_are_lazy():
    import subprocess
    import sys

    code = ("import sys, dlip_ds; assert 'torch' not in sys.modules, 'import dlip_ds pulled torch in'; "
            "from dlip_ds import VLPModel, load_model; assert VLPModel.__name__ == 'VLPModel'")
    subprocess.run([sys.executable, "-c", code], check=True)
