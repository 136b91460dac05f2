"""The transformers processor of an exported BLIP directory: `BlipProcessor(BlipImageProcessor, tokenizer)`,
so that `BlipProcessor.from_pretrained(DIR)` and the pipelines read images and text as the model was trained.

With transformers 5: a captioning export runs in `pipeline("image-text-to-text", model=DIR)` ("image-to-text"
is an alias of it), which needs a text: the prompt (BLIP's "a picture of", or "" for none). The
visual-question-answering pipeline is gone from transformers 5; a VQA export answers with
`BlipForQuestionAnswering.from_pretrained(DIR).generate(**processor(images=image, text=question,
return_tensors="pt"))`, decoded with `processor.decode(ids, skip_special_tokens=True)`.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

from dlip_ds.config import ConfigError, ModelConfig, VisionConfig

log = logging.getLogger(__name__)

# The special tokens transformers' BLIP reads from `text_config`: generation starts from bos ([DEC]), stops
# at sep ([SEP]) and pads finished rows with pad.
_TOKEN_IDS = (("bos_token_id", "bos_token_id", "[DEC] (bos)"), ("sep_token_id", "sep_token_id", "[SEP]"),
              ("pad_token_id", "pad_token_id", "[PAD]"))


def blip_image_processor(vision: VisionConfig):
    """BLIP's evaluation transform as a `BlipImageProcessor`: RGB, bicubic resize to the model's square
    `image_size`, rescale to [0, 1], normalise with the model's mean/std (`data.transforms.eval_transform`)."""
    from transformers import BlipImageProcessor
    from transformers.image_utils import PILImageResampling

    size = vision.image_size
    return BlipImageProcessor(size={"height": size, "width": size}, resample=PILImageResampling.BICUBIC,
                              image_mean=list(vision.mean), image_std=list(vision.std), do_resize=True,
                              do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True)


def write_processor(cfg: ModelConfig, out_dir: str | Path, tokenizer=None, task: str = "retrieval") -> None:
    """Write the processor of the transformers BLIP directory `out_dir` (its config.json already written).

    With a tokenizer: a `BlipProcessor` (image processor + tokenizer), and the tokenizer's [DEC]/[SEP]/[PAD]
    ids go into config.json's `text_config`, since transformers' `generate` starts from and stops at those
    (our `VLPModel.generate` takes them from the tokenizer as well, and training used the tokenizer's).
    task="vqa": the saved tokenizer starts text with [ENC] instead of [CLS] (its `cls_token`), because BLIP
    encodes the question with [ENC] first and transformers' `BlipForQuestionAnswering` feeds the processor's
    ids as they are; `processor(images=..., text=question)` then gives the ids `vqa_answer` reads. Retrieval
    keeps [CLS] (ITC reads it); BLIP's ITM reads [ENC] first, so for ITM scores as BLIP computes them set
    `input_ids[:, 0]` to the [ENC] id before `BlipForImageTextRetrieval(..., use_itm_head=True)`.
    Without a tokenizer: only the image processor (`BlipImageProcessor.from_pretrained(DIR)` works), with a
    warning, since `BlipProcessor.from_pretrained` and the pipelines need a tokenizer: the weights stay usable
    by anyone holding the tokenizer, as with a transformers model saved without its processor.

    The image processor loads with transformers' default torchvision backend, whose bicubic resize differs
    slightly from PIL's; `BlipProcessor.from_pretrained(DIR, backend="pil")` gives BLIP's (and our
    `eval_transform`'s) pixels exactly."""
    dst = Path(out_dir)
    image_processor = blip_image_processor(cfg.vision)
    if tokenizer is None:
        image_processor.save_pretrained(str(dst))
        log.warning("%s: no tokenizer given, so only the image processor is written; BlipProcessor.from_pretrained "
                    "and the transformers pipelines need one: export again with --tokenizer (or tokenizer=)", dst)
        return
    from transformers import BlipProcessor

    ids = tokenizer_ids(cfg, tokenizer)
    for key, value in ids.items():
        if value != getattr(cfg.text, key):
            log.info("export: text_config.%s = %d from the tokenizer (the model config says %d)", key, value,
                     getattr(cfg.text, key))
    if task == "vqa":
        tokenizer = _enc_first(tokenizer)
    BlipProcessor(image_processor, tokenizer).save_pretrained(str(dst))
    _set_text_token_ids(dst / "config.json", ids)


def tokenizer_ids(cfg: ModelConfig, tokenizer) -> dict:
    """The tokenizer's special ids (those it has), refused (ConfigError) when they or its vocabulary exceed
    the model's: the exporter checks this before it writes anything."""
    t = cfg.text
    if len(tokenizer) > t.vocab_size:
        raise ConfigError(f"tokenizer: {len(tokenizer)} tokens, more than the model's text.vocab_size={t.vocab_size}; "
                          "not the tokenizer this model was trained with")
    ids = {}
    for attr, key, name in _TOKEN_IDS:
        value = getattr(tokenizer, attr, None)
        if value is None:
            continue
        if not 0 <= int(value) < t.vocab_size:
            raise ConfigError(f"tokenizer: its {name} id {value} is outside the model's vocabulary of {t.vocab_size}")
        ids[key] = int(value)
    return ids


def _set_text_token_ids(config_path: Path, ids: dict) -> None:
    if not config_path.is_file():
        raise ConfigError(f"{config_path}: no such file; write the model's config before its processor")
    data = json.loads(config_path.read_text())
    data.setdefault("text_config", {}).update(ids)
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _enc_first(tokenizer):
    """A copy of `tokenizer` that starts every text with [ENC] (BLIP_VQA's question encoding)."""
    from dlip_ds.data.text import ENC_TOKEN

    enc = tokenizer.convert_tokens_to_ids(ENC_TOKEN)
    if enc is None or enc == tokenizer.unk_token_id:
        log.warning("export: the tokenizer has no %s token, so questions keep [CLS] first; BLIP_VQA encodes them "
                    "with %s first and the exported model may answer differently from vqa_answer", ENC_TOKEN, ENC_TOKEN)
        return tokenizer
    tok = copy.deepcopy(tokenizer)
    tok.cls_token = ENC_TOKEN  # transformers' BertTokenizer builds its template from cls_token when loaded
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:  # and tokenizer.json carries the template as well, for those that read it from there
        from tokenizers import processors

        sep = tok.sep_token
        backend.post_processor = processors.TemplateProcessing(
            single=f"{ENC_TOKEN}:0 $A:0 {sep}:0", pair=f"{ENC_TOKEN}:0 $A:0 {sep}:0 $B:1 {sep}:1",
            special_tokens=[(ENC_TOKEN, enc), (sep, tok.sep_token_id)])
    return tok
