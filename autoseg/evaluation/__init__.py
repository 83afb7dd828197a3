"""Evaluation: per-case metrics (metrics.py) and folder evaluation into summary.json (evaluate.py)."""

from autoseg.evaluation.evaluate import evaluate_folder
from autoseg.evaluation.metrics import case_metrics

__all__ = ["case_metrics", "evaluate_folder"]
