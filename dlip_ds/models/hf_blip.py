"""transformers BLIP directories (`BlipForImageTextRetrieval`, `BlipForConditionalGeneration`,
`BlipForQuestionAnswering`): import into a `VLPModel` and export from one."""

from __future__ import annotations

from pathlib import Path

from dlip_ds.config import ConfigError, ModelConfig, deep_merge, model_config_from_dict
from dlip_ds.models.dlip_format import CONFIG_NAME
from dlip_ds.models.keymaps import (
    bert_to_ours,
    hf_vit_to_ours,
    lm_head_from_bert,
    ours_to_bert,
    ours_to_hf_vit,
    prefixed,
    sub,
)
from dlip_ds.models.processor import tokenizer_ids, write_processor
from dlip_ds.models.vlp import VLPModel
from dlip_ds.models.vqa import decoder_stack_state, is_vqa
from dlip_ds.models.weights import load_state_strict, read_hf_weights


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


def load_hf_blip(path: Path, overrides: dict) -> VLPModel:
    """A transformers BLIP directory; the parts its architecture lacks keep their initialisation (logged)."""
    from transformers import BlipConfig

    hf = BlipConfig.from_pretrained(str(path))
    arch = (hf.architectures or ["?"])[0]
    state = read_hf_weights(path)
    vision = hf_vit_to_ours(sub(state, "vision_model."), str(path))
    where = f"{path / CONFIG_NAME}"
    if arch == "BlipForImageTextRetrieval":
        cfg = _config_from_hf(hf, overrides, {"enabled": False}, where)
        ours = {**prefixed(vision, "vision."),
                **prefixed(bert_to_ours(sub(state, "text_encoder."), str(path)), "text."),
                **prefixed(sub(state, "vision_proj."), "itc.vision_proj."),
                **prefixed(sub(state, "text_proj."), "itc.text_proj."),
                **prefixed(sub(state, "itm_head."), "itm_head.")}
        allow = ("itc.temp", "decoder.", "lm_head.")  # transformers keeps no temperature; a decoder was asked for
    elif arch == "BlipForConditionalGeneration":
        cfg = _config_from_hf(hf, overrides, {"enabled": True, "share": False}, where)
        ours = {**prefixed(vision, "vision."), **_decoder_from_hf(state, str(path))}
        allow = ("text.", "itc.", "itm_head.", "fusion.")  # a captioner has no text encoder or ITC/ITM heads
    elif arch == "BlipForQuestionAnswering":
        t = hf.text_config
        if t.encoder_hidden_size != t.hidden_size:  # one width serves both cross-attentions there (image, question)
            raise ConfigError(f"{where}: text_config.encoder_hidden_size={t.encoder_hidden_size} != hidden_size="
                              f"{t.hidden_size}: transformers' answer decoder reads the question states with "
                              "encoder_hidden_size-wide keys/values, so this model cannot run")
        cfg = _config_from_hf(hf, overrides, {"enabled": True, "share": False, "context": "question"}, where)
        ours = {**prefixed(vision, "vision."),
                **prefixed(bert_to_ours(sub(state, "text_encoder."), str(path)), "text."),
                **_decoder_from_hf(state, str(path))}
        allow = ("itc.", "itm_head.")  # BLIP_VQA has no ITC/ITM heads
    else:
        raise ConfigError(f"{where}: architecture '{arch}' is not supported "
                          "(BlipForImageTextRetrieval, BlipForConditionalGeneration or BlipForQuestionAnswering)")
    model = VLPModel(cfg)
    load_state_strict(model, ours, str(path), allow_missing=allow)
    return model


def _decoder_from_hf(state: dict, where: str) -> dict:
    """`text_decoder.bert.*` and `text_decoder.cls.*` -> our `decoder.stack.*` and `lm_head.*`."""
    return {**prefixed(bert_to_ours(sub(state, "text_decoder.bert."), where), "decoder.stack."),
            **lm_head_from_bert(sub(state, "text_decoder.cls.predictions."),
                                state.get("text_decoder.bert.embeddings.word_embeddings.weight"), where)}


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
    decoder); `"vqa"` -> BlipForQuestionAnswering (vision, question encoder, answer decoder: a model with
    decoder.context=question, see models/vqa.py `to_vqa_model`). transformers' BLIP has cross-attention in
    every text layer, so the topology must be BLIP's.
    """
    from safetensors.torch import save_file

    _check_exportable(model.cfg, task)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out = {f"vision_model.{k}": v for k, v in ours_to_hf_vit(sub(state, "vision.")).items()}
    if task == "retrieval":
        out.update(prefixed(ours_to_bert(sub(state, "text.")), "text_encoder."))
        out.update(prefixed(sub(state, "itc.vision_proj."), "vision_proj."))
        out.update(prefixed(sub(state, "itc.text_proj."), "text_proj."))
        out.update(prefixed(sub(state, "itm_head."), "itm_head."))
        arch = "BlipForImageTextRetrieval"
    else:
        if task == "vqa":
            out.update(prefixed(ours_to_bert(sub(state, "text.")), "text_encoder."))
        out.update(prefixed(ours_to_bert(decoder_stack_state(model, state)), "text_decoder.bert."))
        out.update({"text_decoder.cls.predictions.transform.dense.weight": state["lm_head.dense.weight"],
                    "text_decoder.cls.predictions.transform.dense.bias": state["lm_head.dense.bias"],
                    "text_decoder.cls.predictions.transform.LayerNorm.weight": state["lm_head.norm.weight"],
                    "text_decoder.cls.predictions.transform.LayerNorm.bias": state["lm_head.norm.bias"],
                    "text_decoder.cls.predictions.bias": state["lm_head.bias"]})
        arch = "BlipForQuestionAnswering" if task == "vqa" else "BlipForConditionalGeneration"
    if tokenizer is not None:
        tokenizer_ids(model.cfg, tokenizer)  # a tokenizer that does not fit is refused before anything is written
    dst = Path(out_dir)
    dst.mkdir(parents=True, exist_ok=True)
    _hf_config(model, arch).save_pretrained(str(dst))
    save_file({k: v.contiguous() for k, v in out.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    write_processor(model.cfg, dst, tokenizer, task)  # BlipProcessor (tokenizer included), or the image processor
    return dst


def _check_exportable(c: ModelConfig, task: str) -> None:
    """A ConfigError listing every reason `c` has no transformers BLIP equivalent for `task`."""
    problems = []
    if c.fusion.mode != "blip":
        problems.append(f"fusion.mode='{c.fusion.mode}' (transformers BLIP fuses inside the text layers: 'blip')")
    elif c.fusion.layers != c.text.depth:
        problems.append(f"fusion.layers={c.fusion.layers} < text.depth={c.text.depth} "
                        "(transformers BLIP has cross-attention in every text layer)")
    if task == "captioning" and not c.decoder.enabled:
        problems.append("decoder.enabled=false (a captioning export needs the decoder)")
    if task == "captioning" and is_vqa(c):
        problems.append("decoder.context='question' (this decoder answers questions: export it with task='vqa')")
    if task == "vqa" and not is_vqa(c):
        problems.append("no answer decoder (decoder.context must be 'question'; convert a pretrained or captioning "
                        "model with dlip_ds.models.vqa.to_vqa_model and fine-tune it)")
    if task == "vqa" and c.vision.width != c.text.width:
        problems.append(f"vision.width={c.vision.width} != text.width={c.text.width} (transformers' BLIP config has "
                        "one encoder_hidden_size for the question encoder's cross-attention to the image and the "
                        "answer decoder's to the question)")
    if task not in ("retrieval", "captioning", "vqa"):
        problems.append(f"task='{task}' (retrieval, captioning or vqa)")
    if (v := c.vision.width * c.vision.mlp_ratio) != int(v):
        problems.append(f"vision.width * vision.mlp_ratio = {v} is not an integer")
    if problems:
        raise ConfigError("cannot export as transformers BLIP: " + "; ".join(problems))

