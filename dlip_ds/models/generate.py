"""Generation for `VLPModel.generate` (captions) and `vqa_answer` (answers): greedy and beam search over
the decoder's KV caches.

Both follow transformers' `generate` (BLIP's captioner and answer decoder call it), so the same weights give
the same tokens. `model` is a VLPModel: its `_next_logits` runs the decoder on the new tokens only. The
context is what the decoder cross-attends to (image embeds, or question states with their padding mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def special_ids(model, tokenizer=None, where: str = "generate") -> tuple[int, int]:
    """([DEC] (bos), [SEP]) ids: the tokenizer's when it has them, else the model config's; checked against
    the vocabulary."""
    t = model.cfg.text
    bos, sep = t.bos_token_id, t.sep_token_id
    if tokenizer is not None:
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else bos
        sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else sep
    for name, tid in (("[DEC] (bos)", bos), ("[SEP]", sep)):
        if not 0 <= tid < t.vocab_size:
            raise ValueError(f"{where}: {name} id {tid} is outside the vocabulary of {t.vocab_size}; "
                             "pass the tokenizer or set text.bos_token_id / text.sep_token_id")
    return bos, sep


def until(ids: list[int], sep: int) -> list[int]:
    return ids[: ids.index(sep)] if sep in ids else ids


def strip_prompt(tokenizer, prompt: str, prompt_ids: list[int], generated: list[int]) -> str:
    """BLIP's cut (`caption[len(self.prompt):]` in its `generate`): decode prompt + caption as one text,
    so word pieces join as in the whole sentence, then drop as many characters as the prompt text has
    (whatever they decode to); surrounding whitespace is trimmed, which no caption metric sees."""
    text = tokenizer.decode(prompt_ids + generated, skip_special_tokens=True)
    return text[len(prompt):].strip()


def _penalise(scores: torch.Tensor, seqs: torch.Tensor, penalty: float, sep: int, cur_len: int, min_length: int):
    """transformers' RepetitionPenaltyLogitsProcessor then MinLengthLogitsProcessor, in place."""
    if penalty != 1.0:
        seen = scores.gather(1, seqs)
        scores.scatter_(1, seqs, torch.where(seen < 0, seen * penalty, seen / penalty))
    if cur_len < min_length:
        scores[:, sep] = -float("inf")
    return scores


def _reorder(caches, index: torch.Tensor) -> None:
    """Follow the surviving beams. Cross-attention keys/values stay: every beam of a context holds the same."""
    for c in caches:
        for key in list(c["self"]):
            c["self"][key] = c["self"][key].index_select(0, index)


def greedy(model, context, start, max_length, min_length, penalty, sep, context_mask=None):
    """Greedy decoding from `start` [B, n] until every row has produced [SEP] or max_length tokens.
    `context_mask` [B, Nc], 1 = real context token (None: all)."""
    seqs, caches, past = start, model._new_caches(), 0
    done = torch.zeros(seqs.shape[0], dtype=torch.bool, device=seqs.device)
    pad = model.cfg.text.pad_token_id
    while seqs.shape[1] < max_length and not bool(done.all()):
        logits = model._next_logits(seqs[:, past:], context, caches, past, context_mask)
        past = seqs.shape[1]
        nxt = _penalise(logits, seqs, penalty, sep, seqs.shape[1], min_length).argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        done |= nxt == sep
    return seqs


LENGTH_NORMS = ("generated", "total")


def check_search(num_beams: int, length_norm: str = "generated", where: str = "generate") -> None:
    if num_beams < 1:
        raise ValueError(f"{where}: num_beams must be >= 1, got {num_beams}")
    if length_norm not in LENGTH_NORMS:
        raise ValueError(f"{where}: length_norm must be one of {LENGTH_NORMS}, got {length_norm!r}")


def beam_search(model, context, start, beams, max_length, min_length, penalty, sep, length_norm="generated",
                context_mask=None):
    """Beam search as transformers' `generate` does it (length_penalty=1, early_stopping=False).
    `context_mask` [B, Nc], 1 = real context token (None: all).

    `length_norm` is the rule that ranks finished hypotheses (summed log-probabilities over a length):
    - "generated": transformers >= 4.36, today's: divided by the tokens generated, [SEP] included. A
      hypothesis that reaches max_length finishes like one that produced [SEP] (top `beams` candidates);
      the search stops when the best running beam, normalised the same way, cannot beat the worst kept.
    - "total": transformers < 4.36 (`BeamHypotheses`; BLIP's published captions used 4.15): divided by
      every token before [SEP], [DEC] and prompt included. At max_length the `beams` running beams join
      (over max_length); an image is done when the best of its 2 * beams candidates, over the length
      before this step, cannot beat the worst kept hypothesis.
    """
    check_search(beams, length_norm)
    total = length_norm == "total"
    b, prompt_len = start.shape
    dev = start.device
    pad = model.cfg.text.pad_token_id
    context = context.repeat_interleave(beams, dim=0)
    if context_mask is not None:
        context_mask = context_mask.repeat_interleave(beams, dim=0)
    running = start.repeat_interleave(beams, dim=0)  # [b*beams, cur]
    run_scores = torch.zeros(b, beams, device=dev)
    run_scores[:, 1:] = -1e9  # only the first beam expands at step one
    fin_seqs = torch.full((b, beams, max_length), pad, dtype=torch.long, device=dev)
    fin_scores = torch.full((b, beams), -1e9, device=dev)
    fin_done = torch.zeros(b, beams, dtype=torch.bool, device=dev)
    improvable = torch.ones(b, 1, dtype=torch.bool, device=dev)  # not done yet

    def finish(seqs, scores, new):
        """Let the `new` hypotheses [b, n] (seqs [b, n, len], normalised scores) into the `beams` best kept."""
        nonlocal fin_seqs, fin_scores, fin_done
        padded = F.pad(seqs, (0, max_length - seqs.shape[-1]), value=pad)
        all_scores = torch.cat([fin_scores, torch.where(new, scores, torch.full_like(scores, -1e9))], dim=1)
        best = all_scores.topk(beams, dim=-1).indices
        fin_seqs = torch.cat([fin_seqs, padded], dim=1).gather(1, best[:, :, None].expand(-1, -1, max_length))
        fin_done = torch.cat([fin_done, new], dim=1).gather(1, best)
        fin_scores = all_scores.gather(1, best)

    caches, past = model._new_caches(), 0
    top_mask = torch.arange(2 * beams, device=dev) < beams
    while True:
        cur = running.shape[1]
        logits = model._next_logits(running[:, past:], context, caches, past, context_mask)
        past = cur
        logp = _penalise(F.log_softmax(logits, -1), running, penalty, sep, cur, min_length)
        vocab = logp.shape[-1]
        logp = (logp.view(b, beams, vocab) + run_scores[:, :, None]).view(b, -1)
        top_scores, top_idx = logp.topk(2 * beams, dim=-1)
        src_beam, token = top_idx // vocab, top_idx % vocab
        src_flat = (src_beam + torch.arange(b, device=dev)[:, None] * beams).view(-1)
        cand = torch.cat([running.index_select(0, src_flat), token.view(-1, 1)], dim=1).view(b, 2 * beams, cur + 1)
        last = cur + 1 >= max_length
        hits = (token == sep) | (not total and last)  # candidates that finish here
        # the best `beams` unfinished candidates keep running
        keep = (top_scores - hits.float() * 1e9).topk(beams, dim=-1).indices
        run_scores = (top_scores - hits.float() * 1e9).gather(1, keep)
        keep_flat = (keep + torch.arange(b, device=dev)[:, None] * (2 * beams)).view(-1)
        running = cand.view(b * 2 * beams, -1).index_select(0, keep_flat)
        _reorder(caches, src_flat.view(b, 2 * beams).gather(1, keep).view(-1))
        # finished candidates among the top `beams` enter the hypotheses
        new = hits & top_mask[None, :] & improvable
        finish(cand, top_scores / (cur if total else cur + 1 - prompt_len), new)
        if total:
            full = fin_done.all(dim=1, keepdim=True)
            improvable &= ~(full & (fin_scores.min(dim=1, keepdim=True).values >= top_scores[:, :1] / cur))
            if last:  # transformers' `finalize`: the running beams of every image not done, over max_length
                finish(running.view(b, beams, -1), run_scores / (cur + 1), improvable.expand(-1, beams))
            if not bool(improvable.any()) or last:
                break
            continue
        cur += 1
        worst = torch.where(fin_done, fin_scores.min(dim=1, keepdim=True).values, torch.full_like(fin_scores, -1e9))
        improvable &= (run_scores[:, :1] / (cur - prompt_len) > worst).any(dim=-1, keepdim=True)
        if not bool(improvable.any()) or bool(hits.all()) or cur >= max_length:
            break
    return fin_seqs[:, 0]
