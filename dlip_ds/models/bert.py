"""BERT blocks of the MED model: embeddings, post-norm layers with bidirectional or causal
self-attention and optional cross-attention to image tokens, all through `scaled_dot_product_attention`.

Per-layer names (`self_attn.{query,key,value,out,norm}`, `cross_attn.*`, `mlp.{fc1,fc2,norm}`) map
one-to-one onto transformers/Salesforce BERT names (`attention.self.query`, `attention.output.dense`,
`intermediate.dense`, ...); `keymaps.py` holds that table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dlip_ds.config import TextConfig
from dlip_ds.models.vit import activation, merge_heads, split_heads


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.width, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.width)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        n = input_ids.shape[1]
        if offset + n > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"text of {offset + n} tokens exceeds text.max_positions={self.position_embeddings.num_embeddings}"
            )
        pos = torch.arange(offset, offset + n, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)
        return self.dropout(self.norm(x))


class BertAttention(nn.Module):
    """Multi-head attention plus BERT's output sub-layer: norm(x + dropout(out(attn)))."""

    def __init__(self, cfg: TextConfig, kv_width: int):
        super().__init__()
        self.heads = cfg.heads
        self.query = nn.Linear(cfg.width, cfg.width)
        self.key = nn.Linear(kv_width, cfg.width)
        self.value = nn.Linear(kv_width, cfg.width)
        self.out = nn.Linear(cfg.width, cfg.width)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, context=None, mask=None, cache: dict | None = None, return_qk: bool = False):
        """Self-attention when `context` is None, else cross-attention to `context`.

        mask: bool, True = attend, broadcastable to [B, H, Nq, Nk] (cross-attention: the context's padding).
        cache (generation): self-attention appends its keys/values; cross-attention computes them once (its
        mask is passed again at every step).
        """
        q = split_heads(self.query(x), self.heads)
        if context is None:
            k, v = split_heads(self.key(x), self.heads), split_heads(self.value(x), self.heads)
            if cache is not None:
                if "k" in cache:
                    k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        elif cache is not None and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            k, v = split_heads(self.key(context), self.heads), split_heads(self.value(context), self.heads)
            if cache is not None:
                cache["k"], cache["v"] = k, v
        p = self.dropout.p if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.norm(x + self.dropout(self.out(merge_heads(o))))
        return out, ((q, k) if return_qk else None)


class BertMlp(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.intermediate)
        self.act = activation(cfg.hidden_act, "text.hidden_act")
        self.fc2 = nn.Linear(cfg.intermediate, cfg.width)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(self.fc2(self.act(self.fc1(x)))))


class BertLayer(nn.Module):
    def __init__(self, cfg: TextConfig, cross_width: int | None = None):
        super().__init__()
        self.self_attn = BertAttention(cfg, cfg.width)
        self.cross_attn = BertAttention(cfg, cross_width) if cross_width else None
        self.mlp = BertMlp(cfg)

    @property
    def has_cross(self) -> bool:
        return self.cross_attn is not None


@dataclass
class LayerTaps:
    """Which positions of a run of layers to tap (0-based positions in that run)."""

    hidden: tuple = ()
    self_qk: tuple = ()
    cross_qk: tuple = ()
    out: dict = field(default_factory=lambda: {"hidden": {}, "self_qk": {}, "cross_qk": {}})


def run_layers(layers, x, self_mask=None, context=None, *, context_mask=None, self_attns=None, caches=None,
               taps: LayerTaps | None = None) -> torch.Tensor:
    """Run BERT layers in order. `context` None = unimodal (cross-attention skipped).

    context_mask: bool, True = attend, broadcastable to [B, H, Nq, Nk]: the context's padding (a question's,
    for BLIP_VQA's answer decoder); None = every context token.
    self_attns: per-layer replacement self-attention modules (a decoder that shares everything else);
    caches: per-layer dicts {"self": {}, "cross": {}} for incremental decoding.
    """
    taps = taps or LayerTaps()
    for i, layer in enumerate(layers):
        attn = self_attns[i] if self_attns is not None else layer.self_attn
        self_cache, cross_cache = (caches[i]["self"], caches[i]["cross"]) if caches is not None else (None, None)
        x, qk = attn(x, mask=self_mask, cache=self_cache, return_qk=i in taps.self_qk)
        if qk is not None:
            taps.out["self_qk"][i] = qk
        if context is not None and layer.has_cross:
            x, qk = layer.cross_attn(x, context, context_mask, cache=cross_cache, return_qk=i in taps.cross_qk)
            if qk is not None:
                taps.out["cross_qk"][i] = qk
        elif i in taps.cross_qk:
            raise ValueError(f"cross_qk tap at layer {i}: that layer runs without cross-attention")
        x = layer.mlp(x)
        if i in taps.hidden:
            taps.out["hidden"][i] = x
    return x


def init_bert_weights(m: nn.Module, std: float = 0.02) -> None:
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            m.weight.data[m.padding_idx].zero_()
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
