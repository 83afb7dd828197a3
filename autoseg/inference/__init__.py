"""Inference: sliding-window prediction of preprocessed cases and export to the original geometry."""

from autoseg.inference.export import (
    ProbabilitiesInfo,
    export_prediction,
    label_values,
    load_probabilities,
    probabilities_files,
    softmax,
)
from autoseg.inference.predict import predict_preprocessed_case
from autoseg.inference.sliding_window import gaussian_importance_map, sliding_window_predict, tile_starts

__all__ = [
    "ProbabilitiesInfo",
    "export_prediction",
    "gaussian_importance_map",
    "label_values",
    "load_probabilities",
    "predict_preprocessed_case",
    "probabilities_files",
    "sliding_window_predict",
    "softmax",
    "tile_starts",
]
