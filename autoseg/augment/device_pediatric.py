"""The five pediatric acquisition transforms of ``pediatric.py`` in torch, batched, on the tensors' device.

Two layers, as on the CPU:

* deterministic twins (``bias_field_torch``, ``kspace_ghosting_torch``, ``motion_blur_torch``,
  ``remap_contrast_torch``, ``simulate_thick_slices_torch``) take a stack of items ``(N, *spatial)`` (one item
  is one channel of one sample) and per-item parameters, and compute what the numpy twin computes for each
  item: torch.fft for the k-space artefacts, a Legendre recurrence and tensordot for the field, a batched
  ``searchsorted`` for the piecewise-linear curve, gathers for the slab means of thick slices;
* ``draw_acquisition`` draws every parameter on the host from a ``np.random.Generator``, with the CPU
  samplers' distributions and probabilities (per sample with ``p_*``, then per channel), and
  ``apply_acquisition`` runs the twins on the picked items only (``index_select`` / ``index_copy_``).

Per-item parameters are a handful of numbers, so they are drawn on the host (cheap, reproducible, easy to
test); the only per-voxel work (fields, spectra, masked statistics) runs on the device, without a single
device-to-host synchronisation. None of the five needs a voxel-wise random field, so ``generator`` (kept in
the signature for the device augmenter, whose other transforms draw noise from it) is only checked to live
on the tensors' device.

Items of one transform that act along different axes are run as one group per axis (at most three
groups). The numbers follow ``pediatric.py``: the k-space artefacts keep the real part of the inverse FFT,
the bias field multiplies about 0, the contrast curve spans the masked intensity range and keeps the masked
mean and standard deviation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from autoseg.augment.device import upload
from autoseg.augment.params import AugmentationParams
from autoseg.augment.pediatric import _require
from autoseg.augment.pipeline import IGNORE_LABEL
from autoseg.errors import AutosegError

__all__ = [
    "AcquisitionDraw",
    "BiasFieldDraw",
    "ContrastRemapDraw",
    "GhostingDraw",
    "MotionDraw",
    "ThickSliceDraw",
    "acquisition_axes",
    "apply_acquisition",
    "bias_field_map_torch",
    "bias_field_torch",
    "draw_acquisition",
    "kspace_ghosting_torch",
    "legendre_basis",
    "motion_blur_torch",
    "remap_contrast_torch",
    "simulate_thick_slices_torch",
]

IN_PLANE_AXES = (1, 2)  # pipeline._acquisition_transforms: dummy-2D patches act in-plane only
REMAP_EPSILON = 1e-7  # pediatric.remap_contrast's default: a flatter mapped range leaves the image as it is

ParamArray = np.ndarray | Sequence[float] | float


def _per_item(value: ParamArray, n: int, dtype: type) -> np.ndarray:
    """A host parameter as one entry per item (a scalar is shared by all)."""
    array: np.ndarray = np.asarray(value, dtype=dtype)
    return np.broadcast_to(array, (n,)).copy() if array.ndim == 0 else array.reshape(n)


def _along(vector: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """``vector`` (N, L) shaped to broadcast against items (N, *spatial) along spatial ``axis``."""
    shape = [vector.shape[0]] + [1] * ndim
    shape[axis + 1] = vector.shape[1]
    return vector.reshape(shape)


# --- deterministic twins: items (N, *spatial), per-item parameters ----------------------------------------------
def legendre_basis(n: int, degrees: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(n, degrees)``: P_0 .. P_{degrees-1} at ``linspace(-1, 1, n)`` (numpy's ``legvander``), by Bonnet's
    recurrence ``(k + 1) P_{k+1} = (2k + 1) x P_k - k P_{k-1}``."""
    x = torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype)
    columns = [torch.ones_like(x), x]
    for k in range(1, degrees - 1):
        columns.append(((2 * k + 1) * x * columns[k] - k * columns[k - 1]) / (k + 1))
    return torch.stack(columns[:degrees], dim=1)


def bias_field_map_torch(shape: Sequence[int], coefficients: torch.Tensor) -> torch.Tensor:
    """``(N, *shape)``: each item's field ``sum c[i,j,k] P_i(z) P_j(y) P_k(x)`` for ``coefficients``
    ``(N, *degrees)``, contracted one axis at a time (as ``pediatric.bias_field_map``)."""
    if coefficients.ndim != len(shape) + 1:
        raise ValueError(f"coefficients {tuple(coefficients.shape)} need (N, one axis per spatial axis {tuple(shape)})")
    field = coefficients
    for n, degree in zip(shape, coefficients.shape[1:]):
        basis = legendre_basis(n, degree, coefficients.device, coefficients.dtype)
        field = torch.tensordot(field, basis, dims=([1], [1]))  # the new spatial axis goes last
    return field


def bias_field_torch(image: torch.Tensor, coefficients: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``image * (1 + field)`` for items ``(N, *spatial)`` and ``coefficients`` ``(N, *degrees)``."""
    coefficients = upload(coefficients, image.device, image.dtype)
    return image * (1.0 + bias_field_map_torch(image.shape[1:], coefficients))


def kspace_ghosting_torch(
    image: torch.Tensor, axis: int, period: ParamArray, offset: ParamArray, intensity: ParamArray
) -> torch.Tensor:
    """``pediatric.kspace_ghosting`` of each item along spatial ``axis``, with per-item period, offset, intensity.

    The real part of ``ifft(w * fft(f))`` equals ``irfft(w_sym * rfft(f))`` with ``w_sym(k) = (w(k) + w(-k)) / 2``
    (a real image has a Hermitian spectrum), so half the spectrum suffices.
    """
    count, n = image.shape[0], image.shape[axis + 1]
    period_, offset_ = _per_item(period, count, np.int64), _per_item(offset, count, np.int64)
    intensity_ = _per_item(intensity, count, np.float64)
    k = np.arange(n)
    lines = (k[None, :] - offset_[:, None]) % period_[:, None] == 0
    weight = np.where(lines, 1.0 - intensity_[:, None], 1.0)
    symmetric = 0.5 * (weight + weight[:, (-k) % n])[:, : n // 2 + 1]
    factor = _along(upload(symmetric, image.device, image.dtype), axis, image.ndim - 1)
    spectrum = torch.fft.rfft(image, dim=axis + 1)
    return torch.fft.irfft(spectrum * factor, n=n, dim=axis + 1)


def motion_blur_torch(image: torch.Tensor, axis: int, shifts: np.ndarray, segments: np.ndarray) -> torch.Tensor:
    """``pediatric.motion_blur`` of each item: ``shifts`` ``(N, positions, ndim)`` in voxels, ``segments``
    ``(N, lines)`` the position of each line along ``axis`` in acquisition order (lowest frequency first).

    The FFT runs only along the axes that some item shifts, and along ``axis`` (along any other axis the
    phase ramp is 1 and the transform pair cancels).
    """
    count, ndim = image.shape[0], image.ndim - 1
    lines = image.shape[axis + 1]
    shifts = np.asarray(shifts, dtype=np.float64).reshape(count, -1, ndim)
    segments = np.asarray(segments, dtype=np.int64).reshape(count, -1)
    if segments.shape != (count, lines) or segments.min() < 0 or segments.max() >= shifts.shape[1]:
        raise ValueError(f"segments must give a position index < {shifts.shape[1]} for each of {lines} lines")
    in_fft_order = np.fft.ifftshift(segments, axes=1)
    per_line = np.take_along_axis(shifts, in_fft_order[:, :, None], axis=1)  # (N, lines in FFT order, ndim)
    dims = [d for d in range(ndim) if d == axis or np.any(per_line[:, :, d] != 0)]
    line_shift = upload(per_line, image.device, image.dtype)
    phase = torch.zeros((), dtype=image.dtype, device=image.device)
    for d in dims:
        freq = torch.fft.fftfreq(image.shape[d + 1], device=image.device, dtype=image.dtype)
        phase = phase + _along(freq[None], d, ndim) * _along(line_shift[:, :, d], axis, ndim)
    ramp = torch.polar(torch.ones_like(phase), -2.0 * math.pi * phase)
    fft_dims = [d + 1 for d in dims]
    spectrum = torch.fft.fftn(image, dim=fft_dims) * ramp
    return torch.fft.ifftn(spectrum, dim=fft_dims).real.contiguous()


def _interp(values: torch.Tensor, curve_x: torch.Tensor, curve_y: torch.Tensor) -> torch.Tensor:
    """``np.interp`` row by row: values (N, M), increasing ``curve_x`` and ``curve_y`` (N, P); clamped ends."""
    left = (torch.searchsorted(curve_x, values, right=True) - 1).clamp(0, curve_x.shape[1] - 2)
    x0, x1 = curve_x.gather(1, left), curve_x.gather(1, left + 1)
    y0, y1 = curve_y.gather(1, left), curve_y.gather(1, left + 1)
    span = x1 - x0
    t = torch.where(span > 0, (values - x0) / torch.where(span > 0, span, 1.0), 0.0).clamp(0.0, 1.0)
    return y0 + t * (y1 - y0)


def _masked_mean_std(values: torch.Tensor, mask: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Mean and (population) standard deviation of each row's masked entries; rows (N, M), count (N,) >= 1."""
    weights = mask.to(values.dtype)
    mean = (values * weights).sum(1) / count
    std = (((values - mean[:, None]) * weights) ** 2).sum(1).div(count).sqrt()
    return mean, std


def remap_contrast_torch(
    image: torch.Tensor,
    mask: torch.Tensor,
    curve_x: torch.Tensor | np.ndarray,
    curve_y: torch.Tensor | np.ndarray,
    epsilon: float = REMAP_EPSILON,
) -> torch.Tensor:
    """``pediatric.remap_contrast`` of each item: ``mask`` (N, *spatial) bool, curves (N, points).

    An item whose mask has fewer than 2 voxels, or whose curve flattens the masked intensities, is returned
    as it is; the check runs on the device (``torch.where``), so nothing waits for the device.
    """
    count_items = image.shape[0]
    values = image.reshape(count_items, -1)
    inside = mask.reshape(count_items, -1)
    xs = upload(curve_x, image.device, image.dtype).reshape(count_items, -1).contiguous()
    ys = upload(curve_y, image.device, image.dtype).reshape(count_items, -1)
    mapped = _interp(values.contiguous(), xs, ys)
    count = inside.sum(1).to(image.dtype)
    safe_count = count.clamp(min=1.0)
    mean, std = _masked_mean_std(values, inside, safe_count)
    mapped_mean, mapped_std = _masked_mean_std(mapped, inside, safe_count)
    keep = (count >= 2) & (mapped_std >= epsilon)
    scale = torch.where(keep, std / torch.where(keep, mapped_std, 1.0), 0.0)
    restored = (mapped - mapped_mean[:, None]) * scale[:, None] + mean[:, None]
    return torch.where(inside & keep[:, None], restored, values).reshape(image.shape)


def _thick_slice_plan(n: int, factor: int, order: int, offset: int) -> tuple[np.ndarray, ...]:
    """Slab starts and sizes, and for every slice the left slab and the weight of the next one (as
    ``pediatric.simulate_thick_slices``; order 0 or a single slab: weight 0)."""
    if order not in (0, 1):
        raise ValueError(f"order must be 0 or 1, got {order}")
    starts = np.arange(offset % factor, n, factor)
    if len(starts) == 0 or starts[0] != 0:  # no slab starts inside (offset >= n): one slab holds every slice
        starts = np.concatenate([[0], starts]).astype(np.int64)
    stops = np.append(starts[1:], n)
    counts = stops - starts
    if order == 0 or len(starts) == 1:
        return starts, counts, np.repeat(np.arange(len(starts)), counts), np.zeros(n)
    centres = (starts + stops - 1) / 2.0
    positions = np.arange(n, dtype=np.float64)
    left = np.clip(np.searchsorted(centres, positions, side="right") - 1, 0, len(centres) - 2)
    weight = np.clip((positions - centres[left]) / (centres[left + 1] - centres[left]), 0.0, 1.0)
    return starts, counts, left, weight


def simulate_thick_slices_torch(
    image: torch.Tensor, axis: int, factor: ParamArray, order: ParamArray = 0, offset: ParamArray = 0
) -> torch.Tensor:
    """``pediatric.simulate_thick_slices`` of each item along spatial ``axis``, with per-item factor, order
    (0 repeats each slab's mean, 1 interpolates between slab centres) and slab offset.

    Slab means are a few gathers (one per slice of the thickest slab), the way back two gathers and a
    linear blend; the index tables are built on the host, one row per item.
    """
    count, n = image.shape[0], image.shape[axis + 1]
    plans = [
        _thick_slice_plan(n, int(f), int(o), int(s))
        for f, o, s in zip(
            _per_item(factor, count, np.int64), _per_item(order, count, np.int64), _per_item(offset, count, np.int64)
        )
    ]
    slabs = max(len(plan[0]) for plan in plans)
    starts, counts = np.zeros((count, slabs), np.int64), np.zeros((count, slabs), np.int64)
    for i, (start, size, _, _) in enumerate(plans):
        starts[i, : len(start)], counts[i, : len(size)] = start, size
    device = image.device
    left = upload(np.stack([plan[2] for plan in plans]), device)
    weight = upload(np.stack([plan[3] for plan in plans]), device, image.dtype)[:, :, None]
    moved = image.movedim(axis + 1, 1)
    slices = moved.reshape(count, n, -1)
    rows = torch.arange(count, device=device)[:, None]
    sums = torch.zeros((count, slabs, slices.shape[2]), dtype=image.dtype, device=device)
    for t in range(int(counts.max())):
        index = upload(np.minimum(starts + t, n - 1), device)
        inside = upload(t < counts, device, image.dtype)[:, :, None]
        sums += slices[rows, index] * inside
    means = sums / upload(np.maximum(counts, 1), device, image.dtype)[:, :, None]
    out = means[rows, left] * (1.0 - weight) + means[rows, (left + 1).clamp(max=slabs - 1)] * weight
    return out.reshape(moved.shape).movedim(1, axis + 1).contiguous()


# --- drawing: host, from the CPU samplers' distributions -------------------------------------------------------
@dataclass(frozen=True)
class AcquisitionDraw:
    """One transform's draw: the picked samples (sorted); per-item fields follow the items (picked sample,
    channel) in that order, channel fastest."""

    samples: np.ndarray


@dataclass(frozen=True)
class ContrastRemapDraw(AcquisitionDraw):
    levels: np.ndarray  # (items, points) in [0, 1]: curve values over the masked range, sorted unless non-monotone


@dataclass(frozen=True)
class BiasFieldDraw(AcquisitionDraw):
    coefficients: np.ndarray  # (items, *degrees): uniform(-1, 1) where 0 < total degree <= order, else 0
    amplitude: np.ndarray  # (items,): the field's largest |deviation|, uniform(0, bias_field_amplitude)


@dataclass(frozen=True)
class MotionDraw(AcquisitionDraw):
    axis: np.ndarray  # (items,) phase-encoding axis
    shifts: tuple[np.ndarray, ...]  # per item (positions, ndim); the k-space centre's position is 0
    segments: tuple[np.ndarray, ...]  # per item (lines along its axis,) position index in acquisition order


@dataclass(frozen=True)
class GhostingDraw(AcquisitionDraw):
    axis: np.ndarray
    period: np.ndarray
    offset: np.ndarray  # >= 1: the k-space centre is never modulated
    intensity: np.ndarray


@dataclass(frozen=True)
class ThickSliceDraw(AcquisitionDraw):
    axis: np.ndarray
    factor: np.ndarray
    order: np.ndarray
    offset: np.ndarray


def acquisition_axes(ndim: int, in_plane_only: bool) -> tuple[int, ...]:
    """The spatial axes ghosting, motion and thick slices may act along (``_PerSampleTransform._axes``)."""
    axes = tuple(a for a in IN_PLANE_AXES if a < ndim) if in_plane_only else ()
    return axes or tuple(range(ndim))


def _validate(params: AugmentationParams) -> None:
    """The CPU samplers' checks (same fields, same messages), for the transforms that fire."""
    if params.p_contrast_remap > 0:
        points = params.contrast_remap_points
        _require(points >= 2, "contrast_remap_points", f"must be at least 2, got {points}")
    if params.p_bias_field > 0:
        amplitude, order = params.bias_field_amplitude, params.bias_field_order
        _require(0 <= amplitude < 1, "bias_field_amplitude", f"must lie in [0, 1) (1 + field > 0), got {amplitude}")
        _require(order >= 1, "bias_field_order", f"must be at least 1, got {order}")
    if params.p_motion > 0:
        positions, shift = params.motion_num_positions, params.motion_max_shift_voxels
        _require(2 <= positions[0] <= positions[1], "motion_num_positions", f"needs 2 <= low <= high, got {positions}")
        _require(shift >= 0, "motion_max_shift_voxels", f"must be >= 0, got {shift}")
    if params.p_ghosting > 0:
        period, intensity = params.ghosting_period, params.ghosting_intensity
        _require(2 <= period[0] <= period[1], "ghosting_period", f"needs 2 <= low <= high, got {period}")
        _require(0 <= intensity[0] <= intensity[1] <= 1, "ghosting_intensity", f"must lie in [0, 1], got {intensity}")
    if params.p_thick_slice > 0:
        factor, orders = params.thick_slice_factor, params.thick_slice_orders
        _require(2 <= factor[0] <= factor[1], "thick_slice_factor", f"needs 2 <= low <= high, got {factor}")
        _require(len(orders) > 0 and set(orders) <= {0, 1}, "thick_slice_orders", f"must be 0 and/or 1, got {orders}")


def _draw_motion(
    params: AugmentationParams, shape: Sequence[int], axes: tuple[int, ...], rng: np.random.Generator
) -> tuple[int, np.ndarray, np.ndarray]:
    """RandomMotionTransform._augment's draw for one item."""
    axis = int(rng.choice(axes))
    lines = shape[axis]
    low, high = params.motion_num_positions
    positions = min(int(rng.integers(low, high + 1)), lines)
    cuts = np.sort(rng.choice(np.arange(1, lines), positions - 1, replace=False))
    segments = np.searchsorted(cuts, np.arange(lines), side="right")
    shifts = np.zeros((positions, len(shape)))
    reach = params.motion_max_shift_voxels
    shifts[:, list(axes)] = rng.uniform(-reach, reach, (positions, len(axes)))
    shifts[segments[lines // 2]] = 0.0  # the k-space centre's position is the labelled one
    return axis, shifts, segments


def draw_acquisition(
    params: AugmentationParams,
    batch_size: int,
    channels: int,
    spatial_shape: Sequence[int],
    rng: np.random.Generator,
    in_plane_only: bool,
) -> list[AcquisitionDraw]:
    """Every parameter of one batch, in the pipeline's order (contrast remap, bias field, motion, ghosting,
    thick slices); a transform with probability 0 is left out and draws nothing, as on the CPU."""
    _validate(params)
    shape = tuple(int(s) for s in spatial_shape)
    axes = acquisition_axes(len(shape), in_plane_only)
    draws: list[AcquisitionDraw] = []

    def picked(p: float) -> tuple[np.ndarray, int]:
        samples = np.flatnonzero(rng.uniform(size=batch_size) < p)
        return samples, len(samples) * channels

    if params.p_contrast_remap > 0:
        samples, items = picked(params.p_contrast_remap)
        levels = np.empty((items, params.contrast_remap_points))
        for i in range(items):
            non_monotone = rng.uniform() < params.contrast_remap_p_non_monotone
            drawn = rng.uniform(0.0, 1.0, params.contrast_remap_points)
            levels[i] = drawn if non_monotone else np.sort(drawn)
        draws.append(ContrastRemapDraw(samples, levels))
    if params.p_bias_field > 0:
        samples, items = picked(params.p_bias_field)
        order = params.bias_field_order
        degrees = np.indices((order + 1,) * len(shape)).sum(axis=0)
        used = (degrees > 0) & (degrees <= order)
        coefficients = np.zeros((items, *degrees.shape))
        amplitude = np.zeros(items)
        for i in range(items):
            coefficients[i] = np.where(used, rng.uniform(-1, 1, degrees.shape), 0.0)
            amplitude[i] = rng.uniform(0, params.bias_field_amplitude)
        draws.append(BiasFieldDraw(samples, coefficients, amplitude))
    if params.p_motion > 0:
        samples, items = picked(params.p_motion)
        motion = [_draw_motion(params, shape, axes, rng) for _ in range(items)]
        draws.append(
            MotionDraw(
                samples,
                np.array([m[0] for m in motion], np.int64),
                tuple(m[1] for m in motion),
                tuple(m[2] for m in motion),
            )
        )
    if params.p_ghosting > 0:
        samples, items = picked(params.p_ghosting)
        ghosts = np.zeros((items, 4))
        for i in range(items):
            axis = int(rng.choice(axes))
            period = int(rng.integers(params.ghosting_period[0], params.ghosting_period[1] + 1))
            offset = int(rng.integers(1, period))
            ghosts[i] = (axis, period, offset, rng.uniform(*params.ghosting_intensity))
        integers = ghosts[:, :3].astype(np.int64)
        draws.append(GhostingDraw(samples, integers[:, 0], integers[:, 1], integers[:, 2], ghosts[:, 3]))
    if params.p_thick_slice > 0:
        samples, items = picked(params.p_thick_slice)
        slabs = np.zeros((items, 4), np.int64)
        orders = params.thick_slice_orders
        for i in range(items):
            axis = int(rng.choice(axes))
            factor = int(rng.integers(params.thick_slice_factor[0], params.thick_slice_factor[1] + 1))
            order = orders[int(rng.integers(len(orders)))]
            slabs[i] = (axis, factor, order, int(rng.integers(factor)))
        draws.append(ThickSliceDraw(samples, *slabs.T))
    return draws


# --- applying: device, on the picked items only ------------------------------------------------------------------
def _contrast_remap(items: torch.Tensor, labels: torch.Tensor, levels: np.ndarray) -> torch.Tensor:
    """RandomContrastRemapTransform: the curve spans each item's masked range (``pediatric.contrast_mask``)."""
    count = items.shape[0]
    mask = ((items != 0) | (labels > 0)) & (labels != IGNORE_LABEL)
    flat, inside = items.reshape(count, -1), mask.reshape(count, -1)
    low = torch.where(inside, flat, math.inf).amin(1)
    high = torch.where(inside, flat, -math.inf).amax(1)
    valid = inside.any(1) & (high > low)  # else the CPU returns the item as it is
    low, high = torch.where(valid, low, 0.0), torch.where(valid, high, 1.0)
    span = (high - low)[:, None]
    points = levels.shape[1]
    steps = torch.arange(points, device=items.device, dtype=items.dtype) / (points - 1)
    curve_x = low[:, None] + span * steps
    curve_x[:, -1] = high  # np.linspace ends exactly on its stop
    curve_y = low[:, None] + span * upload(levels, items.device, items.dtype)
    remapped = remap_contrast_torch(items, mask, curve_x, curve_y)
    return torch.where(_along(valid[:, None], 0, items.ndim - 1), remapped, items)


def _bias_field(items: torch.Tensor, coefficients: np.ndarray, amplitude: np.ndarray) -> torch.Tensor:
    """RandomBiasFieldTransform: the field scaled so that its largest |value| is the drawn amplitude."""
    device, dtype = items.device, items.dtype
    field = bias_field_map_torch(items.shape[1:], upload(coefficients, device, dtype))
    largest = field.abs().flatten(1).amax(1)
    target = upload(amplitude, device, dtype)
    scale = torch.where(largest > 0, target / torch.where(largest > 0, largest, 1.0), 0.0)
    return items * (1.0 + field * _along(scale[:, None], 0, items.ndim - 1))


def _item_index(samples: np.ndarray, channels: int) -> np.ndarray:
    """The rows of (B * C, *spatial) that hold every channel of ``samples``."""
    return (samples[:, None] * channels + np.arange(channels)[None, :]).reshape(-1)


def _replace(flat: torch.Tensor, items: np.ndarray, compute: Callable[..., torch.Tensor], *args: Any) -> None:
    """``flat[items] = compute(flat[items], *args)``: the transform sees the picked items only."""
    index = upload(items, flat.device)
    flat.index_copy_(0, index, compute(flat.index_select(0, index), *args))


def _apply_draw(draw: AcquisitionDraw, flat: torch.Tensor, label: torch.Tensor, channels: int) -> None:
    """One transform on its picked items of ``flat`` (B * C, *spatial), in place; one group per axis."""
    items = _item_index(draw.samples, channels)
    if len(items) == 0:
        return
    if isinstance(draw, ContrastRemapDraw):
        labels = label.index_select(0, upload(items // channels, flat.device))
        _replace(flat, items, _contrast_remap, labels, draw.levels)
    elif isinstance(draw, BiasFieldDraw):
        _replace(flat, items, _bias_field, draw.coefficients, draw.amplitude)
    elif isinstance(draw, MotionDraw):
        for axis in np.unique(draw.axis):
            group = np.flatnonzero(draw.axis == axis)
            shifts = np.zeros((len(group), max(len(draw.shifts[i]) for i in group), flat.ndim - 1))
            for row, i in enumerate(group):
                shifts[row, : len(draw.shifts[i])] = draw.shifts[i]  # unused positions stay 0
            segments = np.stack([draw.segments[i] for i in group])
            _replace(flat, items[group], motion_blur_torch, int(axis), shifts, segments)
    elif isinstance(draw, GhostingDraw):
        for axis in np.unique(draw.axis):
            g = np.flatnonzero(draw.axis == axis)
            _replace(
                flat, items[g], kspace_ghosting_torch, int(axis), draw.period[g], draw.offset[g], draw.intensity[g]
            )
    elif isinstance(draw, ThickSliceDraw):
        for axis in np.unique(draw.axis):
            g = np.flatnonzero(draw.axis == axis)
            _replace(
                flat, items[g], simulate_thick_slices_torch, int(axis), draw.factor[g], draw.order[g], draw.offset[g]
            )
    else:
        raise TypeError(f"unknown draw {type(draw).__name__}")


def _check_inputs(image: torch.Tensor, label: torch.Tensor, generator: torch.Generator) -> None:
    where = "apply_acquisition"
    if image.ndim not in (4, 5) or not image.is_floating_point():
        raise AutosegError(
            f"{where}: image must be float (B, C, *spatial) with 2 or 3 spatial axes, got "
            f"{image.dtype} {tuple(image.shape)}"
        )
    if tuple(label.shape) != (image.shape[0], *image.shape[2:]):
        raise AutosegError(
            f"{where}: label must be (B, *spatial) = {(image.shape[0], *image.shape[2:])} (no channel"
            f" axis), got {tuple(label.shape)}"
        )
    if label.device != image.device or generator.device.type != image.device.type:
        raise AutosegError(
            f"{where}: image ({image.device}), label ({label.device}) and generator"
            f" ({generator.device}) must be on one device"
        )


def apply_acquisition(
    image: torch.Tensor,
    label: torch.Tensor,
    params: AugmentationParams,
    rng: np.random.Generator,
    generator: torch.Generator,
    in_plane_only: bool,
) -> torch.Tensor:
    """The pediatric acquisition transforms of ``pipeline._acquisition_transforms`` on a device batch.

    image ``(B, C, *spatial)`` float, label ``(B, *spatial)`` (-1 = ignore), one device. Parameters come from
    ``rng`` (``draw_acquisition``); each transform runs on its picked samples only. Returns a new image (the
    input is never written; ``image`` itself if nothing fires); the label is not changed.
    """
    _check_inputs(image, label, generator)
    batch, channels, spatial = image.shape[0], image.shape[1], tuple(image.shape[2:])
    draws = draw_acquisition(params, batch, channels, spatial, rng, in_plane_only)
    if not any(len(draw.samples) for draw in draws):
        return image
    out = image.clone(memory_format=torch.contiguous_format)  # flat rows below need a plain layout
    flat = out.view(batch * channels, *spatial)
    for draw in draws:
        _apply_draw(draw, flat, label, channels)
    return out
