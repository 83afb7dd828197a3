"""Preprocessing operations on arrays: crop to the nonzero region, normalize, resample, sample foreground.

These are nnU-Net's rules (v2.8.1), computed faster; ``run.py`` applies them to a whole dataset.
"""

from autoseg.preprocessing.crop import bounding_box, crop_to_nonzero, nonzero_mask, uncrop
from autoseg.preprocessing.foreground import sample_class_locations
from autoseg.preprocessing.normalize import NORMALIZERS, Normalizer, normalize_case, register_normalizer
from autoseg.preprocessing.resample import (
    compute_new_shape,
    resample_image,
    resample_label,
    resample_probabilities,
    thick_axis,
)

__all__ = [
    "NORMALIZERS",
    "Normalizer",
    "bounding_box",
    "compute_new_shape",
    "crop_to_nonzero",
    "nonzero_mask",
    "normalize_case",
    "register_normalizer",
    "resample_image",
    "resample_label",
    "resample_probabilities",
    "sample_class_locations",
    "thick_axis",
    "uncrop",
]
