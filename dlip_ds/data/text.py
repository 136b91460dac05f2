"""Captions and tokens: BLIP's caption cleaning, the BERT tokenizer with [DEC]/[ENC], and the
text half of a batch (ITC, ITM and LM views of the same captions)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from dlip_ds.config import ConfigError

DEC_TOKEN = "[DEC]"  # bos of the decoder (BLIP)
ENC_TOKEN = "[ENC]"  # first token of the multimodal (ITM) encoder (BLIP)

# BLIP's pre_caption removes exactly these characters; commas and apostrophes stay.
_PUNCT = re.compile(r"[.!\"()*#:;~]")


def clean_caption(text: str, max_words: int = 30) -> str:
    """BLIP's `pre_caption`: lowercase, drop . ! " ( ) * # : ; ~, collapse whitespace, keep the
    first `max_words` words."""
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(words[:max_words] if max_words > 0 else words)


def load_tokenizer(name_or_path: str | os.PathLike):
    """A `BertTokenizerFast` from a local directory or a hub name (offline from the local cache when
    HF_HUB_OFFLINE is set), with `[DEC]` added as bos then `[ENC]` (BLIP's order, so
    bert-base-uncased gives 30524 ids). Sets `tokenizer.enc_token_id`."""
    from transformers import BertTokenizerFast

    name = str(name_or_path)
    if not name:
        raise ConfigError("tokenizer: empty name; give a directory with vocab.txt or a hub name such as bert-base-uncased")
    local = Path(name).expanduser()
    if local.exists() and not (local / "vocab.txt").is_file() and not (local / "tokenizer.json").is_file():
        raise ConfigError(f"tokenizer: {local} has neither vocab.txt nor tokenizer.json")
    try:
        tok = BertTokenizerFast.from_pretrained(str(local) if local.exists() else name)
    except OSError as e:
        raise ConfigError(f"tokenizer '{name}': cannot load: {e}") from None
    if len(tok) <= len(set(tok.all_special_tokens)):  # transformers 5 returns an empty vocabulary, not an error
        hint = " (HF_HUB_OFFLINE is set: a hub name must be in the local cache)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise ConfigError(f"tokenizer '{name}': cannot load a vocabulary{hint}")
    tok.add_special_tokens({"bos_token": DEC_TOKEN})
    tok.add_special_tokens({"extra_special_tokens": [ENC_TOKEN]}, replace_extra_special_tokens=False)
    tok.enc_token_id = tok.convert_tokens_to_ids(ENC_TOKEN)
    return tok


def encode_captions(tokenizer, captions: list[str], *, max_length: int, prompt: str = "") -> dict[str, torch.Tensor]:
    """Tokenize cleaned captions into the text keys of a training batch (docs/architecture.md 3).

    The ITC/ITM views read the caption; the LM view reads `prompt + caption`, so it has its own
    attention mask (`lm_attention_mask`). All tensors share one length L so they stack cleanly.
    """
    plain = tokenizer(captions, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    lm = tokenizer([prompt + c for c in captions], padding="longest", truncation=True, max_length=max_length,
                   return_tensors="pt")
    length = max(plain.input_ids.shape[1], lm.input_ids.shape[1])
    input_ids = _pad_to(plain.input_ids, length, tokenizer.pad_token_id)
    attention_mask = _pad_to(plain.attention_mask, length, 0)
    lm_input_ids = _pad_to(lm.input_ids, length, tokenizer.pad_token_id)
    lm_attention_mask = _pad_to(lm.attention_mask, length, 0)

    itm_input_ids = input_ids.clone()
    itm_input_ids[:, 0] = tokenizer.enc_token_id
    lm_input_ids[:, 0] = tokenizer.bos_token_id
    lm_labels = lm_input_ids.masked_fill(lm_attention_mask == 0, -100)
    if prompt:
        # [CLS]/[DEC] + prompt tokens; the model is not asked to predict the prompt (BLIP captioning).
        prompt_len = len(tokenizer(prompt, add_special_tokens=False).input_ids) + 1
        lm_labels[:, :prompt_len] = -100
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "itm_input_ids": itm_input_ids,
        "lm_input_ids": lm_input_ids,
        "lm_attention_mask": lm_attention_mask,
        "lm_labels": lm_labels,
    }


def _pad_to(t: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)


def tokenizer_from_config(cfg) -> object:
    """The tokenizer of a `DataConfig`: `cfg.tokenizer`, or when empty the `tokenizer/` folder that
    `dlip-ds synth` wrote beside the train shards' folder (a brace pattern or `::` list: the first shard's)."""
    from dlip_ds.data.shards import is_remote, shard_folder

    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    specs = cfg.train_shards if isinstance(cfg.train_shards, (list, tuple)) else [cfg.train_shards]
    if not specs or not specs[0]:
        raise ConfigError("data.tokenizer is empty and data.train_shards is empty: no tokenizer to load")
    spec = str(specs[0])
    if is_remote(spec):
        raise ConfigError(f"data.tokenizer is empty and data.train_shards is remote ({spec}); set data.tokenizer")
    path = shard_folder(spec).resolve().parent / "tokenizer"
    if not path.is_dir():
        raise ConfigError(f"data.tokenizer is empty and there is no synth tokenizer at {path}; set data.tokenizer")
    return load_tokenizer(path)
