"""BLIP's VQA model (`BLIP_VQA`) on the MED model: its topology, answering, and conversion from a
pretrained or captioning model.

Topology (`decoder.context="question"`): the question is encoded by `fuse` ([ENC] first, cross-attention
to the image); the answer decoder, a separate BERT stack (`decoder.share=false`) laid out as the
pretraining decoder, starts from [DEC] and cross-attends to the question states, never to the question's
padding. BLIP_VQA has no ITC/ITM heads and no momentum encoders; our model keeps its ITC/ITM heads (unused).
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch

from dlip_ds.config import ConfigError, ModelConfig, validate_model
from dlip_ds.models.generate import (
    beam_search,
    check_search,
    greedy,
    special_ids,
    until,
)
from dlip_ds.models.keymaps import prefixed, sub

log = logging.getLogger(__name__)

RANK_ROWS = 256  # candidate answers scored per decoder pass (their log-probabilities are [rows, La, V])


def is_vqa(cfg: ModelConfig) -> bool:
    return cfg.decoder.enabled and cfg.decoder.context == "question"


def vqa_config(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with BLIP_VQA's topology: the answer decoder reads the question (decoder.context="question",
    share=false), no momentum encoders (BLIP_VQA has none). Everything else is kept."""
    if not cfg.decoder.enabled:
        raise ConfigError("model.decoder.enabled=false: BLIP's VQA answer decoder starts from the captioning "
                          "decoder, and this model has none")
    cfg = copy.deepcopy(cfg)
    out = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, context="question", share=False),
                              momentum=False)
    validate_model(out)
    return out


def decoder_stack_state(model, state: dict | None = None) -> dict:
    """The decoder's weights as one standalone stack (TextEncoder names: `embeddings.*`, `layers.N.*`).

    share=True: the text encoder's embeddings and layers (then the fusion layers, albef) with the
    decoder's own self-attention; share=False: the decoder's stack as it is. `state`: model.state_dict()."""
    state = model.state_dict() if state is None else state
    if not model.cfg.decoder.share:
        return sub(state, "decoder.stack.")
    stack = {k: v for k, v in sub(state, "text.").items() if ".self_attn." not in k}
    depth = model.cfg.text.depth
    for key, value in sub(state, "fusion.").items():
        idx, _, rest = key.partition(".")
        if not rest.startswith("self_attn."):
            stack[f"layers.{depth + int(idx)}.{rest}"] = value
    for key, value in sub(state, "decoder.self_attn.").items():
        idx, _, rest = key.partition(".")
        stack[f"layers.{idx}.self_attn.{rest}"] = value
    return stack


@torch.no_grad()
def to_vqa_model(model):
    """A VQA-topology copy of a pretrained (or captioning) VLPModel, as BLIP's VQA fine-tuning starts from
    its pretrained checkpoint: vision, text encoder, fusion layers, ITC/ITM and LM heads copied; the answer
    decoder is the source decoder materialised as a full stack (`decoder_stack_state`). Its cross-attention
    keys/values read question states (text.width); when vision.width differs they cannot be reused and keep
    a fresh init_bert_weights initialisation (a warning names them). Momentum encoders are dropped. A model
    that already has the VQA topology is returned as a copy."""
    if is_vqa(model.cfg):
        return copy.deepcopy(model)
    cfg = vqa_config(model.cfg)
    first = next(model.parameters())
    new = type(model)(cfg).to(first.device, first.dtype).train(model.training)  # VLPModel, without importing vlp
    state = model.state_dict()
    stack = decoder_stack_state(model, state)
    fresh = []
    if cfg.vision.width != cfg.text.width:
        fresh = sorted(k for k in stack if ".cross_attn.key." in k or ".cross_attn.value." in k)
        log.warning("to_vqa_model: vision.width=%d != text.width=%d, so the decoder's cross-attention keys/values "
                    "(which read the image) cannot read the question states: %d tensors of decoder.stack "
                    "layers.*.cross_attn.{key,value} start from a fresh initialisation", cfg.vision.width,
                    cfg.text.width, len(fresh))
    ours = {k: v for k, v in state.items() if not k.startswith(("decoder.", "momentum."))}
    ours.update(prefixed({k: v for k, v in stack.items() if k not in fresh}, "decoder.stack."))
    missing, unexpected = new.load_state_dict(ours, strict=False)
    if set(missing) != {f"decoder.stack.{k}" for k in fresh} or unexpected:
        raise RuntimeError(f"to_vqa_model: state does not fit: missing {missing}, unexpected {unexpected}")
    return new


@torch.no_grad()
def answer_questions(model, pixel_values, input_ids, attention_mask, *, answers=None, k=128, num_beams=3,
                     max_length=10, min_length=1, tokenizer=None, smoothing=0.0):
    """BLIP_VQA's answers to one question per image row (`VLPModel.vqa_answer`).

    input_ids [B, Lq]: the question with [ENC] first; the caller puts it there (BLIP overwrites [CLS]
    with [ENC]; transformers' BlipForQuestionAnswering feeds the ids it is given). attention_mask [B, Lq]
    (None: no padding). The answer decoder starts from [DEC] and never attends to question padding.

    Without `answers`, generation: beam search with `num_beams` (greedy when 1) as transformers' `generate`
    ("generated" length rule), `max_length`/`min_length` counting [DEC], stopping at [SEP]. BLIP's and
    transformers' generate attend to the question's padding too; unpadded questions answer the same.
    Returns the answers decoded with special tokens skipped when a tokenizer is given, else the generated
    token ids (without [DEC] and [SEP]).

    With `answers`, BLIP's `rank_answer`: the k = min(k, len(answers)) answers whose first token is most
    probable after [DEC], then the best of those by the log-likelihood of the whole answer (its tokens after
    [DEC], [SEP] included). `answers` is a list of strings (needs `tokenizer`; padded, [CLS] replaced by
    [DEC] as BLIP does; returns the chosen strings) or a pre-tokenised pair (ids [N, La] with [DEC] first,
    mask [N, La]; returns the chosen indices into it). The score is the plain log-likelihood (smoothing=0):
    the model's probability of the answer. BLIP ranks by its label-smoothed training loss, which adds
    `smoothing` times the mean log-probability over the whole vocabulary at each position (a term that
    grows with answer length and is no evidence for the answer); `smoothing=0.1` reproduces BLIP's ranking.
    """
    if not is_vqa(model.cfg):
        raise ConfigError("vqa_answer needs BLIP_VQA's topology (decoder.context=question); convert a pretrained "
                          "or captioning model with dlip_ds.models.vqa.to_vqa_model")
    bos, sep = special_ids(model, tokenizer, "vqa_answer")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    question = model.fuse(model.encode_image(pixel_values).embeds, input_ids, attention_mask).hidden
    if answers is None:
        check_search(num_beams, where="vqa_answer")
        if max_length < 2:
            raise ValueError(f"vqa_answer: max_length={max_length} leaves no room after [DEC]")
        start = torch.full((question.shape[0], 1), bos, dtype=torch.long, device=question.device)
        if num_beams == 1:
            seqs = greedy(model, question, start, max_length, min_length, 1.0, sep, attention_mask)
        else:
            seqs = beam_search(model, question, start, num_beams, max_length, min_length, 1.0, sep,
                               context_mask=attention_mask)
        ids = [until(s[1:], sep) for s in seqs.tolist()]
        return ids if tokenizer is None else [tokenizer.decode(g, skip_special_tokens=True) for g in ids]
    ids, mask, names = _candidates(answers, tokenizer, bos, question.device)
    best = rank_answers(model, question, attention_mask, ids, mask, k, bos, smoothing)
    return [names[i] for i in best] if names is not None else best


def _candidates(answers, tokenizer, bos: int, device):
    """(ids [N, La] with [DEC] first, mask [N, La], the answer strings or None)."""
    if isinstance(answers, (list, tuple)) and answers and all(isinstance(a, str) for a in answers):
        if tokenizer is None:
            raise ValueError("vqa_answer: answers given as text need a tokenizer (or pass them tokenised: "
                             "(ids, mask) with [DEC] first)")
        tok = tokenizer(list(answers), padding="longest", return_tensors="pt")
        ids = tok.input_ids.to(device)
        ids[:, 0] = bos
        return ids, tok.attention_mask.to(device), list(answers)
    if not (isinstance(answers, (list, tuple)) and len(answers) == 2 and all(torch.is_tensor(a) for a in answers)):
        raise ValueError("vqa_answer: answers must be a non-empty list of strings or an (ids, mask) pair of tensors")
    ids, mask = (a.to(device) for a in answers)
    if ids.dim() != 2 or ids.shape != mask.shape or ids.shape[0] == 0 or ids.shape[1] < 2:
        raise ValueError(f"vqa_answer: answer ids {tuple(ids.shape)} and mask {tuple(mask.shape)}: expected two "
                         "[N, La] tensors, N >= 1, La >= 2 ([DEC] and at least one token)")
    if not bool((ids[:, 0] == bos).all()):
        raise ValueError(f"vqa_answer: tokenised answers must start with [DEC] (id {bos})")
    return ids, mask, None


def rank_answers(model, question, question_mask, ids, mask, k: int, bos: int, smoothing: float = 0.0) -> list[int]:
    """BLIP's `rank_answer` (see `answer_questions`): for each question [B, Lq, Dt] the index of its best
    answer among `ids` [N, La] ([DEC] first)."""
    n_q, k = question.shape[0], min(k, ids.shape[0])
    start = torch.full((n_q, 1), bos, dtype=torch.long, device=question.device)
    first = model.lm_logits_from_hidden(model.decode(question, start, None, context_mask=question_mask).hidden[:, 0])
    top = first.float().softmax(-1).index_select(1, ids[:, 1]).topk(k, dim=1).indices  # [B, k]
    scores = torch.empty(n_q, k, device=question.device)
    per = max(1, RANK_ROWS // k)  # questions per pass
    for s in range(0, n_q, per):
        rows = top[s:s + per]
        q = torch.arange(s, s + rows.shape[0], device=question.device).repeat_interleave(k)
        scores[s:s + rows.shape[0]] = score_answers(model, question[q], question_mask[q], ids[rows.reshape(-1)],
                                                    mask[rows.reshape(-1)], smoothing).view(rows.shape[0], k)
    return top.gather(1, scores.argmax(1, keepdim=True)).squeeze(1).tolist()


def score_answers(model, question, question_mask, ids, mask, smoothing: float = 0.0) -> torch.Tensor:
    """[n] float32: the log-likelihood of answer row i ([DEC] first, right-padded) given question row i: the
    sum over its tokens after [DEC], [SEP] included, of log p, or with `smoothing` BLIP's label-smoothed
    score, (1 - s) log p(token) + s * mean over the vocabulary of log p."""
    length = int(mask.sum(1).max())  # drop the padding columns no row uses
    ids, mask = ids[:, :length], mask[:, :length]
    hidden = model.decode(question, ids, mask, context_mask=question_mask).hidden
    logp = model.lm_logits_from_hidden(hidden[:, :-1]).float().log_softmax(-1)
    tok = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    if smoothing:
        tok = (1 - smoothing) * tok + smoothing * logp.mean(-1)
    return (tok * mask[:, 1:]).sum(1)
