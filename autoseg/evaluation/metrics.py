"""Per-case segmentation metrics: overlap (Dice, IoU) and surface distances (HD95, NSD), in numpy.

Surfaces are surface voxels, as in medpy and MONAI (``use_subvoxels=False``): the voxels of a mask that have
a 6-connected neighbour outside it, the image border counting as outside. Distances are in mm, through
``scipy.ndimage.distance_transform_edt`` with the voxel spacing, computed on the bounding box of both masks
because every surface voxel lies inside it. The box needs no margin: the erosion treats what lies outside
the array as background, and outside the union's box it is. Axes of length 1 (a 2D image stored as one slice)
are dropped first, so that a 2D mask has an in-plane outline, not its whole area, as its surface.

Empty masks: Dice, IoU, HD95 and NSD are NaN when prediction and reference are both empty (nothing to
score; means skip NaN). When exactly one is empty, Dice and IoU are 0, NSD is 0 and HD95 is ``inf``: no
finite distance exists, and any number put in its place would be arbitrary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

# The percentile of the pooled surface distances that HD95 reports (medpy's hd95, MONAI's percentile=95).
HAUSDORFF_PERCENTILE = 95.0


def confusion(pred: np.ndarray, ref: np.ndarray, label: int) -> tuple[int, int, int, int]:
    """True positive, false positive, false negative and true negative voxel counts of ``label``."""
    predicted = pred == label
    reference = ref == label
    tp = int(np.count_nonzero(predicted & reference))
    fp = int(np.count_nonzero(predicted)) - tp
    fn = int(np.count_nonzero(reference)) - tp
    return tp, fp, fn, int(predicted.size) - tp - fp - fn


def dice(tp: int, fp: int, fn: int) -> float:
    """2 TP / (2 TP + FP + FN); NaN when prediction and reference are both empty."""
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else math.nan


def iou(tp: int, fp: int, fn: int) -> float:
    """TP / (TP + FP + FN) (Jaccard); NaN when prediction and reference are both empty."""
    denominator = tp + fp + fn
    return tp / denominator if denominator else math.nan


def _crop_to_union(
    pred_mask: np.ndarray, ref_mask: np.ndarray, spacing_mm: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Both masks cut to the bounding box of their union, singleton axes dropped."""
    if pred_mask.shape != ref_mask.shape or len(spacing_mm) != pred_mask.ndim:
        raise ValueError(
            f"masks {pred_mask.shape} and {ref_mask.shape} with spacing {tuple(spacing_mm)} do not fit together"
        )
    union = pred_mask | ref_mask
    box = []
    for axis in range(union.ndim):
        other_axes = tuple(a for a in range(union.ndim) if a != axis)
        present = np.flatnonzero(np.any(union, axis=other_axes))
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    keep = [axis for axis, size in enumerate(union.shape) if size > 1] or [0]
    squeeze = tuple(axis for axis in range(union.ndim) if axis not in keep)
    pred_crop = pred_mask[tuple(box)].squeeze(axis=squeeze)
    ref_crop = ref_mask[tuple(box)].squeeze(axis=squeeze)
    return pred_crop, ref_crop, tuple(float(spacing_mm[axis]) for axis in keep)


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(
    pred_mask: np.ndarray, ref_mask: np.ndarray, spacing_mm: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from every prediction surface voxel to the reference surface, and the other way round.

    A side with no surface voxels gives an empty array; when the other side is empty, its distances are inf.
    """
    pred_mask = np.asarray(pred_mask, dtype=bool)
    ref_mask = np.asarray(ref_mask, dtype=bool)
    if not pred_mask.any() and not ref_mask.any():
        return np.zeros(0), np.zeros(0)
    pred_crop, ref_crop, spacing = _crop_to_union(pred_mask, ref_mask, spacing_mm)
    pred_surface, ref_surface = _surface(pred_crop), _surface(ref_crop)
    return _distances_to(ref_surface, pred_surface, spacing), _distances_to(pred_surface, ref_surface, spacing)


def _distances_to(target_surface: np.ndarray, query_surface: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    if not target_surface.any():
        return np.full(int(np.count_nonzero(query_surface)), np.inf)
    distance_map = ndimage.distance_transform_edt(~target_surface, sampling=spacing)
    return np.asarray(distance_map[query_surface], dtype=np.float64)


def hausdorff95_from_distances(pred_to_ref: np.ndarray, ref_to_pred: np.ndarray) -> float:
    """The 95th percentile of both directions' distances pooled (medpy's hd95); see the module doc on empties."""
    if pred_to_ref.size == 0 and ref_to_pred.size == 0:
        return math.nan
    if pred_to_ref.size == 0 or ref_to_pred.size == 0:
        return math.inf
    return float(np.percentile(np.concatenate([pred_to_ref, ref_to_pred]), HAUSDORFF_PERCENTILE))


def nsd_from_distances(pred_to_ref: np.ndarray, ref_to_pred: np.ndarray, tolerance_mm: float) -> float:
    """The fraction of both surfaces lying within ``tolerance_mm`` of the other one."""
    total = pred_to_ref.size + ref_to_pred.size
    if total == 0:
        return math.nan
    within = np.count_nonzero(pred_to_ref <= tolerance_mm) + np.count_nonzero(ref_to_pred <= tolerance_mm)
    return float(within) / total


def hausdorff95(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """95th percentile Hausdorff distance in mm: NaN if both masks are empty, inf if exactly one is."""
    return hausdorff95_from_distances(*surface_distances(pred_mask, ref_mask, spacing_mm))


def normalized_surface_dice(
    pred_mask: np.ndarray, ref_mask: np.ndarray, spacing_mm: Sequence[float], tolerance_mm: float
) -> float:
    """Normalized surface Dice (Nikolov et al. 2021) at ``tolerance_mm``: NaN if both are empty, 0 if one is."""
    return nsd_from_distances(*surface_distances(pred_mask, ref_mask, spacing_mm), tolerance_mm)


def case_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    labels: Sequence[int],
    spacing_mm: Sequence[float],
    tolerance_mm: float = 1.0,
) -> dict[int, dict[str, float]]:
    """Every metric of every label of one case; keys as in ``METRIC_NAMES``.

    The background (label 0) gets no surface metrics (NaN): its surface is that of the foreground union,
    and measuring it costs distance transforms over the whole image.
    """
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    voxel_mm3 = float(np.prod(spacing_mm))
    results: dict[int, dict[str, float]] = {}
    for label in labels:
        tp, fp, fn, tn = confusion(pred, ref, label)
        if label == 0:
            hd95, nsd = math.nan, math.nan
        else:
            distances = surface_distances(pred == label, ref == label, spacing_mm)
            hd95 = hausdorff95_from_distances(*distances)
            nsd = nsd_from_distances(*distances, tolerance_mm)
        results[int(label)] = {
            "TP": tp,
            "FP": fp,
            "FN": fn,
            "TN": tn,
            "Dice": dice(tp, fp, fn),
            "IoU": iou(tp, fp, fn),
            "n_pred": tp + fp,
            "n_ref": tp + fn,
            "volume_pred_mm3": (tp + fp) * voxel_mm3,
            "volume_ref_mm3": (tp + fn) * voxel_mm3,
            "HD95_mm": hd95,
            "NSD": nsd,
        }
    return results


METRIC_NAMES = (
    "TP",
    "FP",
    "FN",
    "TN",
    "Dice",
    "IoU",
    "n_pred",
    "n_ref",
    "volume_pred_mm3",
    "volume_ref_mm3",
    "HD95_mm",
    "NSD",
)
