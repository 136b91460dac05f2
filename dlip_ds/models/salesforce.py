"""Salesforce BLIP `.pth` checkpoints (models/blip_pretrain.py, blip_retrieval.py, blip.py BLIP_Decoder,
blip_vqa.py), pretrained or fine-tuned."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from dlip_ds.config import ConfigError, deep_merge, model_config_from_dict
from dlip_ds.models.keymaps import bert_to_ours, lm_head_from_bert, prefixed, sub
from dlip_ds.models.vlp import VLPModel
from dlip_ds.models.weights import load_state_strict, read_json, read_weights

log = logging.getLogger(__name__)

_DROP_SALESFORCE = ("image_queue", "text_queue", "queue_ptr", "idx_queue", "ptr_queue")
# (ours, theirs): heads and momentum copies whose keys differ only by prefix
_RENAMED = (("itc.vision_proj.", "vision_proj."), ("itc.text_proj.", "text_proj."),
            ("itm_head.", "itm_head."), ("momentum.vision.", "visual_encoder_m."),
            ("momentum.vision_proj.", "vision_proj_m."), ("momentum.text_proj.", "text_proj_m."))


# The top-level modules of BLIP's models; which of them a checkpoint holds says which model wrote it.
_HEADS = ("vision_proj", "text_proj", "itm_head")
_MOMENTUM = ("visual_encoder_m", "text_encoder_m", "vision_proj_m", "text_proj_m")
_KNOWN = {"visual_encoder", "text_encoder", "text_decoder", "temp", *_HEADS, *_MOMENTUM, *_DROP_SALESFORCE}
_LAYOUTS = ("pretraining (blip_pretrain.py: visual_encoder, text_encoder, text_decoder, vision_proj, text_proj, "
            "itm_head), retrieval (blip_retrieval.py: the same without text_decoder), captioning (blip.py "
            "BLIP_Decoder: visual_encoder, text_decoder) or VQA (blip_vqa.py: visual_encoder, text_encoder, "
            "text_decoder); momentum copies (*_m), temp and queues only beside the ITC heads")

# BLIP's `create_vit(vit, ...)`: the ViT sizes its training configs name (`vit: base` in caption_coco.yaml)
_BLIP_VIT_HEADS = {"base": 12, "large": 16}
_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json")


def load_salesforce_blip(path: Path, med_config, overrides: dict, *, vision_config=None, tokenizer=None) -> VLPModel:
    """A Salesforce BLIP checkpoint, pretrained or fine-tuned: the model that wrote it is read from its top-level
    keys (pretraining; retrieval -> no decoder; captioning -> vision + its own decoder, the text encoder and
    heads left at their initialisation; VQA -> the answer decoder, `decoder.context="question"`, the ITC/ITM
    heads at their initialisation), the rest of the topology (decoder shared or not, momentum copies) from the
    keys too, sizes from the shapes and the med config json (`med_config=` or `med_config.json` beside the
    file). Attention heads are not in the weights. The vision encoder's come from `vision={"heads": n}`,
    else `vision_config` (a dict or a JSON/YAML file: `heads` or `num_attention_heads`, top level or under
    `vision_config`, or BLIP's `vit: base|large`), else the med config's `vision_config` section, else
    they are guessed as width // 64 (BLIP's ViT-B and ViT-L), with a warning naming the count; the text
    takes the med config's, else width // 64 too. [DEC]/[SEP]/[PAD] ids (`text.bos/sep/pad_token_id`) come
    from `tokenizer` (an object or a directory/name) or the tokenizer beside the file (its folder or a
    `tokenizer/` folder there), else bert-base-uncased + [DEC] + [ENC]'s defaults."""
    where = str(path)
    state = read_weights(path)
    layout = _layout(state, where)
    med = _read_med(path, med_config)
    dropped = [k for k in state if k.startswith(_DROP_SALESFORCE)]
    if dropped:
        log.info("%s: ignoring ITC queues %s (the loss owns them)", where, ", ".join(dropped))
    vis = sub(state, "visual_encoder.")
    text = bert_to_ours(sub(state, "text_encoder."), where)
    dec = bert_to_ours(sub(state, "text_decoder.bert."), where)
    bert_src = text or dec
    tcfg = _infer_bert(bert_src, med, where)
    cross = _cross_layers(bert_src, tcfg["depth"], where, "text_encoder" if text else "text_decoder")
    if text and dec:
        _check_decoder(dec, cross, tcfg, layout, where)
    # BLIP pretraining ties every decoder weight but self-attention to the text encoder; BLIP_VQA's answer
    # decoder is its own stack, reading the question states.
    share = layout == "pretrain" and all(
        torch.equal(v, text[k]) for k, v in dec.items() if ".self_attn." not in k and k in text)
    ours = _to_ours(state, vis, text, dec, share, where)
    vcfg = _vision_config(vis)
    if "heads" not in overrides.get("vision", {}):
        vcfg["heads"] = _vision_heads(vcfg["width"], vision_config, med, where)
    tcfg.update(_token_ids(path, tokenizer, tcfg["vocab_size"], where))
    data = {
        "vision": vcfg,
        "text": tcfg,
        "fusion": {"mode": "blip", "layers": len(cross)},
        "decoder": {"enabled": bool(dec), "share": share, "context": "question" if layout == "vqa" else "image"},
        "embed_dim": state["vision_proj.weight"].shape[0] if "vision_proj.weight" in state else 256,
        "momentum": "visual_encoder_m.cls_token" in state,
    }
    cfg = model_config_from_dict(deep_merge(data, overrides), where)
    model = VLPModel(cfg)
    # what the model that wrote the checkpoint does not have keeps its initialisation (logged)
    allow = {"captioning": ("text.", "itc.", "itm_head."), "vqa": ("itc.", "itm_head.")}.get(layout, ("itc.temp",))
    load_state_strict(model, ours, where, allow_missing=allow)
    return model


def _layout(state: dict, where: str) -> str:
    """Which BLIP model wrote `state` ("pretrain", "retrieval", "captioning", "vqa"), from its top-level modules."""
    tops = {k.split(".")[0] for k in state}
    unknown = sorted(tops - _KNOWN)
    heads = [h for h in _HEADS if h in tops]
    enc, dec = "text_encoder" in tops, "text_decoder" in tops
    layout = None
    if "visual_encoder" in tops and not unknown:
        if enc and len(heads) == len(_HEADS):
            layout = "pretrain" if dec else "retrieval"
        elif dec and not heads and not tops & {*_MOMENTUM, "temp"}:
            layout = "vqa" if enc else "captioning"
    if layout is None:
        extra = f" ({', '.join(unknown)} unknown)" if unknown else ""
        raise ConfigError(f"{where}: not a Salesforce BLIP checkpoint layout this loader knows: its top-level keys "
                          f"are {', '.join(sorted(tops))}{extra}; expected {_LAYOUTS}")
    return layout


def _cross_layers(bert: dict, depth: int, where: str, name: str) -> list[int]:
    cross = sorted({int(k.split(".")[1]) for k in bert if ".cross_attn." in k})
    if cross != list(range(depth - len(cross), depth)):
        raise ConfigError(f"{where}: cross-attention in {name} layers {cross}; expected the last K layers")
    return cross


def _check_decoder(dec: dict, cross: list[int], tcfg: dict, layout: str, where: str) -> None:
    """The decoder runs the text encoder's layer sequence (same depth, same cross-attention layers); BLIP_VQA's
    cross-attention reads the question states, so its keys/values take text-width input (its med config's
    `encoder_width`)."""
    depth = 1 + max(int(k.split(".")[1]) for k in dec if k.startswith("layers."))
    if depth != tcfg["depth"] or _cross_layers(dec, depth, where, "text_decoder") != cross:
        raise ConfigError(f"{where}: text_decoder has {depth} layers with cross-attention in "
                          f"{_cross_layers(dec, depth, where, 'text_decoder')}; the text encoder {tcfg['depth']} "
                          f"with {cross}: a decoder must run the encoder's layer sequence")
    key = f"layers.{cross[0]}.cross_attn.key.weight" if cross else None
    if layout == "vqa" and key and dec[key].shape[1] != tcfg["width"]:
        raise ConfigError(f"{where}: text_decoder.bert.encoder.layer.{cross[0]}.crossattention.self.key.weight reads "
                          f"{dec[key].shape[1]}-wide states; BLIP_VQA's answer decoder reads the question states, "
                          f"{tcfg['width']} wide (the text width)")


def _read_med(path: Path, med_config) -> dict:
    med_path = Path(med_config) if med_config else path.with_name("med_config.json")
    med = read_json(med_path) if med_path.is_file() else {}
    if med_config and not med_path.is_file():
        raise ConfigError(f"med config {med_path}: no such file")
    return med


def _read_vision_config(vision_config) -> dict:
    if vision_config is None or isinstance(vision_config, dict):
        return vision_config or {}
    path = Path(vision_config)
    if not path.is_file():
        raise ConfigError(f"vision config {path}: no such file")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict):
            raise ConfigError(f"vision config {path}: expected a mapping")
        return data
    return read_json(path)


def _vision_heads(width: int, vision_config, med: dict, where: str) -> int:
    """The ViT's attention heads: from a config when one says, else width // 64 with a warning."""
    for name, cfg in (("vision config", _read_vision_config(vision_config)),
                      ("med config", {"vision_config": med.get("vision_config") or {}})):
        for section in (cfg, cfg.get("vision_config") or {}):
            for key in ("heads", "num_attention_heads"):
                if section.get(key):
                    return int(section[key])
            vit = section.get("vit")
            if vit is not None:
                if vit not in _BLIP_VIT_HEADS:
                    raise ConfigError(f"{where}: {name} says vit: {vit!r}; BLIP's ViTs are {sorted(_BLIP_VIT_HEADS)}")
                return _BLIP_VIT_HEADS[vit]
    heads = max(1, width // 64)
    log.warning("%s: the checkpoint does not record the ViT's attention heads and no config says; assuming %d "
                "(width %d // 64, as BLIP's ViT-B/L). Pass vision_config= or vision={'heads': n} if it differs",
                where, heads, width)
    return heads


def _token_ids(path: Path, tokenizer, vocab: int, where: str) -> dict:
    """text.bos/sep/pad_token_id from the given tokenizer or the one beside the checkpoint ({} when none)."""
    source = tokenizer
    if source is None:
        source = next((d for d in (path.parent, path.parent / "tokenizer")
                       if any((d / f).is_file() for f in _TOKENIZER_FILES)), None)
        if source is None:
            return {}
    if isinstance(source, (str, Path)):
        from dlip_ds.data.text import load_tokenizer

        source = load_tokenizer(source)
    ids = {"bos_token_id": source.bos_token_id, "sep_token_id": source.sep_token_id,
           "pad_token_id": source.pad_token_id}
    ids = {k: int(v) for k, v in ids.items() if v is not None}
    if len(source) != vocab:
        log.warning("%s: the tokenizer has %d tokens, the checkpoint's vocabulary %d", where, len(source), vocab)
    outside = [f"{k}={v}" for k, v in ids.items() if not 0 <= v < vocab]
    if outside:
        raise ConfigError(f"{where}: the tokenizer's {', '.join(outside)} lie outside the checkpoint's vocabulary "
                          f"of {vocab}; not the tokenizer it was trained with")
    return ids


def _infer_bert(text: dict, med: dict, where: str) -> dict:
    width = text["embeddings.word_embeddings.weight"].shape[1]
    depth = 1 + max(int(k.split(".")[1]) for k in text if k.startswith("layers."))
    heads = med.get("num_attention_heads")
    if heads is None:
        heads = max(1, width // 64)
        log.warning("%s: no med config; assuming %d attention heads (head width 64, as BERT/BLIP)", where, heads)
    return {"vocab_size": text["embeddings.word_embeddings.weight"].shape[0], "width": width, "depth": depth,
            "heads": heads, "intermediate": text["layers.0.mlp.fc1.weight"].shape[0],
            "max_positions": text["embeddings.position_embeddings.weight"].shape[0],
            "layer_norm_eps": med.get("layer_norm_eps", 1e-12), "hidden_act": med.get("hidden_act", "gelu"),
            "pad_token_id": med.get("pad_token_id", 0)}


def _vision_config(vis: dict) -> dict:
    width = vis["cls_token"].shape[-1]
    patch = vis["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(vis["pos_embed"].shape[1] - 1)
    return {"image_size": grid * patch, "patch_size": patch, "width": width,
            "depth": 1 + max(int(k.split(".")[1]) for k in vis if k.startswith("blocks.")),
            "mlp_ratio": vis["blocks.0.mlp.fc1.weight"].shape[0] / width, "layer_norm_eps": 1e-6}


def _to_ours(state: dict, vis: dict, text: dict, dec: dict, share: bool, where: str) -> dict:
    """Our state dict: encoders, decoder (its self-attention only when shared), heads, momentum copies."""
    ours = {**prefixed(vis, "vision."), **prefixed(text, "text.")}
    if dec:
        if share:
            for key, value in dec.items():  # layers.N.self_attn.<rest>
                if ".self_attn." in key:
                    idx, rest = key.split(".")[1], key.split(".self_attn.")[1]
                    ours[f"decoder.self_attn.{idx}.{rest}"] = value
        else:
            ours.update(prefixed(dec, "decoder.stack."))
        ours.update(lm_head_from_bert(sub(state, "text_decoder.cls.predictions."),
                                      dec["embeddings.word_embeddings.weight"], where))
    for ours_name, theirs in _RENAMED:
        ours.update(prefixed(sub(state, theirs), ours_name))
    ours.update(prefixed(bert_to_ours(sub(state, "text_encoder_m."), where), "momentum.text."))
    if "temp" in state:
        ours["itc.temp"] = state["temp"].reshape(())
    return ours
