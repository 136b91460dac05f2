"""Checkpoints in and out: presets, our exported directories, transformers BLIP, Salesforce BLIP `.pth`,
timm ViT and transformers BERT (student initialisation).

Weights are read with safetensors or `torch.load(weights_only=True)`; nothing is unpickled. Every load is
strict: a key that does not fit fails with the list of missing and unexpected keys.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from dlip_ds.config import (
    ConfigError,
    deep_merge,
    model_config_from_dict,
    to_dict,
)
from dlip_ds.models.presets import PRESETS, preset_dict
from dlip_ds.models.vit import resize_pos_embed
from dlip_ds.models.vlp import VLPModel

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "dlip_ds"


# --------------------------------------------------------------------------- strict loading


def _show(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _check_fit(own: dict, state: dict, missing: set, source: str) -> None:
    unexpected = set(state) - set(own)
    bad_shape = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in set(own) & set(state) if state[k].shape != own[k].shape]
    if missing or unexpected or bad_shape:
        parts = [f"{source}: the checkpoint does not fit the model"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_show(unexpected)}")
        if bad_shape:
            parts.append(f"shape mismatches ({len(bad_shape)}): {_show(bad_shape)}")
        raise ConfigError("\n  ".join(parts))


def load_module_strict(module: torch.nn.Module, state: dict, source: str) -> None:
    own = module.state_dict()
    _check_fit(own, state, set(own) - set(state), source)
    module.load_state_dict(state)


def load_state_strict(model: VLPModel, state: dict, source: str, allow_missing: tuple[str, ...] = ()) -> None:
    """Load `state` into `model`; missing or unexpected keys or shapes are a ConfigError naming them.

    Allowed gaps: momentum copies absent from the checkpoint are copied from the online weights, those of
    a model built without momentum are dropped (logged), and position embeddings of another grid are resized.
    """
    own = model.state_dict()
    state = dict(state)
    if not model.cfg.momentum:
        dropped = [k for k in state if k.startswith("momentum.")]
        if dropped:
            log.info("%s: dropping %d momentum-encoder tensors (the model has momentum=false)", source, len(dropped))
            for k in dropped:
                del state[k]
    for key in [k for k in state if k.endswith("pos_embed") and k in own]:
        if state[key].shape != own[key].shape:
            grid = model.cfg.vision.image_size // model.cfg.vision.patch_size
            state[key] = resize_pos_embed(state[key], (grid, grid))
    missing = set(own) - set(state)
    kept = {k for k in missing if k.startswith(allow_missing)} if allow_missing else set()
    if kept:
        log.warning("%s: no weights for %s; they keep their initialisation", source,
                    _show({k.rsplit(".", 2)[0] if k.count(".") > 2 else k for k in kept}, 6))
        missing -= kept
    fill_momentum = bool(model.cfg.momentum and missing and all(k.startswith("momentum.") for k in missing))
    if fill_momentum:
        missing = set()
    _check_fit(own, state, missing, source)
    model.load_state_dict(state, strict=not (fill_momentum or kept))
    if fill_momentum:
        model.reset_momentum()


# --------------------------------------------------------------------------- our format


def save_model(model: VLPModel, out_dir: str | Path, tokenizer=None) -> Path:
    """Write `config.json` + `model.safetensors` (+ tokenizer files) that `load_model` reads back."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(json.dumps({"format": FORMAT, "model": to_dict(model.cfg)}, indent=2))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": FORMAT})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def _load_ours(path: Path, overrides: dict) -> VLPModel:
    from safetensors.torch import load_file

    meta = _read_json(path / CONFIG_NAME)
    cfg = model_config_from_dict(deep_merge(meta["model"], overrides), f"{path / CONFIG_NAME}:model")
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise ConfigError(f"{path}: {WEIGHTS_NAME} is missing")
    model = VLPModel(cfg)
    load_state_strict(model, load_file(str(weights)), str(weights))
    return model


# --------------------------------------------------------------------------- front door


def load_model(source: str | Path, **overrides) -> VLPModel:
    """A `VLPModel` from a preset name (random init), a directory written by `save_model`/`dlip-ds export`,
    a transformers BLIP directory, or a Salesforce BLIP `.pth` (its med config json beside it or given
    with `med_config=`). `overrides` are ModelConfig fields (nested dicts for sections), e.g.
    `load_model("blip-base", momentum=True, vision={"image_size": 384})`. Returned in eval mode.
    """
    med_config = overrides.pop("med_config", None)
    src = str(source)
    path = Path(src).expanduser()
    if med_config is not None and not (path.is_file() and path.suffix in (".pth", ".pt", ".bin")):
        raise ConfigError(f"med_config is for Salesforce BLIP .pth files, not for {src}")
    if src in PRESETS:
        model = VLPModel(model_config_from_dict(deep_merge(preset_dict(src), overrides), f"preset '{src}'"))
    elif path.is_dir() and (path / CONFIG_NAME).is_file():
        meta = _read_json(path / CONFIG_NAME)
        if meta.get("format") == FORMAT:
            model = _load_ours(path, overrides)
        elif meta.get("model_type") == "blip" or "text_config" in meta:
            model = _load_hf_blip(path, overrides)
        else:
            raise ConfigError(f"{path / CONFIG_NAME}: neither a dlip_ds export nor a transformers BLIP config")
    elif path.is_file() and path.suffix in (".pth", ".pt", ".bin"):
        model = _load_salesforce_blip(path, med_config, overrides)
    elif path.exists():
        raise ConfigError(f"model source {src}: expected a directory with {CONFIG_NAME} or a .pth file")
    else:
        raise ConfigError(f"model source '{src}': not a preset ({', '.join(PRESETS)}) and no such file or directory")
    return model.eval()




# --------------------------------------------------------------------------- key tables

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
_DROP_SALESFORCE = ("image_queue", "text_queue", "queue_ptr", "idx_queue", "ptr_queue")


def _sub(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _prefixed(state: dict, prefix: str) -> dict:
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


def _read_weights(path: Path) -> dict:
    """A state dict from safetensors or a weights-only torch file (nested `{"model": ...}` unwrapped)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling refusal is the user's file, not our bug
        raise ConfigError(f"{path}: cannot read it as a weights-only torch checkpoint ({e})") from None
    for key in ("model", "state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def _read_hf_weights(path: Path) -> dict:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return _read_weights(path / name)
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / name).is_file():
            shards = sorted(set(_read_json(path / name)["weight_map"].values()))
            state: dict = {}
            for shard in shards:
                state.update(_read_weights(path / shard))
            return state
    raise ConfigError(f"{path}: no model.safetensors or pytorch_model.bin")


# --------------------------------------------------------------------------- transformers BLIP


def _config_from_hf(hf, overrides: dict, decoder: dict, where: str):
    v, t = hf.vision_config, hf.text_config
    image_size = v.image_size if isinstance(v.image_size, int) else v.image_size[0]
    patch_size = v.patch_size if isinstance(v.patch_size, int) else v.patch_size[0]
    data = {
        "vision": {"image_size": image_size, "patch_size": patch_size, "width": v.hidden_size,
                   "depth": v.num_hidden_layers, "heads": v.num_attention_heads,
                   "mlp_ratio": v.intermediate_size / v.hidden_size, "layer_norm_eps": v.layer_norm_eps,
                   "hidden_act": v.hidden_act},
        "text": {"vocab_size": t.vocab_size, "width": t.hidden_size, "depth": t.num_hidden_layers,
                 "heads": t.num_attention_heads, "intermediate": t.intermediate_size,
                 "max_positions": t.max_position_embeddings, "layer_norm_eps": t.layer_norm_eps,
                 "hidden_act": t.hidden_act, "pad_token_id": t.pad_token_id, "bos_token_id": t.bos_token_id,
                 "sep_token_id": t.sep_token_id},
        "fusion": {"mode": "blip", "layers": t.num_hidden_layers},
        "decoder": decoder,
        "embed_dim": hf.image_text_hidden_size,
    }
    return model_config_from_dict(deep_merge(data, overrides), where)


def _load_hf_blip(path: Path, overrides: dict) -> VLPModel:
    from transformers import BlipConfig

    hf = BlipConfig.from_pretrained(str(path))
    arch = (hf.architectures or ["?"])[0]
    state = _read_hf_weights(path)
    vision = hf_vit_to_ours(_sub(state, "vision_model."), str(path))
    where = f"{path / CONFIG_NAME}"
    if arch == "BlipForImageTextRetrieval":
        cfg = _config_from_hf(hf, overrides, {"enabled": False}, where)
        ours = {**_prefixed(vision, "vision."),
                **_prefixed(bert_to_ours(_sub(state, "text_encoder."), str(path)), "text."),
                **_prefixed(_sub(state, "vision_proj."), "itc.vision_proj."),
                **_prefixed(_sub(state, "text_proj."), "itc.text_proj."),
                **_prefixed(_sub(state, "itm_head."), "itm_head.")}
        allow = ("itc.temp", "decoder.", "lm_head.")  # transformers keeps no temperature; a decoder was asked for
    elif arch == "BlipForConditionalGeneration":
        cfg = _config_from_hf(hf, overrides, {"enabled": True, "share": False}, where)
        ours = {**_prefixed(vision, "vision."),
                **_prefixed(bert_to_ours(_sub(state, "text_decoder.bert."), str(path)), "decoder.stack."),
                **_lm_head_from_bert(_sub(state, "text_decoder.cls.predictions."),
                                     state.get("text_decoder.bert.embeddings.word_embeddings.weight"), str(path))}
        allow = ("text.", "itc.", "itm_head.", "fusion.")  # a captioner has no text encoder or ITC/ITM heads
    else:
        raise ConfigError(f"{where}: architecture '{arch}' is not supported "
                          "(BlipForImageTextRetrieval or BlipForConditionalGeneration)")
    model = VLPModel(cfg)
    load_state_strict(model, ours, str(path), allow_missing=allow)
    return model


def _lm_head_from_bert(pred: dict, words: torch.Tensor, where: str) -> dict:
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


def _hf_config(model: VLPModel, arch: str):
    from transformers import BlipConfig

    c = model.cfg
    v, t = c.vision, c.text
    return BlipConfig(
        architectures=[arch],
        vision_config={"hidden_size": v.width, "intermediate_size": int(v.width * v.mlp_ratio),
                       "num_hidden_layers": v.depth, "num_attention_heads": v.heads, "image_size": v.image_size,
                       "patch_size": v.patch_size, "hidden_act": v.hidden_act, "layer_norm_eps": v.layer_norm_eps},
        text_config={"vocab_size": t.vocab_size, "hidden_size": t.width, "encoder_hidden_size": v.width,
                     "intermediate_size": t.intermediate, "num_hidden_layers": t.depth,
                     "num_attention_heads": t.heads, "max_position_embeddings": t.max_positions,
                     "hidden_act": t.hidden_act, "layer_norm_eps": t.layer_norm_eps,
                     "pad_token_id": t.pad_token_id, "bos_token_id": t.bos_token_id,
                     "sep_token_id": t.sep_token_id},
        image_text_hidden_size=c.embed_dim,
    )


def export_hf_blip(model: VLPModel, out_dir: str | Path, tokenizer=None, task: str = "retrieval") -> Path:
    """Write a transformers BLIP directory: `task="retrieval"` -> BlipForImageTextRetrieval (vision, text
    encoder with cross-attention, ITC/ITM heads); `"captioning"` -> BlipForConditionalGeneration (vision,
    decoder). transformers' BLIP has cross-attention in every text layer, so the topology must be BLIP's.
    """
    from safetensors.torch import save_file

    c = model.cfg
    problems = []
    if c.fusion.mode != "blip":
        problems.append(f"fusion.mode='{c.fusion.mode}' (transformers BLIP fuses inside the text layers: 'blip')")
    elif c.fusion.layers != c.text.depth:
        problems.append(f"fusion.layers={c.fusion.layers} < text.depth={c.text.depth} "
                        "(transformers BLIP has cross-attention in every text layer)")
    if task == "captioning" and not c.decoder.enabled:
        problems.append("decoder.enabled=false (a captioning export needs the decoder)")
    if task not in ("retrieval", "captioning"):
        problems.append(f"task='{task}' (retrieval or captioning)")
    if (v := c.vision.width * c.vision.mlp_ratio) != int(v):
        problems.append(f"vision.width * vision.mlp_ratio = {v} is not an integer")
    if problems:
        raise ConfigError("cannot export as transformers BLIP: " + "; ".join(problems))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out = {f"vision_model.{k}": v for k, v in ours_to_hf_vit(_sub(state, "vision.")).items()}
    if task == "retrieval":
        out.update(_prefixed(ours_to_bert(_sub(state, "text.")), "text_encoder."))
        out.update(_prefixed(_sub(state, "itc.vision_proj."), "vision_proj."))
        out.update(_prefixed(_sub(state, "itc.text_proj."), "text_proj."))
        out.update(_prefixed(_sub(state, "itm_head."), "itm_head."))
        arch = "BlipForImageTextRetrieval"
    else:
        out.update(_prefixed(ours_to_bert(_decoder_stack_state(model, state)), "text_decoder.bert."))
        out.update({"text_decoder.cls.predictions.transform.dense.weight": state["lm_head.dense.weight"],
                    "text_decoder.cls.predictions.transform.dense.bias": state["lm_head.dense.bias"],
                    "text_decoder.cls.predictions.transform.LayerNorm.weight": state["lm_head.norm.weight"],
                    "text_decoder.cls.predictions.transform.LayerNorm.bias": state["lm_head.norm.bias"],
                    "text_decoder.cls.predictions.bias": state["lm_head.bias"]})
        arch = "BlipForConditionalGeneration"
    dst = Path(out_dir)
    dst.mkdir(parents=True, exist_ok=True)
    _hf_config(model, arch).save_pretrained(str(dst))
    save_file({k: v.contiguous() for k, v in out.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(dst))
    return dst


def _decoder_stack_state(model: VLPModel, state: dict) -> dict:
    """The decoder as one standalone stack (TextEncoder names), resolving weights shared with the text encoder."""
    if not model.cfg.decoder.share:
        return _sub(state, "decoder.stack.")
    stack = {k: v for k, v in _sub(state, "text.").items() if ".self_attn." not in k}
    for key, value in _sub(state, "decoder.self_attn.").items():
        idx, _, rest = key.partition(".")
        stack[f"layers.{idx}.self_attn.{rest}"] = value
    return stack


# --------------------------------------------------------------------------- Salesforce BLIP .pth


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


def _load_salesforce_blip(path: Path, med_config, overrides: dict) -> VLPModel:
    """Salesforce BLIP checkpoints (models/blip_pretrain.py, blip_retrieval.py, blip.py decoder): the
    topology (decoder shared or not, momentum copies) is read from the keys, sizes from the shapes and
    the med config json (`med_config=` or `med_config.json` beside the file). Attention heads are not in
    the weights: the vision encoder gets width // 64 (BLIP's ViT-B and ViT-L), unless overridden
    (`vision={"heads": n}`); the text takes the med config's, else width // 64 too."""
    where = str(path)
    state = _read_weights(path)
    med_path = Path(med_config) if med_config else path.with_name("med_config.json")
    med = _read_json(med_path) if med_path.is_file() else {}
    if med_config and not med_path.is_file():
        raise ConfigError(f"med config {med_path}: no such file")
    dropped = [k for k in state if k.startswith(_DROP_SALESFORCE)]
    if dropped:
        log.info("%s: ignoring ITC queues %s (the loss owns them)", where, ", ".join(dropped))
    vis = _sub(state, "visual_encoder.")
    if not vis:
        raise ConfigError(f"{where}: no 'visual_encoder.*' keys; not a Salesforce BLIP checkpoint")
    text = bert_to_ours(_sub(state, "text_encoder."), where)
    dec = bert_to_ours(_sub(state, "text_decoder.bert."), where)
    ours = {**_prefixed(vis, "vision."), **_prefixed(text, "text.")}
    if not text and not dec:
        raise ConfigError(f"{where}: neither 'text_encoder.*' nor 'text_decoder.*' keys")
    bert_src = text or dec
    tcfg = _infer_bert(bert_src, med, where)
    cross = sorted({int(k.split(".")[1]) for k in bert_src if ".cross_attn." in k})
    if cross != list(range(tcfg["depth"] - len(cross), tcfg["depth"])):
        raise ConfigError(f"{where}: cross-attention in text layers {cross}; expected the last K layers")
    # BLIP pretraining ties every decoder weight but self-attention to the text encoder.
    share = bool(text and dec) and all(
        torch.equal(v, text[k]) for k, v in dec.items() if ".self_attn." not in k and k in text)
    if dec:
        if share:
            for key, value in dec.items():  # layers.N.self_attn.<rest>
                if ".self_attn." in key:
                    idx, rest = key.split(".")[1], key.split(".self_attn.")[1]
                    ours[f"decoder.self_attn.{idx}.{rest}"] = value
        else:
            ours.update(_prefixed(dec, "decoder.stack."))
        ours.update(_lm_head_from_bert(_sub(state, "text_decoder.cls.predictions."),
                                       dec["embeddings.word_embeddings.weight"], where))
    for ours_name, theirs in (("itc.vision_proj.", "vision_proj."), ("itc.text_proj.", "text_proj."),
                              ("itm_head.", "itm_head."), ("momentum.vision.", "visual_encoder_m."),
                              ("momentum.vision_proj.", "vision_proj_m."), ("momentum.text_proj.", "text_proj_m.")):
        ours.update(_prefixed(_sub(state, theirs), ours_name))
    ours.update(_prefixed(bert_to_ours(_sub(state, "text_encoder_m."), where), "momentum.text."))
    if "temp" in state:
        ours["itc.temp"] = state["temp"].reshape(())
    width = vis["cls_token"].shape[-1]
    patch = vis["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(vis["pos_embed"].shape[1] - 1)
    data = {
        "vision": {"image_size": grid * patch, "patch_size": patch, "width": width, "heads": max(1, width // 64),
                   "depth": 1 + max(int(k.split(".")[1]) for k in vis if k.startswith("blocks.")),
                   "mlp_ratio": vis["blocks.0.mlp.fc1.weight"].shape[0] / width, "layer_norm_eps": 1e-6},
        "text": tcfg,
        "fusion": {"mode": "blip", "layers": len(cross)},
        "decoder": {"enabled": bool(dec), "share": share},
        "embed_dim": state["vision_proj.weight"].shape[0] if "vision_proj.weight" in state else 256,
        "momentum": "visual_encoder_m.cls_token" in state,
    }
    cfg = model_config_from_dict(deep_merge(data, overrides), where)
    model = VLPModel(cfg)
    allow = ("text.", "itc.", "itm_head.") if not text else ("itc.temp",)
    load_state_strict(model, ours, where, allow_missing=allow)
    return model


# --------------------------------------------------------------------------- student initialisation


def pick_layers(n_src: int, n_dst: int) -> list[int]:
    """Every k-th source layer, ending at the last one: 12 -> 6 gives 1, 3, 5, 7, 9, 11."""
    if n_dst > n_src:
        raise ConfigError(f"cannot take {n_dst} layers from a source with {n_src}")
    return [(i + 1) * n_src // n_dst - 1 for i in range(n_dst)]


def _take_layers(state: dict, prefix: str, picks: list[int]) -> dict:
    """Keep `{prefix}.{picks[i]}.*` renumbered as `{prefix}.{i}.*`, and every key outside `prefix`."""
    out = {k: v for k, v in state.items() if not k.startswith(prefix + ".")}
    for i, j in enumerate(picks):
        out.update(_prefixed(_sub(state, f"{prefix}.{j}."), f"{prefix}.{i}."))
    return out


def init_student(student: VLPModel, init, teacher: VLPModel | None = None) -> None:
    """Initialise student modules in place, per module (`InitConfig`: the recipe's `student.init`):
    vision "random" | "teacher" | "timm:<model name or weights file>"; text "random" | "teacher" |
    "bert:<transformers BERT directory>". "teacher" takes every k-th teacher layer and needs equal widths."""
    if init.vision != "random":
        _init_vision(student, init.vision, teacher)
    if init.text != "random":
        _init_text(student, init.text, teacher)
    if student.cfg.momentum:
        student.reset_momentum()


def _need_teacher(teacher, what: str) -> VLPModel:
    if teacher is None:
        raise ConfigError(f"student.init.{what}=teacher needs a teacher (teacher.source)")
    return teacher


def _same(what: str, pairs: dict) -> None:
    bad = [f"{k}: student {s} vs source {t}" for k, (s, t) in pairs.items() if s != t]
    if bad:
        raise ConfigError(f"student.init.{what}: sizes differ ({'; '.join(bad)}); use random or a matching source")


def _init_vision(student: VLPModel, spec: str, teacher: VLPModel | None) -> None:
    sv = student.cfg.vision
    if spec == "teacher":
        tv = _need_teacher(teacher, "vision").cfg.vision
        _same("vision", {"width": (sv.width, tv.width), "heads": (sv.heads, tv.heads),
                         "mlp_ratio": (sv.mlp_ratio, tv.mlp_ratio), "patch_size": (sv.patch_size, tv.patch_size)})
        state, where = teacher.vision.state_dict(), "teacher vision encoder"
    elif spec.startswith("timm:"):
        state, where = _timm_state(spec[len("timm:"):]), spec
    else:
        raise ConfigError(f"student.init.vision='{spec}': expected random, teacher or timm:<name or file>")
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm.", "head_drop."))}
    depth = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("blocks.")), default=-1)
    state = _take_layers(state, "blocks", pick_layers(depth, sv.depth))
    if "pos_embed" in state:
        grid = sv.image_size // sv.patch_size
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], (grid, grid))
    load_module_strict(student.vision, state, where)
    log.info("vision encoder initialised from %s", where)


def _timm_state(name: str) -> dict:
    path = Path(name).expanduser()
    if path.is_file():
        return _read_weights(path)
    import timm

    try:
        model = timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as e:  # noqa: BLE001 - unknown name, no network, ...: the user's input
        raise ConfigError(f"student.init.vision=timm:{name}: not a file, and timm cannot load it ({e})") from None
    return model.state_dict()


def _init_text(student: VLPModel, spec: str, teacher: VLPModel | None) -> None:
    st = student.cfg.text
    if spec == "teacher":
        teacher = _need_teacher(teacher, "text")
        tt = teacher.cfg.text
        _same("text", {"width": (st.width, tt.width), "heads": (st.heads, tt.heads),
                       "intermediate": (st.intermediate, tt.intermediate), "vocab_size": (st.vocab_size, tt.vocab_size)})
        _inherit_text(student, teacher)
        return
    if not spec.startswith("bert:"):
        raise ConfigError(f"student.init.text='{spec}': expected random, teacher or bert:<directory>")
    path = Path(spec[len("bert:"):]).expanduser()
    if not (path / CONFIG_NAME).is_file():
        raise ConfigError(f"student.init.text={spec}: no {CONFIG_NAME} in {path} (a transformers BERT directory)")
    bert_cfg = _read_json(path / CONFIG_NAME)
    _same("text", {"width": (st.width, bert_cfg.get("hidden_size")), "heads": (st.heads, bert_cfg.get("num_attention_heads")),
                   "intermediate": (st.intermediate, bert_cfg.get("intermediate_size"))})
    state = _read_hf_weights(path)
    if any(k.startswith("bert.") for k in state):
        state = _sub(state, "bert.")
    state = {k: v for k, v in state.items() if not k.startswith(("cls.", "pooler."))}
    # BLIP's text has no token types: fold type 0 into the position embeddings (the sum BERT computes).
    types = state.pop("embeddings.token_type_embeddings.weight", None)
    ours = bert_to_ours(state, str(path))
    pos = ours["embeddings.position_embeddings.weight"][: st.max_positions]
    ours["embeddings.position_embeddings.weight"] = pos + (types[0] if types is not None else 0)
    # Copy the shared vocabulary rows; BLIP's extra tokens ([DEC], [ENC]) keep their initialisation.
    words = student.text.embeddings.word_embeddings.weight.detach().clone()
    src = ours["embeddings.word_embeddings.weight"]
    n = min(len(words), len(src))
    words[:n] = src[:n]
    ours["embeddings.word_embeddings.weight"] = words
    depth = 1 + max(int(k.split(".")[1]) for k in ours if k.startswith("layers."))
    ours = _take_layers(ours, "layers", pick_layers(depth, st.depth))
    own = student.text.state_dict()
    ours.update({k: v for k, v in own.items() if ".cross_attn." in k})  # BERT has no cross-attention
    load_module_strict(student.text, ours, str(path))
    log.info("text encoder initialised from %s (%d of its %d layers, vocabulary rows 0..%d)", path, st.depth,
             depth, n - 1)


def _inherit_text(student: VLPModel, teacher: VLPModel) -> None:
    """Every k-th teacher text layer (self-attention, feed-forward, cross-attention where both layers have
    it), the embeddings, and with shared decoders their self-attention and the LM head transform."""
    picks = pick_layers(teacher.cfg.text.depth, student.cfg.text.depth)
    state = _take_layers(teacher.text.state_dict(), "layers", picks)
    own = student.text.state_dict()
    state = {k: v for k, v in state.items() if k in own}  # teacher cross-attention where the student has none
    state.update({k: v for k, v in own.items() if k not in state})  # student cross-attention the teacher lacks
    load_module_strict(student.text, state, "teacher text encoder")
    s_dec, t_dec = student.cfg.decoder, teacher.cfg.decoder
    if s_dec.enabled and t_dec.enabled and s_dec.share and t_dec.share:
        n_t, n_s = teacher.module_info("decoder").depth, student.module_info("decoder").depth
        dec = _take_layers(_prefixed(teacher.decoder.self_attn.state_dict(), "l."), "l", pick_layers(n_t, n_s))
        load_module_strict(student.decoder.self_attn, _sub(dec, "l."), "teacher decoder self-attention")
        load_module_strict(student.lm_head, teacher.lm_head.state_dict(), "teacher LM head")
    log.info("text encoder initialised from teacher layers %s", picks)
