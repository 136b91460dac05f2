"""Caption cleaning, the tokenizer with [DEC]/[ENC], and the text half of a batch."""

import re

import pytest
import torch
from helpers import write_vocab

from dlip_ds.config import ConfigError
from dlip_ds.data.text import clean_caption, encode_captions, load_tokenizer

WORDS = ["a", "red", "circle", "picture", "of", "blue", "square", "the", "left", "on", "dog", "runs", ","]


def blip_pre_caption(caption, max_words=50):
    """Salesforce BLIP data/utils.py pre_caption, as published (the independent reference)."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n")
    caption = caption.strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


@pytest.mark.parametrize("text", [
    "A Dog runs on the beach.", "  two (small) cats; sleeping:  on a *mat*!  ", 'He said "hi" ~ #tag',
    "Commas, apostrophes' and hyphen-words stay", "x " * 40, "...", "",
])
def test_clean_caption_matches_blip(text):
    for max_words in (3, 30):
        assert clean_caption(text, max_words) == blip_pre_caption(text, max_words)


@pytest.fixture
def vocab_dir(tmp_path):
    d = tmp_path / "vocab"
    d.mkdir()
    return write_vocab(d, WORDS)


def test_load_tokenizer_adds_dec_then_enc(vocab_dir):
    tok = load_tokenizer(vocab_dir)
    base = 5 + len(WORDS)
    assert len(tok) == base + 2
    assert tok.bos_token == "[DEC]" and tok.bos_token_id == base
    assert tok.enc_token_id == base + 1 == tok.convert_tokens_to_ids("[ENC]")
    assert tok.pad_token_id == 0 and tok.cls_token_id == 2
    ids = tok("a red circle").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "a", "red", "circle", "[SEP]"]
    # the special tokens are never split and are dropped when decoding
    assert tok("[DEC] red [ENC]", add_special_tokens=False).input_ids == [base, WORDS.index("red") + 5, base + 1]
    assert tok.decode([base, base + 1, 6], skip_special_tokens=True) == "red"
    # a directory written back (as an export does) loads to the same ids
    tok.save_pretrained(vocab_dir.parent / "again")
    again = load_tokenizer(vocab_dir.parent / "again")
    assert len(again) == len(tok) and again.enc_token_id == tok.enc_token_id and again.bos_token_id == base


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ConfigError, match="vocab.txt"):
        load_tokenizer(tmp_path)
    with pytest.raises(ConfigError, match="cannot load"):  # offline (conftest): not in the cache
        load_tokenizer("no-such-org/no-such-tokenizer")


def _reference_text_batch(tok, captions, max_length, prompt):
    """BLIP's recipe written out per caption: tokenise, swap the first token, mask labels."""
    rows = []
    for c in captions:
        ids = tok(c, truncation=True, max_length=max_length).input_ids
        lm = tok(prompt + c, truncation=True, max_length=max_length).input_ids
        n_prompt = len(tok(prompt).input_ids) - 1 if prompt else 0  # BLIP: [CLS] + prompt tokens
        dec = [tok.bos_token_id] + lm[1:]
        labels = [-100] * n_prompt + dec[n_prompt:]
        rows.append((ids, [tok.enc_token_id] + ids[1:], dec, labels))
    length = max(max(len(r[0]), len(r[2])) for r in rows)

    def pad(seq, value):
        return seq + [value] * (length - len(seq))

    return {
        "input_ids": torch.tensor([pad(r[0], 0) for r in rows]),
        "attention_mask": torch.tensor([pad([1] * len(r[0]), 0) for r in rows]),
        "itm_input_ids": torch.tensor([pad(r[1], 0) for r in rows]),
        "lm_input_ids": torch.tensor([pad(r[2], 0) for r in rows]),
        "lm_attention_mask": torch.tensor([pad([1] * len(r[2]), 0) for r in rows]),
        "lm_labels": torch.tensor([pad(r[3], -100) for r in rows]),
    }


@pytest.mark.parametrize("prompt", ["", "a picture of "])
def test_encode_captions_matches_blip_recipe(vocab_dir, prompt):
    tok = load_tokenizer(vocab_dir)
    captions = ["a red circle", "the blue square on the left of a red circle , a dog runs", "dog"]
    got = encode_captions(tok, captions, max_length=9, prompt=prompt)
    want = _reference_text_batch(tok, captions, 9, prompt)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert got["input_ids"].shape[1] == 9  # the long caption is truncated at max_length
    if not prompt:
        assert torch.equal(got["attention_mask"], got["lm_attention_mask"])


def test_load_tokenizer_hub_name_from_local_cache(tmp_path):
    """A hub name resolves offline from the Hugging Face cache (HF_HUB_OFFLINE, as on a cluster)."""
    import os
    import subprocess
    import sys

    repo = tmp_path / "hub" / "models--someorg--tiny-bert"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    write_vocab(snapshot, WORDS)
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    code = ("from dlip_ds.data.text import load_tokenizer; t = load_tokenizer('someorg/tiny-bert'); "
            "print(len(t), t.enc_token_id, t.convert_ids_to_tokens(t('a red circle').input_ids))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[:2] == [str(5 + len(WORDS) + 2), str(5 + len(WORDS) + 1)]
    assert "'red'" in out and "[UNK]" not in out
