"""Resampling images, label maps and probabilities onto a new voxel grid.

The results are nnU-Net's (preprocessing/resampling/default_resampling.py): images go through
``skimage.transform.resize(order, mode='edge', anti_aliasing=False)``, label maps one label at a time
(batchgenerators' ``resize_segmentation``), and a strongly anisotropic volume is resampled in-plane first,
then along its thick axis with ``out_of_plane_order``.

The way there is not. A grid-mode zoom is separable: along each axis it is one fixed linear map from
n_in to n_out samples (prefilter, edge padding and interpolation weights included). So each axis is one
matrix product with that banded (n_out, n_in) operator, which BLAS does far faster than scipy's per-voxel
3-D spline evaluation: in float32 for intensities (within ~1e-6 of nnU-Net's float64), in float64 for the
label scores, whose near-ties must be decided as nnU-Net decides them. Tests compare with skimage and nnU-Net.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import lru_cache
from math import prod
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from autoseg.preprocessing.crop import bounding_box

if TYPE_CHECKING:  # autoseg.plan -> autoseg.fingerprint imports this package (cropping)
    from autoseg.plan import ResamplingPlan

# nnU-Net's planner resamples logits / probabilities back to the image linearly
# (determine_segmentation_softmax_export_fn: order 1, order_z 0), not with the image's cubic splines.
PROBABILITY_ORDER = 1

# Cubic-spline weights fall off as 0.268^distance. In float32, dropping those below this bound changes
# results by less than 1e-12 of the intensity range, and keeps products out of the denormal range, where
# arithmetic is about 100 times slower (measured: 0.33 s -> 0.026 s for one axis of 160 x 192 x 160).
_NEGLIGIBLE_WEIGHT_FLOAT32 = 1e-12

# Label scores are compared for the largest and for exact ties. float32 turns scores 4e-15 apart (0.5 +- 2e-15)
# into a tie that the nearest neighbour then takes, where nnU-Net's float64 takes the larger: 2 of 20832
# voxels of a speckled label map. float64 agrees, and its cost is small next to nnU-Net's.
_LABEL_SCORE_DTYPE = np.float64

# A label's scores are computed in slabs of about this many output voxels (8 MiB in float64), so that
# its temporaries stay small next to the label map however large the volume.
_LABEL_SLAB_VOXELS = 1 << 20

# Rows per block of the banded operator product: fewer and the GEMMs get too small, more and the blocks
# touch too many zero columns (measured best of 16 / 32 / 64 / 128 for 160, 300 and 512 voxel axes).
_OPERATOR_BLOCK_ROWS = 64

# Cases differ in their cropped shapes, so operators rarely repeat across cases; this only has to hold
# the few (n_in, n_out, order) of one case and of the labels resampled right after its image.
_CACHED_OPERATORS = 64


def compute_new_shape(
    shape: Sequence[int], old_spacing: Sequence[float], new_spacing: Sequence[float]
) -> tuple[int, ...]:
    """The shape that covers the same extent at ``new_spacing``: round(old / new * shape) per axis."""
    if not len(shape) == len(old_spacing) == len(new_spacing):
        raise ValueError(
            f"shape {tuple(shape)}, spacing {tuple(old_spacing)} and {tuple(new_spacing)} differ in length"
        )
    return tuple(round(float(old) / float(new) * int(n)) for n, old, new in zip(shape, old_spacing, new_spacing))


def thick_axis(old_spacing: Sequence[float], new_spacing: Sequence[float], threshold: float) -> int | None:
    """The axis to resample on its own (nnU-Net's "separate z"), or None to resample all axes together.

    The old spacing decides if it is anisotropic beyond ``threshold``, else the new one; the thick axis is
    the one with the largest spacing, and when two or three axes share it there is none.
    """
    for spacing in (old_spacing, new_spacing):
        largest = max(spacing)
        if largest / min(spacing) > threshold:
            axes = [axis for axis, s in enumerate(spacing) if s == largest]
            return axes[0] if len(axes) == 1 else None
    return None


@lru_cache(maxsize=_CACHED_OPERATORS)
def _interpolation_operator(n_in: int, n_out: int, order: int, dtype: type = np.float32) -> np.ndarray:
    """(n_out, n_in) matrix: one axis of scipy's grid-mode zoom with mode 'nearest' (skimage's 'edge').

    Zooming the identity gives the operator's columns; along the identity's second axis the zoom factor is
    1, where a spline interpolates its own nodes, so that axis passes through unchanged (to ~1e-16).
    """
    operator = ndimage.zoom(np.eye(n_in), (n_out / n_in, 1.0), order=order, mode="nearest", grid_mode=True)
    assert operator.shape == (n_out, n_in), operator.shape
    negligible = _NEGLIGIBLE_WEIGHT_FLOAT32 if dtype == np.float32 else np.finfo(dtype).tiny
    operator[np.abs(operator) < negligible] = 0.0
    operator = operator.astype(dtype)
    operator.flags.writeable = False
    return operator


@lru_cache(maxsize=_CACHED_OPERATORS)
def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output sample for order 0: scipy's floor(c + 0.5) at the grid-mode coordinate."""
    coordinates = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    indices = np.clip(np.floor(coordinates + 0.5), 0, n_in - 1).astype(np.intp)
    indices.flags.writeable = False
    return indices


def _span(flags: np.ndarray) -> slice:
    """From the first to the last True entry of ``flags`` (empty if there is none)."""
    hits = np.flatnonzero(flags)
    return slice(int(hits[0]), int(hits[-1]) + 1) if hits.size else slice(0, 0)


def _apply_operators(volume: np.ndarray, operators: dict[int, np.ndarray]) -> np.ndarray:
    """Multiply every line of ``volume`` along each axis in ``operators`` by that axis's matrix.

    Axes before the first one with an operator are looped over (slices of an in-plane resampling); the
    axes from there on are rotated through, see ``_rotate_through``.
    """
    dtype = np.result_type(*operators.values()) if operators else np.float32
    array = np.ascontiguousarray(volume, dtype=dtype)
    if not operators:
        return array
    first = min(operators)
    if first == 0:
        return _rotate_through(array, operators)
    shape = tuple(operators[a].shape[0] if a in operators else n for a, n in enumerate(array.shape))
    result = np.empty(shape, dtype=dtype)
    for index in np.ndindex(*array.shape[:first]):
        result[index] = _rotate_through(array[index], {a - first: op for a, op in operators.items()})
    return result


def _rotate_through(array: np.ndarray, operators: dict[int, np.ndarray]) -> np.ndarray:
    """Apply the operators to ``array`` by multiplying its last axis and writing it first, ndim times.

    Each step is one GEMM on the whole array and needs no transpose copy (numpy's stacked matmul over a
    middle axis would make one small BLAS call per slice); after ndim rotations the axes are in order.
    """
    for axis in range(array.ndim - 1, -1, -1):
        lines = array.reshape(-1, array.shape[-1]).T
        rotated = _banded_product(operators[axis], lines) if axis in operators else np.ascontiguousarray(lines)
        array = rotated.reshape(rotated.shape[0], *array.shape[:-1])
    return array


def _banded_product(operator: np.ndarray, lines: np.ndarray) -> np.ndarray:
    """``operator @ lines``, each block of operator rows multiplied with only the columns it touches.

    Interpolation operators are banded, so on a wide axis (512 in-plane voxels of a CT) this does a
    fraction of the dense product's work: measured 0.13 s -> 0.07 s for 512 -> 448 over 51200 lines.
    """
    result = np.empty((operator.shape[0], lines.shape[1]), dtype=np.result_type(operator, lines))
    for start in range(0, operator.shape[0], _OPERATOR_BLOCK_ROWS):
        rows = operator[start : start + _OPERATOR_BLOCK_ROWS]
        columns = _span(np.any(rows, axis=0))
        np.matmul(rows[:, columns], lines[columns], out=result[start : start + _OPERATOR_BLOCK_ROWS])
    return result


def _resize_axes(volume: np.ndarray, new_shape: Sequence[int], order: int, axes: Sequence[int]) -> np.ndarray:
    """Resize ``volume`` along ``axes`` to ``new_shape``; returns ``volume`` itself when nothing changes."""
    changed = [axis for axis in axes if volume.shape[axis] != new_shape[axis]]
    if not changed:
        return volume
    if order == 0:
        for axis in changed:
            volume = np.take(volume, _nearest_indices(volume.shape[axis], new_shape[axis]), axis=axis)
        return volume
    return _apply_operators(
        volume, {axis: _interpolation_operator(volume.shape[axis], new_shape[axis], order) for axis in changed}
    )


def _resample_intensities(
    volume: np.ndarray, new_shape: tuple[int, ...], order: int, order_z: int, axis: int | None
) -> np.ndarray:
    """One channel, as nnU-Net's resample_data_or_seg with is_seg=False."""
    volume = volume.astype(np.float32, copy=False)
    in_plane = [a for a in range(volume.ndim) if a != axis]
    target = new_shape if axis is None else tuple(volume.shape[a] if a == axis else n for a, n in enumerate(new_shape))
    result = _resize_axes(volume, target, order, in_plane)
    if result is not volume:
        # skimage's clip=True: values stay within the input's range, of the whole volume or, when
        # resampled slice by slice, of each slice.
        reduce = tuple(in_plane)
        keep = axis is not None
        low, high = volume.min(axis=reduce, keepdims=keep), volume.max(axis=reduce, keepdims=keep)
        np.clip(result, low, high, out=result)
    if axis is not None:
        # Along the thick axis nnU-Net uses map_coordinates, which does not clip.
        result = _resize_axes(result, new_shape, order_z, [axis])
    return result


def _resample_channels(
    array: np.ndarray,
    new_shape: Sequence[int],
    old_spacing: Sequence[float],
    new_spacing: Sequence[float],
    order: int,
    plan: ResamplingPlan,
) -> np.ndarray:
    shape = tuple(int(n) for n in new_shape)
    if array.ndim != len(shape) + 1:
        raise ValueError(f"array must be (C, *spatial) with {len(shape)} spatial axes, got shape {array.shape}")
    if array.shape[1:] == shape:
        return array.astype(np.float32, copy=False)
    axis = thick_axis(old_spacing, new_spacing, plan.anisotropy_threshold)
    result = np.empty((array.shape[0], *shape), dtype=np.float32)
    for channel in range(array.shape[0]):
        result[channel] = _resample_intensities(array[channel], shape, order, plan.out_of_plane_order, axis)
    return result


def resample_image(
    image: np.ndarray,
    new_shape: Sequence[int],
    old_spacing: Sequence[float],
    new_spacing: Sequence[float],
    plan: ResamplingPlan,
) -> np.ndarray:
    """An image (C, *spatial) resampled to ``new_shape`` with ``plan.image_order``, as float32.

    When the shape does not change the image is returned as float32 without a copy.
    """
    return _resample_channels(image, new_shape, old_spacing, new_spacing, plan.image_order, plan)


def resample_probabilities(
    probabilities: np.ndarray,
    new_shape: Sequence[int],
    old_spacing: Sequence[float],
    new_spacing: Sequence[float],
    plan: ResamplingPlan,
    order: int = PROBABILITY_ORDER,
) -> np.ndarray:
    """Class probabilities or logits (K, *spatial) resampled to ``new_shape``, as float32."""
    return _resample_channels(probabilities, new_shape, old_spacing, new_spacing, order, plan)


def resample_label(
    label: np.ndarray,
    new_shape: Sequence[int],
    old_spacing: Sequence[float],
    new_spacing: Sequence[float],
    plan: ResamplingPlan,
) -> np.ndarray:
    """A label map (*spatial) resampled to ``new_shape``, in its own dtype.

    Every label value (``-1`` included) is one more label: its one-hot mask is interpolated with
    ``plan.label_order`` and each voxel gets the label of the largest value. Ties go to the nearest
    neighbour's label when it is among them, else to the smallest label, as batchgenerators'
    resize_segmentation. Along a thick axis the in-plane result is taken by nearest neighbour.
    When the shape does not change the label map itself is returned.
    """
    shape = tuple(int(n) for n in new_shape)
    if label.ndim != len(shape):
        raise ValueError(f"label must have {len(shape)} axes, got shape {label.shape}")
    if label.shape == shape:
        return label
    axis = thick_axis(old_spacing, new_spacing, plan.anisotropy_threshold)
    if axis is None:
        return _resample_label_by_argmax(label, shape, plan.label_order, range(label.ndim))
    in_plane = [a for a in range(label.ndim) if a != axis]
    target = tuple(label.shape[a] if a == axis else n for a, n in enumerate(shape))
    result = label if target == label.shape else _resample_label_by_argmax(label, target, plan.label_order, in_plane)
    if shape[axis] == label.shape[axis]:
        return result
    if plan.out_of_plane_order == 0:
        return np.take(result, _nearest_indices(label.shape[axis], shape[axis]), axis=axis)
    return _resample_label_by_threshold(result, shape, plan.out_of_plane_order, axis)


def _resample_label_by_argmax(
    label: np.ndarray, new_shape: tuple[int, ...], order: int, axes: Sequence[int]
) -> np.ndarray:
    nearest = _resize_axes(label, new_shape, 0, axes)
    values = np.unique(label)
    if order == 0 or len(values) == 1:
        return nearest if nearest is not label else label.copy()
    operators = {
        a: _interpolation_operator(label.shape[a], new_shape[a], order, _LABEL_SCORE_DTYPE)
        for a in axes
        if label.shape[a] != new_shape[a]
    }
    result = np.full(new_shape, values[0], dtype=label.dtype)  # the smallest label wins until beaten
    best = np.zeros(new_shape, dtype=_LABEL_SCORE_DTYPE)
    # Whether the nearest neighbour's label has the top score so far (a bool, not a float score per voxel)
    nearest_on_top = np.zeros(new_shape, dtype=bool)
    for value in values:
        mask = label == value
        for source, target in _label_pieces(bounding_box(mask), operators):
            block = mask[source].astype(_LABEL_SCORE_DTYPE)
            score = _apply_operators(block, {a: op[target[a], source[a]] for a, op in operators.items()})
            del block
            if order > 1:
                np.clip(score, 0.0, 1.0, out=score)  # skimage's clip=True; splines overshoot the 0/1 mask
            _take_the_lead(value, score, result[target], best[target], nearest[target], nearest_on_top[target])
    np.copyto(result, nearest, where=nearest_on_top)
    return result


def _take_the_lead(
    value: np.generic,
    score: np.ndarray,
    result: np.ndarray,
    best: np.ndarray,
    nearest: np.ndarray,
    nearest_on_top: np.ndarray,
) -> None:
    """Update the running argmax (views, in place) with one label's ``score``.

    A strictly larger score takes the voxel. The nearest neighbour's label is on top where it reached
    the best score so far (a tie included) and nothing has passed it since; there it wins in the end.
    """
    ahead = score > best
    np.copyto(result, value, where=ahead)
    reached = score >= best
    reached &= score > 0
    reached &= nearest == value
    ahead = ~ahead
    nearest_on_top &= ahead
    nearest_on_top |= reached
    np.maximum(best, score, out=best)


def _label_pieces(
    box: tuple[tuple[int, int], ...], operators: dict[int, np.ndarray]
) -> Iterator[tuple[tuple[slice, ...], tuple[slice, ...]]]:
    """(input, output) boxes that cover a label's output support, in slabs along the first axis.

    Outside the output box the label's interpolated mask is exactly 0 (the operators are banded for
    order 1), and each slab needs only the input rows that its operator rows touch.
    """
    source = [slice(start, stop) for start, stop in box]
    target = [_span(np.any(operators[a][:, s], axis=1)) if a in operators else s for a, s in enumerate(source)]
    rows_per_slab = max(1, _LABEL_SLAB_VOXELS // prod(s.stop - s.start for s in target[1:]))
    for first in range(target[0].start, target[0].stop, rows_per_slab):
        rows = slice(first, min(first + rows_per_slab, target[0].stop))
        inputs = rows
        if 0 in operators:
            touched = _span(np.any(operators[0][rows, source[0]], axis=0))
            inputs = slice(touched.start + source[0].start, touched.stop + source[0].start)
        yield (inputs, *source[1:]), (rows, *target[1:])


def _resample_label_by_threshold(label: np.ndarray, new_shape: tuple[int, ...], order: int, axis: int) -> np.ndarray:
    """Along the thick axis with order > 0: each label where its rounded mask exceeds 0.5, larger labels last."""
    result = np.zeros(new_shape, dtype=label.dtype)
    for value in np.unique(label):
        score = _resize_axes((label == value).astype(np.float32), new_shape, order, [axis])
        result[np.round(score) > 0.5] = value
    return result
