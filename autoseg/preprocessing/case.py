"""One case through preprocessing and back: pure functions on arrays, no files.

Forward: transpose -> crop to nonzero -> normalize -> resample -> sample foreground locations.
Normalization comes before resampling (as in nnU-Net) so that the nonzero mask still fits the image.
Backward (``restore_probabilities`` / ``restore_segmentation``): resample to the cropped shape, put back
into the uncropped volume, transpose back; inference uses it to return to the input's geometry.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from autoseg.fingerprint import IntensityStats
from autoseg.io import Geometry
from autoseg.plan import Configuration, Plan
from autoseg.preprocessing.crop import crop_to_nonzero, uncrop
from autoseg.preprocessing.foreground import sample_class_locations
from autoseg.preprocessing.normalize import normalize_case
from autoseg.preprocessing.resample import (
    compute_new_shape,
    resample_image,
    resample_label,
    resample_probabilities,
)


@dataclass(frozen=True)
class CaseProperties:
    """What is needed to undo preprocessing, stored as JSON beside each preprocessed case."""

    SCHEMA_VERSION = 1

    schema_version: int
    case_id: str
    geometry: Geometry  # of the original files, untransposed
    shape_before_crop: tuple[int, ...]  # transposed
    bbox: tuple[tuple[int, int], ...]  # transposed axes
    shape_after_crop: tuple[int, ...]
    spacing_after_crop_mm: tuple[float, ...]  # original spacing, transposed
    spacing_mm: tuple[float, ...]  # after resampling, 3 entries also for 2D configurations
    shape_after_resampling: tuple[int, ...]
    class_location_counts: dict[str, int]  # label value -> sampled voxels


@dataclass
class PreprocessedCase:
    image: np.ndarray  # (C, z, y, x) float32
    label: np.ndarray | None  # (z, y, x) int8/int16; -1 marks background outside the nonzero mask
    locations: np.ndarray  # (N, 4) int32: label value, z, y, x
    properties: CaseProperties


def target_spacing(configuration: Configuration, spacing: tuple[float, ...]) -> tuple[float, ...]:
    """A 2D configuration keeps the case's own out-of-plane spacing."""
    if len(configuration.spacing_mm) < len(spacing):
        return (spacing[0], *configuration.spacing_mm)
    return tuple(configuration.spacing_mm)


def preprocess_case(
    image: np.ndarray,
    label: np.ndarray | None,
    geometry: Geometry,
    plan: Plan,
    configuration: Configuration,
    case_id: str,
    seed: int,
) -> PreprocessedCase:
    axes = plan.transpose_forward
    image = image.transpose(0, *(a + 1 for a in axes))
    if label is not None:
        label = label.transpose(axes)
    spacing = tuple(geometry.spacing_mm[a] for a in axes)
    shape_before_crop = tuple(int(s) for s in image.shape[1:])
    image, cropped_label, bbox = crop_to_nonzero(image, label)
    shape_after_crop = tuple(int(s) for s in image.shape[1:])
    intensity: tuple[IntensityStats, ...] = plan.foreground_intensity_per_channel
    image = normalize_case(
        image, cropped_label, configuration.normalization, configuration.use_mask_for_norm, intensity
    )
    new_spacing = target_spacing(configuration, spacing)
    new_shape = compute_new_shape(shape_after_crop, spacing, new_spacing)
    image = resample_image(image, new_shape, spacing, new_spacing, configuration.resampling)
    out_label = None
    locations = np.zeros((0, 4), np.int32)
    counts: dict[str, int] = {}
    if label is not None:
        out_label = resample_label(cropped_label, new_shape, spacing, new_spacing, configuration.resampling)
        out_label = out_label.astype(np.int16 if max(plan.labels.values()) > 127 else np.int8, copy=False)
        foreground = plan.foreground_labels
        per_class = sample_class_locations(out_label, foreground, seed)
        locations = np.concatenate(
            [np.column_stack([np.full(len(c), v, np.int32), c.astype(np.int32)]) for v, c in per_class.items()]
            or [locations]
        ).astype(np.int32)
        counts = {str(v): len(c) for v, c in per_class.items()}
    properties = CaseProperties(
        schema_version=CaseProperties.SCHEMA_VERSION,
        case_id=case_id,
        geometry=geometry,
        shape_before_crop=shape_before_crop,
        bbox=tuple((int(a), int(b)) for a, b in bbox),
        shape_after_crop=shape_after_crop,
        spacing_after_crop_mm=tuple(float(s) for s in spacing),
        spacing_mm=tuple(float(s) for s in new_spacing),
        shape_after_resampling=tuple(int(s) for s in image.shape[1:]),
        class_location_counts=counts,
    )
    return PreprocessedCase(image.astype(np.float32, copy=False), out_label, locations, properties)


def restore_probabilities(
    probabilities: np.ndarray, properties: CaseProperties, plan: Plan, configuration: Configuration
) -> np.ndarray:
    """Class probabilities (K, *shape_after_resampling) -> (K, z, y, x) in the original image's grid.

    Outside the cropped region everything is background (probability 1 for class 0).
    """
    probs = resample_probabilities(
        probabilities,
        properties.shape_after_crop,
        properties.spacing_mm,
        properties.spacing_after_crop_mm,
        configuration.resampling,
    )
    full = np.zeros((probs.shape[0], *properties.shape_before_crop), dtype=probs.dtype)
    full[0] = 1
    for k in range(probs.shape[0]):
        full[k] = uncrop(probs[k], properties.bbox, properties.shape_before_crop, fill=1.0 if k == 0 else 0.0)
    return full.transpose(0, *(a + 1 for a in plan.transpose_backward))


def restore_segmentation(
    segmentation: np.ndarray, properties: CaseProperties, plan: Plan, configuration: Configuration
) -> np.ndarray:
    """A label map (*shape_after_resampling) -> (z, y, x) in the original image's grid."""
    seg = resample_label(
        segmentation,
        properties.shape_after_crop,
        properties.spacing_mm,
        properties.spacing_after_crop_mm,
        configuration.resampling,
    )
    full = uncrop(seg, properties.bbox, properties.shape_before_crop, fill=0)
    return full.transpose(plan.transpose_backward)
