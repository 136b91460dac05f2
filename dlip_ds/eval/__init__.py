"""Evaluation: BLIP's retrieval protocol and COCO captioning metrics."""

from dlip_ds.eval.captioning import (
           CaptionSettings,
           caption_metrics,
           evaluate_captioning,
)
from dlip_ds.eval.retrieval import evaluate_retrieval, recall_at_k, retrieval_scores

__all__ = ["CaptionSettings", "caption_metrics", "evaluate_captioning", "evaluate_retrieval", "recall_at_k",
           "retrieval_scores"]
