"""Evaluation: BLIP's retrieval protocol, COCO captioning metrics and the VQAv2 accuracy."""

from dlip_ds.eval.captioning import (
           CaptionSettings,
           caption_metrics,
           evaluate_captioning,
)
from dlip_ds.eval.retrieval import evaluate_retrieval, recall_at_k, retrieval_scores
from dlip_ds.eval.vqa import (
           evaluate_vqa,
           normalize_answer,
           vqa_accuracy,
           vqa_scores,
           write_vqa_predictions,
)

__all__ = ["CaptionSettings", "caption_metrics", "evaluate_captioning", "evaluate_retrieval", "evaluate_vqa",
           "normalize_answer", "recall_at_k", "retrieval_scores", "vqa_accuracy", "vqa_scores", "write_vqa_predictions"]
