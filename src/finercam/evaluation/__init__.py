"""Evaluating explanations on a dataset: base CAMs against Finer-CAM at several gammas (``finercam evaluate``).

>>> from finercam.evaluation import EvaluationOptions, ScoreOptions, evaluate_dataset, load_regions, summarize
>>> records = evaluate_dataset(model, preprocess, [(path, label), ...], "out/", EvaluationOptions(
...     methods=("gradcam",), gammas=(0, 0.6), score=ScoreOptions(fill_mean=(0, 0, 0))),
...     regions=load_regions("CUB_200_2011"), class_names=names)          # doctest: +SKIP
>>> summarize(records, ("gradcam",), (0.0, 0.6)).rows                       # doctest: +SKIP
"""

from __future__ import annotations

from finercam.evaluation.annotations import ImageItem, Regions, load_regions, transform_mask
from finercam.evaluation.runner import EvaluationOptions, evaluate_dataset, read_progress
from finercam.evaluation.scoring import BatchScores, ScoreOptions, normalised_zero, score_sweep
from finercam.evaluation.summary import Summary, csv_text, markdown, summarize

__all__ = [
    "BatchScores", "EvaluationOptions", "ImageItem", "Regions", "ScoreOptions", "Summary", "csv_text",
    "evaluate_dataset", "load_regions", "markdown", "normalised_zero", "read_progress", "score_sweep", "summarize",
    "transform_mask",
]
