"""The data path: synthetic set, shard preparation, streaming loaders (captions, VQA), evaluation sets, inspection.

The public names below are imported lazily, so `dlip-ds synth --help` does not pay for torch."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load_tokenizer": "text", "clean_caption": "text", "tokenizer_from_config": "text",
    "make_train_loader": "stream", "make_epoch_loader": "stream",
    "train_transform": "transforms", "eval_transform": "transforms",
    "load_eval_set": "evalset", "EvalSet": "evalset",
    "make_vqa_train_loader": "vqa", "make_vqa_epoch_loader": "vqa", "load_answer_list": "vqa",
    "clean_question": "qa",
}
# `synth` is not re-exported: the package attribute of that name is the submodule as soon as it is
# imported, so the function would resolve to a module depending on import order. Use
# `dlip_ds.data.synth.synth`.

__all__ = ["EvalSet", "clean_caption", "clean_question", "eval_transform", "load_answer_list", "load_eval_set",
           "load_tokenizer", "make_epoch_loader", "make_train_loader", "make_vqa_epoch_loader", "make_vqa_train_loader",
           "tokenizer_from_config", "train_transform"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dlip_ds.data' has no attribute '{name}'")
    return getattr(importlib.import_module(f"dlip_ds.data.{_EXPORTS[name]}"), name)
