"""Dataclass configs and the rules that read them from plain dicts.

A recipe (`dlip_ds.recipe` reads the YAML and the dotted overrides) has the sections of `Recipe`.
Every key is checked when a dict becomes a config: an unknown key fails with a did-you-mean, a
wrong type or a value outside a `Literal` enumeration fails with the dotted path of the field.
Checks that need only the config live here; checks that need the models live in the task and the
KD plan.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the field."""


# --------------------------------------------------------------------------- enumerations
# One Literal per enumeration: `_coerce` checks values against it, and the tuple beside it is what
# code iterates over.

Module = Literal["vision", "text", "fusion", "decoder"]
LogitOutput = Literal["itc", "itm", "lm"]
KDKind = Literal["repr", "attn", "logit"]
AttnKind = Literal["self", "cross"]
MODULES: tuple[str, ...] = typing.get_args(Module)
LOGITS: tuple[str, ...] = typing.get_args(LogitOutput)
KD_KINDS: tuple[str, ...] = typing.get_args(KDKind)
ATTN_KINDS: tuple[str, ...] = typing.get_args(AttnKind)
CROSS_MODULES = ("fusion", "decoder")  # the modules whose layers carry cross-attention


# --------------------------------------------------------------------------- model


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"  # gelu | gelu_new | gelu_pytorch_tanh | relu | silu
    drop_path: float = 0.0
    # CLIP/BLIP normalisation; images are normalised with these by the data pipeline.
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class TextConfig:
    vocab_size: int = 30524  # bert-base-uncased + [DEC] + [ENC]
    width: int = 768
    depth: int = 12
    heads: int = 12
    intermediate: int = 3072
    max_positions: int = 512
    layer_norm_eps: float = 1e-12
    dropout: float = 0.0
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    bos_token_id: int = 30522  # [DEC]: first decoder token (generation without a tokenizer)
    sep_token_id: int = 102  # [SEP]: ends a generated caption


@dataclass
class FusionConfig:
    # "blip": cross-attention inside the last `layers` text layers (layers == text depth is BLIP).
    # "albef": `layers` extra cross-attention layers stacked after the text encoder.
    mode: Literal["blip", "albef"] = "blip"
    layers: int = 12


@dataclass
class DecoderConfig:
    enabled: bool = True
    # BLIP pretraining: the decoder shares every weight with the text encoder but self-attention.
    share: bool = True
    # What the decoder's cross-attention reads: "image" (captioning, pretraining) or "question" (BLIP_VQA's
    # answer decoder: a separate stack, share=false, attending to the question states of `fuse`).
    context: Literal["image", "question"] = "image"


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    embed_dim: int = 256
    temp: float = 0.07
    momentum: bool = False
    momentum_coef: float = 0.995
    queue_size: int = 57600


# --------------------------------------------------------------------------- recipe sections


@dataclass
class InitConfig:
    """Where each student module starts: "random", "teacher" (every k-th teacher layer when
    widths match), "timm:<name or file>" (vision) or "bert:<dir>" (text)."""

    vision: str = "random"
    text: str = "random"


@dataclass
class StudentConfig:
    preset: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    init: InitConfig = field(default_factory=InitConfig)
    # A trained model (anything `load_model` takes, or a training run directory) whose weights and
    # architecture the student starts from: fine-tuning a distilled pretraining student on a task. The
    # task adapts its topology (VQA: the answer decoder from the captioning decoder); model fields given
    # beside it override the source's (`overrides`, kept as written, e.g. {"momentum": True}).
    source: str = ""
    overrides: dict = field(default_factory=dict)


@dataclass
class TeacherConfig:
    source: str = ""  # anything dlip_ds.load_model takes; empty = pretraining without a teacher
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"  # auto: fp16 on CUDA; on CPU bf16 if native, else fp32
    tp_size: int = 1


@dataclass
class DataConfig:
    train_shards: Any = ""  # brace pattern, list of sources, or a directory of shards
    eval_shards: Any = ""
    weights: list[float] | None = None  # mixing weights when train_shards lists several sources
    tokenizer: str = ""  # a path or hub name; empty = the tokenizer `dlip-ds synth` wrote beside the shards
    batch_size: int = 32  # per rank, per micro step
    workers: int = 2
    shuffle_buffer: int = 1000
    max_words: int = 30
    max_length: int = 35
    prompt: str = "a picture of "
    randaugment: bool = True
    min_scale: float = 0.5
    # where JPEGs are decoded, cropped and normalised: "cpu" (the dataloader workers), "gpu" (the workers
    # send the JPEGs; nvJPEG and the crops run on the GPU, without RandAugment), "auto" (gpu when it can)
    decode: Literal["cpu", "gpu", "auto"] = "cpu"


@dataclass
class KDTerm:
    kind: KDKind = "repr"
    module: Module | LogitOutput = "fusion"  # a module for repr/attn, a logit output for logit
    attn: AttnKind = "self"  # attn only
    layers: Any = "uniform"  # "uniform" | "last-k" | [[student, teacher], ...]
    k: int = 1  # for last-k
    weight: float = 1.0
    relation_heads: int | None = None
    temperature: float = 1.0


@dataclass
class LossConfig:
    itc: float = 1.0
    itm: float = 1.0
    lm: float = 1.0
    label_smoothing: float = 0.1
    itc_soft_targets: Literal["none", "momentum", "teacher"] = "none"
    itc_same_image: bool = False  # ITC targets: captions of one image (image_ids) all positive; false = one-hot
    alpha: float = 0.4
    # ramp alpha linearly from 0 over this many optimizer steps (BLIP ramps it over its first two epochs,
    # while the momentum model is young); 0 = the full alpha from the first step
    alpha_warmup_steps: int = 0
    # a run without a teacher draws them from the student whatever this says
    hard_negatives_from: Literal["teacher", "student"] = "teacher"
    kd: list[KDTerm] = field(default_factory=list)


@dataclass
class TrainConfig:
    max_steps: int = 1000
    lr: float = 1e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    warmup_steps: int = 100
    grad_accum: int = 1
    grad_clip: float = 1.0
    seed: int = 42
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 3
    eval_every: int = 0
    max_nonfinite: int = 20


@dataclass
class EvalConfig:
    """Evaluation during training (train.eval_every) on data.eval_shards; the metric of the task picks
    the best checkpoint (retrieval and pretraining: mean recall, captioning: CIDEr, VQA: accuracy)."""

    k: int = 16  # ITM re-ranks this many ITC candidates per query (BLIP: 256 on COCO; 16 is cheap mid-run)
    num_beams: int = 3  # captioning and VQA generation
    max_length: int = 20  # captions (VQA answers: 10, BLIP's)
    min_length: int = 5
    meteor: bool = True  # captioning: METEOR costs ~10 s of Java per evaluation; CIDEr picks the best checkpoint
    vqa_mode: Literal["rank", "generate"] = "rank"  # rank: BLIP's answer-list ranking; generate: free answers
    vqa_k: int = 128  # answers re-scored whole after the first-token top-k (BLIP: 128)
    answer_list: str = ""  # BLIP's answer_list.json; empty: the one beside the eval shards' folder
    batch_size: int = 64


@dataclass
class Recipe:
    name: str = ""
    task: str = "pretrain"  # a name in dlip_ds.tasks.TASKS: which kind of step the run trains
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------- building from dicts


def did_you_mean(key: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """`value` read as type `tp` (a config field's annotation), or a ConfigError naming `path`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        names = [str(a) for a in allowed]
        raise ConfigError(f"{path} must be {'|'.join(names)}, got {value!r}{did_you_mean(str(value), names)}")
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, typing.get_args(tp), path)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        return _coerce_sequence(value, origin, typing.get_args(tp), path)
    return _coerce_scalar(value, tp, path)


def _coerce_union(value: Any, args: tuple, path: str) -> Any:
    literals = [a for a in args if typing.get_origin(a) is Literal]
    if literals and len(literals) == len(args):  # a union of enumerations is one enumeration
        return _coerce(value, Literal[tuple(v for a in literals for v in typing.get_args(a))], path)
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, path)
        except ConfigError as e:
            errors.append(str(e))
    raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")


def _coerce_sequence(value: Any, origin: type, args: tuple, path: str) -> Any:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{path}: expected a list, got {value!r}")
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    inner = args[0] if args else Any
    items = [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _coerce_scalar(value: Any, tp: Any, path: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    return value


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys with a did-you-mean."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise ConfigError(f"unknown key '{where}'{did_you_mean(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], where)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Plain nested dict/list form of a config (for YAML, JSON and TensorBoard)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# --------------------------------------------------------------------------- model configs


def model_config_from_dict(data: dict, path: str = "model") -> ModelConfig:
    cfg = from_dict(ModelConfig, data, path)
    validate_model(cfg, path)
    return cfg


def validate_model(cfg: ModelConfig, path: str = "model") -> None:
    v, t = cfg.vision, cfg.text
    if v.width % v.heads:
        raise ConfigError(f"{path}.vision.width={v.width} is not divisible by {path}.vision.heads={v.heads}")
    if t.width % t.heads:
        raise ConfigError(f"{path}.text.width={t.width} is not divisible by {path}.text.heads={t.heads}")
    if v.image_size % v.patch_size:
        raise ConfigError(
            f"{path}.vision.image_size={v.image_size} is not a multiple of patch_size={v.patch_size}"
        )
    for name, val in (("vision.depth", v.depth), ("text.depth", t.depth), ("embed_dim", cfg.embed_dim)):
        if val < 1:
            raise ConfigError(f"{path}.{name} must be >= 1, got {val}")
    if cfg.fusion.mode not in ("blip", "albef"):  # also checked here for configs built in code
        raise ConfigError(f"{path}.fusion.mode must be 'blip' or 'albef', got '{cfg.fusion.mode}'")
    if cfg.fusion.layers < 0:
        raise ConfigError(f"{path}.fusion.layers must be >= 0, got {cfg.fusion.layers}")
    if cfg.fusion.mode == "blip" and cfg.fusion.layers > t.depth:
        raise ConfigError(
            f"{path}.fusion.layers={cfg.fusion.layers} exceeds text.depth={t.depth} "
            "(blip mode puts cross-attention inside text layers)"
        )
    d = cfg.decoder
    if d.context not in ("image", "question"):  # also checked here for configs built in code
        raise ConfigError(f"{path}.decoder.context must be 'image' or 'question', got '{d.context}'")
    if d.enabled and d.context == "question" and (d.share or cfg.fusion.layers == 0):
        raise ConfigError(f"{path}.decoder.context='question' (BLIP_VQA's answer decoder) needs {path}.decoder.share="
                          f"false (a stack of its own) and {path}.fusion.layers > 0 (the question states it reads); "
                          f"got share={d.share}, fusion.layers={cfg.fusion.layers}")


def check_kd_term(term: KDTerm, where: str) -> None:
    """What one KD term must satisfy whatever the models (the plan checks the rest against them).

    Recipes run it when they load; `KDPlan` runs it for terms built in code.
    """
    if term.kind not in KD_KINDS:
        raise ConfigError(f"{where}.kind must be {'|'.join(KD_KINDS)}, got '{term.kind}'")
    allowed = LOGITS if term.kind == "logit" else MODULES
    if term.module not in allowed:
        raise ConfigError(f"{where}.module must be one of {allowed} for {term.kind} terms, got '{term.module}'")
    if term.temperature <= 0:
        raise ConfigError(f"{where}.temperature must be > 0, got {term.temperature}")
    if term.kind == "logit":
        return
    if term.kind == "attn":
        if term.attn not in ATTN_KINDS:
            raise ConfigError(f"{where}.attn must be 'self' or 'cross', got '{term.attn}'")
        if term.attn == "cross" and term.module not in CROSS_MODULES:
            raise ConfigError(f"{where}: cross-attention exists only in {' and '.join(CROSS_MODULES)}: "
                              f"{term.module} layers have no cross-attention")
    if isinstance(term.layers, str):
        if term.layers not in ("uniform", "last-k"):
            raise ConfigError(f"{where}.layers must be 'uniform', 'last-k' or a list of [student, teacher] pairs, "
                              f"got '{term.layers}'")
    elif not (isinstance(term.layers, (list, tuple)) and term.layers and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, int) for x in p) for p in term.layers)):
        raise ConfigError(f"{where}.layers: expected [student, teacher] integer pairs, got {term.layers!r}")
