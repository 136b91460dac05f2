"""Student initialisation, per module: from the teacher's layers, a timm ViT (its state-dict names are
ours) or a transformers BERT directory."""

from __future__ import annotations

import logging
from pathlib import Path

from dlip_ds.config import ConfigError
from dlip_ds.models.dlip_format import CONFIG_NAME
from dlip_ds.models.keymaps import bert_to_ours, prefixed, sub
from dlip_ds.models.select import select_state
from dlip_ds.models.vit import resize_pos_embed
from dlip_ds.models.vlp import VLPModel
from dlip_ds.models.weights import (
    load_module_strict,
    read_hf_weights,
    read_json,
    read_weights,
)

log = logging.getLogger(__name__)


def pick_layers(n_src: int, n_dst: int) -> list[int]:
    """Every k-th source layer, ending at the last one: 12 -> 6 gives 1, 3, 5, 7, 9, 11."""
    if n_dst > n_src:
        raise ConfigError(f"cannot take {n_dst} layers from a source with {n_src}")
    return [(i + 1) * n_src // n_dst - 1 for i in range(n_dst)]


def _take_layers(state: dict, prefix: str, picks: list[int]) -> dict:
    """Keep `{prefix}.{picks[i]}.*` renumbered as `{prefix}.{i}.*`, and every key outside `prefix`."""
    out = {k: v for k, v in state.items() if not k.startswith(prefix + ".")}
    for i, j in enumerate(picks):
        out.update(prefixed(sub(state, f"{prefix}.{j}."), f"{prefix}.{i}."))
    return out


def init_student(student: VLPModel, init, teacher: VLPModel | None = None) -> None:
    """Initialise student modules in place, per module (`InitConfig`: the recipe's `student.init`):
    vision "random" | "teacher" | "timm:<model name or weights file>"; text "random" | "teacher" |
    "bert:<transformers BERT directory>". "teacher" takes every k-th teacher layer; a narrower student takes
    an evenly spaced subset of each tensor, whole heads where head sizes match (`models.select`)."""
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


def _not_wider(what: str, pairs: dict) -> None:
    bad = [f"{k}: student {s} vs teacher {t}" for k, (s, t) in pairs.items() if s > t]
    if bad:
        raise ConfigError(f"student.init.{what}=teacher: the student is larger ({'; '.join(bad)}); weight "
                          "selection takes a subset of the teacher's tensors, so every size must be at most the teacher's")


def _init_vision(student: VLPModel, spec: str, teacher: VLPModel | None) -> None:
    sv = student.cfg.vision
    if spec == "teacher":
        tv = _need_teacher(teacher, "vision").cfg.vision
        _same("vision", {"patch_size": (sv.patch_size, tv.patch_size)})
        _not_wider("vision", {"width": (sv.width, tv.width), "heads": (sv.heads, tv.heads),
                              "mlp width": (sv.width * sv.mlp_ratio, tv.width * tv.mlp_ratio)})
        state, where, heads = teacher.vision.state_dict(), "teacher vision encoder", (tv.heads, sv.heads)
    elif spec.startswith("timm:"):
        state, where, heads = _timm_state(spec[len("timm:"):]), spec, None
    else:
        raise ConfigError(f"student.init.vision='{spec}': expected random, teacher or timm:<name or file>")
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm.", "head_drop."))}
    depth = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("blocks.")), default=-1)
    state = _take_layers(state, "blocks", pick_layers(depth, sv.depth))
    if "pos_embed" in state:
        grid = sv.image_size // sv.patch_size
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], (grid, grid))
    if heads is not None:
        state = select_state(state, student.vision.state_dict(), heads)
    load_module_strict(student.vision, state, where)
    log.info("vision encoder initialised from %s", where)


def _timm_state(name: str) -> dict:
    path = Path(name).expanduser()
    if path.is_file():
        return read_weights(path)
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
        _same("text", {"vocab_size": (st.vocab_size, tt.vocab_size), "max_positions": (st.max_positions, tt.max_positions)})
        _not_wider("text", {"width": (st.width, tt.width), "heads": (st.heads, tt.heads),
                            "intermediate": (st.intermediate, tt.intermediate)})
        _inherit_text(student, teacher)
        return
    if not spec.startswith("bert:"):
        raise ConfigError(f"student.init.text='{spec}': expected random, teacher or bert:<directory>")
    path = Path(spec[len("bert:"):]).expanduser()
    if not (path / CONFIG_NAME).is_file():
        raise ConfigError(f"student.init.text={spec}: no {CONFIG_NAME} in {path} (a transformers BERT directory)")
    bert_cfg = read_json(path / CONFIG_NAME)
    _same("text", {"width": (st.width, bert_cfg.get("hidden_size")), "heads": (st.heads, bert_cfg.get("num_attention_heads")),
                   "intermediate": (st.intermediate, bert_cfg.get("intermediate_size"))})
    state = read_hf_weights(path)
    if any(k.startswith("bert.") for k in state):
        state = sub(state, "bert.")
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
    heads = (teacher.cfg.text.heads, student.cfg.text.heads)
    state = select_state(state, own, heads)  # drops teacher cross-attention where the student has none
    state.update({k: v for k, v in own.items() if k not in state})  # student cross-attention the teacher lacks
    load_module_strict(student.text, state, "teacher text encoder")
    s_dec, t_dec = student.cfg.decoder, teacher.cfg.decoder
    if s_dec.enabled and t_dec.enabled and s_dec.share and t_dec.share:
        n_t, n_s = teacher.module_info("decoder").depth, student.module_info("decoder").depth
        dec = _take_layers(prefixed(teacher.decoder.self_attn.state_dict(), "l."), "l", pick_layers(n_t, n_s))
        dec = select_state(sub(dec, "l."), student.decoder.self_attn.state_dict(), heads)
        load_module_strict(student.decoder.self_attn, dec, "teacher decoder self-attention")
        lm = select_state(teacher.lm_head.state_dict(), student.lm_head.state_dict())
        load_module_strict(student.lm_head, lm, "teacher LM head")
    log.info("text encoder initialised from teacher layers %s", picks)
