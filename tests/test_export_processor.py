"""hf-blip exports carry a BlipProcessor: its image settings against our own evaluation transform, and what
transformers makes of the directory (the image-to-text pipeline, BlipForQuestionAnswering.generate) against
our model's `generate` / `vqa_answer` on the same pixels and ids."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import transformers
from conftest import build_tiny_model
from helpers import write_vocab
from PIL import Image

from dlip_ds.config import ConfigError
from dlip_ds.data.text import load_tokenizer
from dlip_ds.data.transforms import eval_transform
from dlip_ds.models.hf_blip import export_hf_blip

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["a", "b", "c", "dog", "cat", "sat", "on", "the", "mat", "red", "blue", "picture", "of", "what", "is"]
# not BLIP's defaults (384 px, CLIP statistics), so that a processor left at them fails
VISION = {"image_size": 48, "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.3, 0.25)}
TASK_DECODER = {"retrieval": {}, "captioning": {"share": False}, "vqa": {"share": False, "context": "question"}}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(write_vocab(tmp_path_factory.mktemp("tok"), WORDS))


def model_for(task: str, tokenizer):
    """test-tiny (its bos_token_id=1 is not the tokenizer's [DEC]) with weights random enough that captions and
    answers differ from image to image."""
    m = build_tiny_model(vision=VISION, text={"vocab_size": len(tokenizer)}, decoder=TASK_DECODER[task])
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (1.0 if name.startswith("vision.") else 0.2))
    return m


def images() -> list[Image.Image]:
    """Three images of other sizes than the model's, so the processor resizes."""
    return [Image.fromarray((np.random.RandomState(i).rand(40 + 9 * i, 56, 3) ** (i + 1) * 255).astype("uint8"))
            for i in range(3)]


@pytest.mark.parametrize("task", list(TASK_DECODER))
def test_processor_reads_as_the_model_was_trained(tmp_path, tokenizer, task):
    m = model_for(task, tokenizer)
    out = export_hf_blip(m, tmp_path, tokenizer, task=task)
    proc = transformers.BlipProcessor.from_pretrained(out)
    ip = proc.image_processor
    assert ip.size == {"height": 48, "width": 48} and ip.resample == 3  # PIL's BICUBIC, as BLIP
    assert ip.image_mean == pytest.approx(VISION["mean"]) and ip.image_std == pytest.approx(VISION["std"])
    assert ip.do_resize and ip.do_rescale and ip.do_normalize
    img = images()[1]
    ours = eval_transform(m.cfg.vision)(img)[None]
    pil = transformers.BlipProcessor.from_pretrained(out, backend="pil")(images=img, return_tensors="pt").pixel_values
    assert (pil - ours).abs().max() < 1e-5  # PIL backend: BLIP's pixels exactly
    default = proc(images=img, return_tensors="pt").pixel_values  # torchvision's bicubic: close, not equal
    assert default.shape == ours.shape and (default - ours).abs().mean() < 0.02
    # transformers' generate starts from / stops at the config's ids: the tokenizer's, not test-tiny's
    text_config = json.loads((out / "config.json").read_text())["text_config"]
    assert (text_config["bos_token_id"], text_config["sep_token_id"], text_config["pad_token_id"]) == (
        tokenizer.bos_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id) != (m.cfg.text.bos_token_id, 2, 0)
    ids = proc(text="what is on the mat").input_ids
    first = tokenizer.enc_token_id if task == "vqa" else tokenizer.cls_token_id  # BLIP_VQA's question: [ENC]
    assert ids == [first, *tokenizer("what is on the mat").input_ids[1:]]
    assert proc.tokenizer.bos_token == "[DEC]" and len(proc.tokenizer) == len(tokenizer)
    assert tokenizer.cls_token == "[CLS]"  # the caller's tokenizer is left as it was


def test_image_to_text_pipeline_captions_as_generate(tmp_path, tokenizer):
    m = model_for("captioning", tokenizer)
    out = export_hf_blip(m, tmp_path, tokenizer, task="captioning")
    # "image-to-text" is an alias of this task in transformers 5 (it was its own pipeline before)
    pipe = transformers.pipeline("image-text-to-text", model=str(out))
    captions = []
    for img in images():
        px = pipe.processor(images=img, return_tensors="pt").pixel_values
        for prompt, kw in (("a picture of", {"num_beams": 3, "max_length": 20, "min_length": 5}),
                           ("", {"num_beams": 1, "max_length": 12, "min_length": 3})):
            theirs = pipe(img, text=prompt, generate_kwargs=kw, return_full_text=False)[0]["generated_text"]
            ours = m.generate(px, tokenizer, prompt=prompt + " " if prompt else "", **kw)[0]
            assert theirs.strip() == ours
            captions.append(ours)
    assert len(set(captions)) > 2  # the images and settings make a difference: not one string everywhere


def test_vqa_export_answers_as_vqa_answer(tmp_path, tokenizer):
    m = model_for("vqa", tokenizer)
    out = export_hf_blip(m, tmp_path, tokenizer, task="vqa")
    proc = transformers.BlipProcessor.from_pretrained(out)
    hf = transformers.BlipForQuestionAnswering.from_pretrained(out).eval()
    # transformers 5 removed the visual-question-answering pipeline; this is its documented replacement for BLIP
    with pytest.raises(KeyError, match="removed"):
        transformers.pipeline("visual-question-answering", model=str(out))
    answers = []
    for img, question in zip(images(), ["what is the dog", "what is on the mat", "is it blue"]):
        inputs = proc(images=img, text=question, return_tensors="pt")
        assert inputs.input_ids[0, 0] == tokenizer.enc_token_id
        for kw in ({"num_beams": 3, "max_length": 10, "min_length": 1}, {"num_beams": 1, "max_length": 8}):
            with torch.no_grad():
                theirs = proc.decode(hf.generate(**inputs, **kw)[0], skip_special_tokens=True)
            ours = m.vqa_answer(inputs.pixel_values, inputs.input_ids, inputs.attention_mask, tokenizer=tokenizer,
                                min_length=kw.get("min_length", 1), num_beams=kw["num_beams"],
                                max_length=kw["max_length"])[0]
            assert theirs == ours
            answers.append(ours)
    assert len(set(answers)) > 1


def test_without_tokenizer_only_the_image_processor_with_a_warning(tmp_path, tokenizer, caplog):
    m = model_for("retrieval", tokenizer)
    with caplog.at_level(logging.WARNING):
        out = export_hf_blip(m, tmp_path / "bare")
    assert "--tokenizer" in caplog.text
    assert transformers.BlipImageProcessor.from_pretrained(out).size == {"height": 48, "width": 48}
    assert transformers.BlipForImageTextRetrieval.from_pretrained(out) is not None
    assert not (out / "tokenizer.json").exists()
    # a tokenizer with more tokens than the model's vocabulary is not this model's
    big = build_tiny_model(text={"vocab_size": len(tokenizer) - 1})
    with pytest.raises(ConfigError, match="more than the model's text.vocab_size"):
        export_hf_blip(big, tmp_path / "big", tokenizer)
    assert not (tmp_path / "big").exists()  # refused before anything is written


def test_cli_writes_the_processor(tmp_path, tokenizer, capsys):
    from dlip_ds.cli import main

    tokenizer.save_pretrained(str(tmp_path / "tok"))
    args = ["export", "test-tiny", "--out", str(tmp_path / "hf"), "--format", "hf-blip", "--hf-task", "captioning"]
    assert main([*args, "--tokenizer", str(tmp_path / "tok")]) == 0
    proc = transformers.BlipProcessor.from_pretrained(tmp_path / "hf")
    assert proc.tokenizer.convert_ids_to_tokens(proc.tokenizer.bos_token_id) == "[DEC]"
    assert proc.image_processor.size == {"height": 32, "width": 32}
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "BlipProcessor" in " ".join(capsys.readouterr().out.split())
