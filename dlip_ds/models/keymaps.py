"""State-dict key renaming between our module names and the BERT / transformers ViT names that the
transformers BLIP and Salesforce BLIP checkpoints use.
"""

from __future__ import annotations

import torch

from dlip_ds.config import ConfigError

# Our BERT layer names <-> transformers / Salesforce `med.py` names (module paths, before .weight/.bias).
_BERT_LAYER = {
    "self_attn.query": "attention.self.query",
    "self_attn.key": "attention.self.key",
    "self_attn.value": "attention.self.value",
    "self_attn.out": "attention.output.dense",
    "self_attn.norm": "attention.output.LayerNorm",
    "cross_attn.query": "crossattention.self.query",
    "cross_attn.key": "crossattention.self.key",
    "cross_attn.value": "crossattention.self.value",
    "cross_attn.out": "crossattention.output.dense",
    "cross_attn.norm": "crossattention.output.LayerNorm",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
    "mlp.norm": "output.LayerNorm",
}
_BERT_EMBED = {"word_embeddings": "word_embeddings", "position_embeddings": "position_embeddings", "norm": "LayerNorm"}
# Our (= timm = Salesforce) ViT names <-> transformers BlipVisionModel names.
_HF_VIT_LAYER = {"norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
                 "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_HF_VIT_TOP = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
               "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
               "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
               "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}


def sub(state: dict, prefix: str) -> dict:
    """The keys under `prefix`, with `prefix` removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


def _split_param(key: str) -> tuple[str, str]:
    path, _, param = key.rpartition(".")
    return path, param


def _rename_layers(state: dict, table: dict, src_layers: str, dst_layers: str, src_top: dict, where: str) -> dict:
    """Rename `{src_layers}.N.<path>.<param>` through `table` and top-level keys through `src_top`."""
    out = {}
    for key, value in state.items():
        if key in src_top:
            out[src_top[key]] = value
            continue
        if key.startswith(src_layers + "."):
            idx, _, rest = key[len(src_layers) + 1:].partition(".")
            path, param = _split_param(rest)
            if path in table:
                out[f"{dst_layers}.{idx}.{table[path]}.{param}"] = value
                continue
        raise ConfigError(f"{where}: unexpected key '{key}'")
    return out


def bert_to_ours(state: dict, where: str) -> dict:
    """A BERT module's state (`embeddings.*`, `encoder.layer.N.*`) -> our TextEncoder names."""
    state = {k: v for k, v in state.items() if not k.endswith("position_ids") and not k.startswith("pooler.")}
    top = {f"embeddings.{b}.{p}": f"embeddings.{o}.{p}" for o, b in _BERT_EMBED.items() for p in ("weight", "bias")}
    return _rename_layers(state, {b: o for o, b in _BERT_LAYER.items()}, "encoder.layer", "layers", top, where)


def ours_to_bert(state: dict) -> dict:
    top = {f"embeddings.{o}.{p}": f"embeddings.{b}.{p}" for o, b in _BERT_EMBED.items() for p in ("weight", "bias")}
    return _rename_layers(state, _BERT_LAYER, "layers", "encoder.layer", top, "export")


def hf_vit_to_ours(state: dict, where: str) -> dict:
    top = {v: k for k, v in _HF_VIT_TOP.items()}
    return _rename_layers(state, {v: k for k, v in _HF_VIT_LAYER.items()}, "encoder.layers", "blocks", top, where)


def ours_to_hf_vit(state: dict) -> dict:
    return _rename_layers(state, _HF_VIT_LAYER, "blocks", "encoder.layers", _HF_VIT_TOP, "export")


def lm_head_from_bert(pred: dict, words: torch.Tensor, where: str) -> dict:
    """BERT `cls.predictions.*` -> our lm_head; the output weight must be the word embeddings (tied)."""
    out = {}
    tied = pred.get("decoder.weight")
    if tied is not None and words is not None and not torch.equal(tied, words):
        raise ConfigError(f"{where}: the LM output weight differs from the word embeddings; "
                          "only tied LM heads (as BLIP's) are supported")
    for key, value in pred.items():
        if key.startswith("transform.dense."):
            out["lm_head.dense." + key.rpartition(".")[2]] = value
        elif key.startswith("transform.LayerNorm."):
            out["lm_head.norm." + key.rpartition(".")[2]] = value
        elif key == "bias":
            out["lm_head.bias"] = value
        elif key not in ("decoder.weight", "decoder.bias"):  # tied to word embeddings / `bias`
            raise ConfigError(f"{where}: unexpected key 'cls.predictions.{key}'")
    return out
