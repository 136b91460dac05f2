"""The MED model (BLIP's multimodal mixture of encoder-decoder): vision encoder, text encoder,
fusion (cross-attention in the last K text layers, or K extra layers ALBEF-style), a causal decoder,
ITC projections + temperature, ITM head and an LM head tied to the word embeddings.

The forward passes are split in the stages the distillation step needs (docs/architecture.md, section 2):
`encode_image`, `encode_text`, `fuse`, `decode`; each takes a `TapRequest` and returns only the tapped
hidden states and attention q/k (never attention probabilities). With `decoder.context="question"` the
decoder is BLIP_VQA's answer decoder, reading the question states of `fuse` (models/vqa.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dlip_ds.config import MODULES, ConfigError, ModelConfig, validate_model
from dlip_ds.models.bert import (
    BertAttention,
    BertLayer,
    LayerTaps,
    TextEmbeddings,
    init_bert_weights,
    run_layers,
)
from dlip_ds.models.generate import (
    beam_search,
    check_search,
    greedy,
    special_ids,
    strip_prompt,
    until,
)
from dlip_ds.models.vit import VisionTransformer, activation
from dlip_ds.models.vqa import answer_questions


@dataclass(frozen=True)
class TapRequest:
    """Layers to tap in one module: hidden states (block outputs) and/or projected attention q/k."""

    hidden: tuple[int, ...] = ()
    self_qk: tuple[int, ...] = ()
    cross_qk: tuple[int, ...] = ()


@dataclass
class EncoderOutput:
    embeds: torch.Tensor  # [B, N, D]
    feat: torch.Tensor  # [B, E], L2-normalised ITC feature
    taps: dict


@dataclass
class FusionOutput:
    hidden: torch.Tensor  # [B, L, Dt], output of the last fusion layer
    itm_logits: torch.Tensor  # [B, 2]
    taps: dict


@dataclass
class DecoderOutput:
    hidden: torch.Tensor  # [B, L, Dt], before the LM head
    taps: dict


@dataclass(frozen=True)
class ModuleInfo:
    depth: int
    width: int
    heads: int
    head_dim: int
    cross_layers: tuple[int, ...] = ()  # the layers (0-based, of this module) that carry cross-attention

    @property
    def has_cross(self) -> bool:
        return bool(self.cross_layers)


class TextEncoder(nn.Module):
    """BERT: embeddings + layers; `cross_from` = index of the first layer carrying cross-attention, whose
    keys/values read `cross_width`-wide states (default: the image's)."""

    def __init__(self, cfg: ModelConfig, depth: int, cross_from: int, cross_width: int | None = None):
        super().__init__()
        self.embeddings = TextEmbeddings(cfg.text)
        width = cross_width or cfg.vision.width
        self.layers = nn.ModuleList([BertLayer(cfg.text, width if i >= cross_from else None) for i in range(depth)])


class ITCHead(nn.Module):
    """ITC projections and the learnable temperature. Calling it returns the temperature clamped as BLIP
    does; going through the module call lets ZeRO-3 hooks gather `temp`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.vision_proj = nn.Linear(cfg.vision.width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text.width, cfg.embed_dim)
        self.temp = nn.Parameter(torch.tensor(float(cfg.temp)))

    def forward(self) -> torch.Tensor:
        return self.temp.clamp(0.001, 0.5)


class LMHead(nn.Module):
    """BERT's prediction-head transform and the output bias; the output weight is the word embedding."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        t = cfg.text
        self.dense = nn.Linear(t.width, t.width)
        self.act = activation(t.hidden_act, "text.hidden_act")
        self.norm = nn.LayerNorm(t.width, eps=t.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(t.vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(hidden)))


class Decoder(nn.Module):
    """Causal decoder running the same layer sequence as the multimodal pass.

    share=True (BLIP): only the self-attention of each layer is the decoder's own; embeddings,
    cross-attention and feed-forward are the text encoder's. share=False: a separate full stack, whose
    cross-attention reads the image or, with context="question" (BLIP_VQA), the question states.
    """

    def __init__(self, cfg: ModelConfig, fused_depth: int, cross_from: int):
        super().__init__()
        self.share = cfg.decoder.share
        if self.share:
            self.self_attn = nn.ModuleList([BertAttention(cfg.text, cfg.text.width) for _ in range(fused_depth)])
        else:
            question = cfg.decoder.context == "question"
            self.stack = TextEncoder(cfg, fused_depth, cross_from, cfg.text.width if question else None)


class MomentumEncoders(nn.Module):
    """EMA copies of the unimodal encoders and ITC projections (BLIP's `*_m`), never trained by gradients."""

    def __init__(self, vision: nn.Module, text: nn.Module, itc: ITCHead):
        super().__init__()
        self.vision = copy.deepcopy(vision)
        self.text = copy.deepcopy(text)
        self.vision_proj = copy.deepcopy(itc.vision_proj)
        self.text_proj = copy.deepcopy(itc.text_proj)
        self.requires_grad_(False)


class MomentumMaster(nn.Module):
    """The fp32 master of a model's momentum copies, for training in bf16/fp16: one fp32 buffer per
    momentum parameter, named like it (`vision.blocks.0.attn.qkv.weight`, ...), in the same order.

    An EMA with coefficient 0.995 moves each weight by 0.5% of its distance to the online weight per
    step; held in bf16 most of that rounds away. DeepSpeed casts a module's parameters to the training
    dtype but keeps its buffers as they are, so the EMA accumulates here in fp32 (`update`, from the
    optimizer's fp32 master weights) and the model's momentum copies hold it rounded to their dtype for
    the forward (`write_to`). The trainer's task owns it, so it is checkpointed with the run."""

    def __init__(self, model: VLPModel):
        super().__init__()
        for name, child in model.momentum.named_children():
            child = copy.deepcopy(child)
            for module in child.modules():
                for key, p in list(module._parameters.items()):
                    del module._parameters[key]
                    module.register_buffer(key, p.detach().float().clone())
            self.add_module(name, child)

    @torch.no_grad()
    def update(self, online, coef: float) -> None:
        """One EMA step, e = c * e + (1 - c) * p, from `online` (in `VLPModel.momentum_sources()` order)."""
        ema = list(self.buffers())
        online = list(online)
        if len(online) != len(ema):
            raise ValueError(f"MomentumMaster.update: {len(online)} online tensors for {len(ema)} momentum tensors")
        for e, p in zip(ema, online):
            e.mul_(coef).add_(p.to(e.device, torch.float32), alpha=1.0 - coef)

    @torch.no_grad()
    def write_to(self, model: VLPModel) -> None:
        """The EMA into the model's momentum copies, rounded to their dtype (the caller gathers them under ZeRO-3)."""
        for p, e in zip(model.momentum.parameters(), self.buffers()):
            p.copy_(e)


class VLPModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        validate_model(cfg)
        self.cfg = cfg
        t, k = cfg.text, cfg.fusion.layers
        albef = cfg.fusion.mode == "albef"
        self.vision = VisionTransformer(cfg.vision)
        # blip: cross-attention inside text layers depth-K..depth-1; albef: K extra layers after the text.
        self.text = TextEncoder(cfg, t.depth, t.depth if albef else t.depth - k)
        self.fusion = nn.ModuleList([BertLayer(t, cfg.vision.width) for _ in range(k if albef else 0)])
        self.itc = ITCHead(cfg)
        self.itm_head = nn.Linear(t.width, 2)
        self._fusion_start = t.depth if albef else t.depth - k
        if cfg.decoder.enabled:
            self.decoder = Decoder(cfg, len(self._fused_layers()), self._fusion_start)
            self.lm_head = LMHead(cfg)
        for m in (self.text, self.fusion, self.itc, self.itm_head, getattr(self, "decoder", None),
                  getattr(self, "lm_head", None)):
            if m is not None:
                m.apply(init_bert_weights)
        if cfg.momentum:
            self.momentum = MomentumEncoders(self.vision, self.text, self.itc)

    # ------------------------------------------------------------------ structure

    def _fused_layers(self) -> list[BertLayer]:
        return list(self.text.layers) + list(self.fusion)

    def _require_decoder(self) -> None:
        if not self.cfg.decoder.enabled:
            raise ConfigError("this model has no decoder (decoder.enabled=false)")

    def _require_image_decoder(self, what: str) -> None:
        self._require_decoder()
        if self.cfg.decoder.context != "image":
            raise ConfigError(f"{what}: this model's decoder answers questions (decoder.context=question); "
                              "use vqa_answer")

    def module_info(self, module: str) -> ModuleInfo:
        """Depth, width, heads and the cross-attention layers of one module: every fusion layer; in the
        decoder (which runs the whole multimodal layer sequence) only those from the first fused one on."""
        v, t, k = self.cfg.vision, self.cfg.text, self.cfg.fusion.layers
        if module == "vision":
            return ModuleInfo(v.depth, v.width, v.heads, v.width // v.heads)
        if module == "text":
            return ModuleInfo(t.depth, t.width, t.heads, t.width // t.heads)
        if module == "fusion":
            return ModuleInfo(k, t.width, t.heads, t.width // t.heads, tuple(range(k)))
        if module == "decoder":
            self._require_decoder()
            depth = len(self._fused_layers())
            return ModuleInfo(depth, t.width, t.heads, t.width // t.heads, tuple(range(self._fusion_start, depth)))
        raise ValueError(f"unknown module '{module}'; expected one of {MODULES}")

    def _check_taps(self, module: str, taps: TapRequest | None) -> TapRequest:
        taps = taps or TapRequest()
        info = self.module_info(module)
        for kind in ("hidden", "self_qk", "cross_qk"):
            for i in getattr(taps, kind):
                if not 0 <= i < info.depth:
                    raise ValueError(f"{module} tap {kind}={i} is out of range: {module} has {info.depth} layers")
        if taps.cross_qk and not info.has_cross:
            raise ValueError(f"{module} has no cross-attention; cross_qk taps are for fusion and decoder")
        plain = [i for i in taps.cross_qk if i not in info.cross_layers]
        if plain:
            raise ValueError(f"{module} tap cross_qk={plain}: only layers {list(info.cross_layers)} of {module} carry "
                             "cross-attention")
        return taps

    # ------------------------------------------------------------------ masks

    @staticmethod
    def _self_mask(attention_mask, q_len: int, causal: bool, past: int = 0, device=None):
        """Bool mask (True = attend) broadcastable to [B, H, q_len, past + q_len], or None when nothing is masked."""
        k_len = past + q_len
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool()[:, None, None, :k_len]
        if causal and q_len > 1:
            tril = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=past)
            mask = tril if mask is None else mask & tril
        return mask

    # ------------------------------------------------------------------ stages

    def encode_image(self, pixel_values: torch.Tensor, taps: TapRequest | None = None) -> EncoderOutput:
        taps = self._check_taps("vision", taps)
        embeds, tapped = self.vision(pixel_values, hidden=taps.hidden, self_qk=taps.self_qk)
        feat = F.normalize(self.itc.vision_proj(embeds[:, 0]), dim=-1)
        return EncoderOutput(embeds, feat, {**tapped, "cross_qk": {}})

    def encode_text(self, input_ids, attention_mask, taps: TapRequest | None = None) -> EncoderOutput:
        taps = self._check_taps("text", taps)
        lt = LayerTaps(taps.hidden, taps.self_qk)
        x = self.text.embeddings(input_ids)
        x = run_layers(self.text.layers, x, self._self_mask(attention_mask, x.shape[1], False), taps=lt)
        feat = F.normalize(self.itc.text_proj(x[:, 0]), dim=-1)
        return EncoderOutput(x, feat, lt.out)

    def fuse(self, image_embeds, input_ids, attention_mask, taps: TapRequest | None = None) -> FusionOutput:
        if self.cfg.fusion.layers == 0:
            raise ConfigError("this model has no fusion layers (fusion.layers=0)")
        taps = self._check_taps("fusion", taps)
        s = self._fusion_start
        lt = LayerTaps(*(tuple(i + s for i in getattr(taps, f)) for f in ("hidden", "self_qk", "cross_qk")))
        x = self.text.embeddings(input_ids)
        x = run_layers(self._fused_layers(), x, self._self_mask(attention_mask, x.shape[1], False),
                       context=image_embeds, taps=lt)
        out = {kind: {i - s: v for i, v in d.items()} for kind, d in lt.out.items()}
        return FusionOutput(x, self.itm_head(x[:, 0]), out)

    def _decode_hidden(self, context, input_ids, attention_mask, lt=None, caches=None, past=0, context_mask=None):
        dec = self.decoder
        embeddings = self.text.embeddings if dec.share else dec.stack.embeddings
        layers = self._fused_layers() if dec.share else list(dec.stack.layers)
        x = embeddings(input_ids, offset=past)
        mask = self._self_mask(attention_mask, x.shape[1], True, past, x.device)
        cmask = None if context_mask is None else self._self_mask(context_mask, context.shape[1], False)
        return run_layers(layers, x, mask, context=context, context_mask=cmask, taps=lt, caches=caches,
                          self_attns=dec.self_attn if dec.share else None)

    def decode(self, context, input_ids, attention_mask, taps: TapRequest | None = None,
               context_mask=None) -> DecoderOutput:
        """[DEC] first. `context`: the image embeds [B, Nv, Dv] (decoder.context="image"), or the question
        states [B, Lq, Dt] of `fuse` (decoder.context="question"), with `context_mask` [B, Lq] (1 = real)."""
        self._require_decoder()
        taps = self._check_taps("decoder", taps)
        width = self.cfg.text.width if self.cfg.decoder.context == "question" else self.cfg.vision.width
        if context.shape[-1] != width:
            raise ValueError(f"decode: context of width {context.shape[-1]}, expected {width} (decoder.context="
                             f"{self.cfg.decoder.context}: image embeds, or question states from fuse)")
        lt = LayerTaps(taps.hidden, taps.self_qk, taps.cross_qk)
        return DecoderOutput(self._decode_hidden(context, input_ids, attention_mask, lt, context_mask=context_mask),
                             lt.out)

    def temperature(self) -> torch.Tensor:
        return self.itc()

    def lm_features(self, hidden: torch.Tensor) -> torch.Tensor:
        self._require_decoder()
        return self.lm_head(hidden)

    def lm_projection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [V, Dt], bias [V]); the weight is the decoder's word embedding (tied)."""
        self._require_decoder()
        emb = self.text.embeddings if self.decoder.share else self.decoder.stack.embeddings
        return emb.word_embeddings.weight, self.lm_head.bias

    def lm_logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        weight, bias = self.lm_projection()
        return F.linear(self.lm_features(hidden), weight, bias)

    # ------------------------------------------------------------------ task methods

    def itc_features(self, pixel_values, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(pixel_values).feat, self.encode_text(input_ids, attention_mask).feat

    def itm_logits(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        return self.fuse(self.encode_image(pixel_values).embeds, input_ids, attention_mask).itm_logits

    def lm_logits(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        self._require_image_decoder("lm_logits")
        hidden = self.decode(self.encode_image(pixel_values).embeds, input_ids, attention_mask).hidden
        return self.lm_logits_from_hidden(hidden)

    # ------------------------------------------------------------------ momentum (BLIP ITC soft targets)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """EMA step: p_m = c * p_m + (1 - c) * p, c = cfg.momentum_coef."""
        c = self.cfg.momentum_coef
        for online, ema in self._momentum_pairs():
            ema.mul_(c).add_(online.detach(), alpha=1.0 - c)

    @torch.no_grad()
    def reset_momentum(self) -> None:
        """Copy the online weights into the momentum encoders (BLIP does this at construction)."""
        for online, ema in self._momentum_pairs():
            ema.copy_(online)

    def momentum_sources(self) -> list[nn.Parameter]:
        """The online parameters the momentum copies follow, in the order of `self.momentum.parameters()`."""
        return [online for online, _ in self._momentum_pairs()]

    def _momentum_pairs(self):
        if not self.cfg.momentum:
            raise ConfigError("this model has no momentum encoders (momentum=false)")
        m = self.momentum
        for online, ema in ((self.vision, m.vision), (self.text, m.text), (self.itc.vision_proj, m.vision_proj),
                            (self.itc.text_proj, m.text_proj)):
            yield from zip(online.parameters(), ema.parameters())

    @torch.no_grad()
    def momentum_itc_features(self, pixel_values, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised (image_feat_m, text_feat_m) from the momentum encoders, without gradients."""
        if not self.cfg.momentum:
            raise ConfigError("momentum_itc_features needs momentum=true")
        m = self.momentum
        image_embeds, _ = m.vision(pixel_values)
        x = m.text.embeddings(input_ids)
        x = run_layers(m.text.layers, x, self._self_mask(attention_mask, x.shape[1], False))
        return (F.normalize(m.vision_proj(image_embeds[:, 0]), dim=-1),
                F.normalize(m.text_proj(x[:, 0]), dim=-1))

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, pixel_values, tokenizer=None, prompt="a picture of ", num_beams=3, max_length=20,
                 min_length=5, repetition_penalty=1.0, length_norm="generated"):
        """Caption images as BLIP's captioner: decoder input [DEC] + prompt, stop at [SEP].

        `max_length`/`min_length` count every token, [DEC] and prompt included (transformers' convention,
        which BLIP uses). `prompt` is text (needs `tokenizer`) or a list of token ids. Returns the captions
        with the prompt cut off as BLIP does (`text[len(prompt):]`) when a tokenizer is given, else the
        generated token ids (no prompt, no [SEP]). `length_norm` ranks finished beams: "generated" (default:
        transformers >= 4.36, what `BlipForConditionalGeneration.generate` gives today) or "total" (the
        transformers < 4.36 rule behind BLIP's published captions); see `generate.beam_search`.
        """
        self._require_image_decoder("generate")
        bos, sep = special_ids(self, tokenizer)
        if isinstance(prompt, str):
            if prompt and tokenizer is None:
                raise ValueError("generate: a text prompt needs a tokenizer (or pass prompt as token ids, or '')")
            prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids if prompt else []
        else:
            prompt_ids = [int(i) for i in prompt]
        if max_length <= len(prompt_ids) + 1:
            raise ValueError(f"generate: max_length={max_length} leaves no room after [DEC] and the prompt")
        image_embeds = self.encode_image(pixel_values).embeds
        start = torch.tensor([[bos] + prompt_ids], device=image_embeds.device).expand(image_embeds.shape[0], -1)
        check_search(num_beams, length_norm)
        if num_beams == 1:
            seqs = greedy(self, image_embeds, start, max_length, min_length, repetition_penalty, sep)
        else:
            seqs = beam_search(self, image_embeds, start, num_beams, max_length, min_length, repetition_penalty, sep,
                               length_norm=length_norm)
        n = start.shape[1]
        ids = [until(s[n:], sep) for s in seqs.tolist()]
        if tokenizer is None:
            return ids
        text = prompt if isinstance(prompt, str) else tokenizer.decode(prompt_ids, skip_special_tokens=True)
        return [strip_prompt(tokenizer, text, prompt_ids, g) for g in ids]

    @torch.no_grad()
    def vqa_answer(self, pixel_values, input_ids, attention_mask, *, answers=None, k=128, num_beams=3, max_length=10,
                   min_length=1, tokenizer=None, smoothing=0.0):
        """BLIP_VQA's answers ([ENC] first in `input_ids`, put there by the caller as BLIP does), generated or
        ranked over `answers`: arguments and results in `models/vqa.py: answer_questions`."""
        return answer_questions(self, pixel_values, input_ids, attention_mask, answers=answers, k=k,
                                num_beams=num_beams, max_length=max_length, min_length=min_length,
                                tokenizer=tokenizer, smoothing=smoothing)

    def _next_logits(self, tokens, context, caches, past, context_mask=None):
        hidden = self._decode_hidden(context, tokens, None, caches=caches, past=past, context_mask=context_mask)
        return self.lm_logits_from_hidden(hidden[:, -1]).float()

    def _new_caches(self):
        n = self.module_info("decoder").depth
        return [{"self": {}, "cross": {}} for _ in range(n)]
