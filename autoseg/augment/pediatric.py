"""Acquisition artefacts and tissue-contrast changes common in pediatric MRI, as batchgenerators transforms.

Five transforms: a smooth multiplicative bias field, k-space ghosting, motion between k-space segments,
a random grey/white contrast remapping (infant T1/T2 contrast is reduced or inverted), and thick slices.
Each ``Random*Transform`` draws its parameters from numpy's global generator, as batchgenerators does, so
``ComposeAugmenter``'s seeding makes a batch reproducible, and then calls a pure, deterministic twin
(``bias_field``, ``kspace_ghosting``, ``motion_blur``, ``remap_contrast``, ``simulate_thick_slices``) on one
channel of one sample; tests drive the twins directly.

All five change the image only: the label stays where it is, and so does the spatial shape. The transforms
fire per sample with ``p_per_sample``; once a sample is picked, every channel gets its own parameters (each
channel is its own acquisition, with its own coil field, motion and slice thickness).

The images are z-scored (signed), so two choices differ from a scanner's magnitude image: the k-space
artefacts keep the real part of the inverse FFT (a magnitude would fold negative intensities to positive
ones), and the bias field multiplies about 0 (about the foreground mean), as the brightness augmentation does.

``axes`` limits the spatial axes along which ghosting, motion and thick slices act: the pipeline passes the
in-plane axes (1, 2) in dummy-2D mode, whose first axis already holds thick slices; 2D and isotropic 3D
patches use every axis. Motion is translation only: a translation is a phase ramp in k-space, whereas a
rotated position would need one image resampling per position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.fft
from batchgenerators.transforms.abstract_transforms import AbstractTransform
from numpy.polynomial.legendre import legvander

from autoseg.errors import AutosegError

__all__ = [
    "RandomBiasFieldTransform",
    "RandomContrastRemapTransform",
    "RandomGhostingTransform",
    "RandomMotionTransform",
    "RandomThickSliceTransform",
    "bias_field",
    "bias_field_map",
    "contrast_mask",
    "kspace_ghosting",
    "motion_blur",
    "remap_contrast",
    "simulate_thick_slices",
]


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise AutosegError(f"AugmentationParams.{field}: {message}")


# --- deterministic twins: one channel, spatial array (*spatial) -------------------------------------------------
def bias_field_map(shape: Sequence[int], coefficients: np.ndarray) -> np.ndarray:
    """The field ``sum c[i,j,k] P_i(z) P_j(y) P_k(x)`` (Legendre polynomials on [-1, 1] along each axis).

    ``coefficients`` has one axis per spatial axis, ``order + 1`` entries each. Every |P_n| <= 1 on [-1, 1],
    so ``|field| <= sum |c|``.
    """
    coefficients = np.asarray(coefficients, dtype=np.float64)
    if coefficients.ndim != len(shape):
        raise ValueError(f"coefficients have {coefficients.ndim} axes, the image {len(shape)} ({tuple(shape)})")
    field = coefficients
    for n, degree in zip(shape, coefficients.shape):  # separable: contract one axis at a time (einsum is ~50x slower)
        basis = legvander(np.linspace(-1.0, 1.0, n), degree - 1)  # (n, degree)
        field = np.tensordot(field, basis, axes=([0], [1]))  # the new spatial axis goes last
    return field


def bias_field(image: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
    """``image * (1 + field)`` with ``field = bias_field_map(image.shape, coefficients)``."""
    factor = (1.0 + bias_field_map(image.shape, coefficients)).astype(image.dtype, copy=False)
    return image * factor


def kspace_ghosting(image: np.ndarray, axis: int, period: int, offset: int, intensity: float) -> np.ndarray:
    """Periodic ghosts: every ``period``-th k-space line along ``axis`` (FFT index ``k ≡ offset mod period``)
    is scaled by ``1 - intensity``.

    For ``period`` dividing the length ``N``, the result is ``f - intensity/period * sum_j f(x - j N/period)
    * cos(2 pi offset j / period)`` (real part): copies of the image at multiples of FOV/period. An
    ``offset`` of 0 modulates the k-space centre too, and so changes the mean by the factor ``1 - intensity``.
    """
    n = image.shape[axis]
    spectrum = scipy.fft.fft(image, axis=axis)  # scipy keeps float32 in single precision: ~5x numpy's speed
    lines = (np.arange(n) - offset) % period == 0
    weight = np.where(lines, 1.0 - intensity, 1.0)
    spectrum *= weight.reshape([-1 if a == axis else 1 for a in range(image.ndim)])
    return scipy.fft.ifft(spectrum, axis=axis).real.astype(image.dtype, copy=False)


def motion_blur(image: np.ndarray, axis: int, shifts: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """Rigid motion during the scan: each k-space line along ``axis`` comes from one of several positions.

    ``shifts`` (positions, ndim) are translations in voxels (a translation is a phase ramp in k-space, so
    fractional shifts are sinc-interpolated and borders wrap around, as in a real acquisition).
    ``segments`` (one entry per line along ``axis``) says which position each line is acquired at, in
    acquisition order from the lowest to the highest frequency (line ``j`` has frequency ``j - N // 2``).
    One position with shift 0 everywhere returns the image; one position with integer shift ``s`` everywhere
    returns ``np.roll(image, s)``.
    """
    shifts = np.asarray(shifts, dtype=np.float64).reshape(-1, image.ndim)
    segments = np.asarray(segments, dtype=np.int64)
    if segments.shape != (image.shape[axis],) or segments.min() < 0 or segments.max() >= len(shifts):
        raise ValueError(f"segments must give a position index < {len(shifts)} for each of {image.shape[axis]} lines")
    per_line = shifts[np.fft.ifftshift(segments)]  # (lines in FFT order, ndim)
    spectrum = scipy.fft.fftn(image)
    for d, n in enumerate(image.shape):  # the ramp is separable: one small (line, frequency) factor per axis
        freq = np.fft.fftfreq(n).reshape([-1 if a == d else 1 for a in range(image.ndim)])
        shift_of_line = per_line[:, d].reshape([-1 if a == axis else 1 for a in range(image.ndim)])
        spectrum *= np.exp(-2j * np.pi * freq * shift_of_line)
    return scipy.fft.ifftn(spectrum).real.astype(image.dtype, copy=False)


def remap_contrast(
    image: np.ndarray, mask: np.ndarray, curve_x: np.ndarray, curve_y: np.ndarray, epsilon: float = 1e-7
) -> np.ndarray:
    """Map the intensities inside ``mask`` through the piecewise-linear curve (curve_x, curve_y), then restore
    the mean and standard deviation they had inside the mask (as GammaTransform's ``retain_stats``).

    A rising curve keeps the order of the tissue intensities, a falling one inverts it, a non-monotone one
    can swap some classes and keep others (infant T1: white matter darker than grey, CSF still darkest).
    Outside the mask the image is left as it is; a mask of fewer than 2 voxels, or a curve that flattens
    the masked intensities to one value, leaves the image unchanged.
    """
    out = image.copy()
    values = image[mask].astype(np.float64)
    if values.size < 2:
        return out
    mapped = np.interp(values, curve_x, curve_y)
    if mapped.std() < epsilon:
        return out
    mapped = (mapped - mapped.mean()) / mapped.std() * values.std() + values.mean()
    out[mask] = mapped
    return out


def contrast_mask(image: np.ndarray, label: np.ndarray | None, ignore_label: int = -1) -> np.ndarray:
    """Where the contrast is remapped: non-zero image or foreground label, never the padding (``ignore_label``).

    With nnU-Net's masked normalisation the background is exactly 0, so this is the head or brain (labelled
    or not); without it, it is the whole sampled image. Padding (label -1, image 0) is always excluded.
    """
    if label is None:
        return image != 0
    return ((image != 0) | (label > 0)) & (label != ignore_label)


def simulate_thick_slices(image: np.ndarray, axis: int, factor: int, order: int = 0, offset: int = 0) -> np.ndarray:
    """Average slabs of ``factor`` slices along ``axis`` (a thick slice averages the tissue it covers), then
    resample back to the original number of slices.

    Slabs start at ``offset`` (a first, thinner slab covers the slices before it); the last slab may be
    thinner too. ``order`` 0 repeats each slab's mean over its slices; 1 interpolates linearly between slab
    centres (clamped at both ends).
    """
    n = image.shape[axis]
    starts = np.arange(offset % factor, n, factor)
    if len(starts) == 0 or starts[0] != 0:  # an axis shorter than the offset: one slab from 0
        starts = np.concatenate([[0], starts])
    stops = np.append(starts[1:], n)
    counts = stops - starts
    shape = [-1 if a == axis else 1 for a in range(image.ndim)]
    means = np.add.reduceat(image.astype(np.float64), starts, axis=axis) / counts.reshape(shape)
    if order == 0 or len(starts) == 1:
        out = np.repeat(means, counts, axis=axis) if len(starts) > 1 else np.broadcast_to(means, image.shape)
        return np.ascontiguousarray(out, dtype=image.dtype)
    if order != 1:
        raise ValueError(f"order must be 0 or 1, got {order}")
    centres = (starts + stops - 1) / 2.0
    positions = np.arange(n, dtype=np.float64)
    left = np.clip(np.searchsorted(centres, positions, side="right") - 1, 0, len(centres) - 2)
    weight = np.clip((positions - centres[left]) / (centres[left + 1] - centres[left]), 0.0, 1.0).reshape(shape)
    out = np.take(means, left, axis=axis) * (1.0 - weight) + np.take(means, left + 1, axis=axis) * weight
    return out.astype(image.dtype)


# --- samplers ----------------------------------------------------------------------------------------------------
class _PerSampleTransform(AbstractTransform):
    """Calls ``_augment(channel, label, axes)`` on each channel of each sample picked with ``p_per_sample``."""

    def __init__(
        self, p_per_sample: float, axes: Sequence[int] | None = None, data_key: str = "data", label_key: str = "seg"
    ) -> None:
        self.p_per_sample = p_per_sample
        self.axes = None if axes is None else tuple(axes)  # spatial axes it may act along; None: all
        self.data_key = data_key
        self.label_key = label_key

    def _axes(self, ndim: int) -> tuple[int, ...]:
        axes = tuple(range(ndim)) if self.axes is None else tuple(a for a in self.axes if a < ndim)
        return axes or tuple(range(ndim))

    def __call__(self, **data_dict: Any) -> dict[str, Any]:
        data = data_dict[self.data_key]
        seg = data_dict.get(self.label_key)
        axes = self._axes(data.ndim - 2)
        for b in range(len(data)):
            if np.random.uniform() < self.p_per_sample:
                label = None if seg is None else seg[b, 0]
                for c in range(data.shape[1]):
                    data[b, c] = self._augment(data[b, c], label, axes)
        return data_dict

    def _augment(self, image: np.ndarray, label: np.ndarray | None, axes: tuple[int, ...]) -> np.ndarray:
        raise NotImplementedError


class RandomBiasFieldTransform(_PerSampleTransform):
    """Smooth multiplicative field, a Legendre polynomial of total degree <= ``order`` without constant term,
    scaled so that its largest deviation is ``a ~ U(0, amplitude)``: ``image * (1 + field)``."""

    def __init__(self, amplitude: float, order: int, p_per_sample: float, **kwargs: Any) -> None:
        _require(0 <= amplitude < 1, "bias_field_amplitude", f"must lie in [0, 1) (1 + field > 0), got {amplitude}")
        _require(order >= 1, "bias_field_order", f"must be at least 1, got {order}")
        super().__init__(p_per_sample, **kwargs)
        self.amplitude = amplitude
        self.order = order

    def _augment(self, image: np.ndarray, label: np.ndarray | None, axes: tuple[int, ...]) -> np.ndarray:
        degrees = np.indices((self.order + 1,) * image.ndim).sum(axis=0)
        coefficients = np.where((degrees > 0) & (degrees <= self.order), np.random.uniform(-1, 1, degrees.shape), 0)
        largest = np.abs(bias_field_map(image.shape, coefficients)).max()
        if largest == 0:
            return image
        return bias_field(image, coefficients * np.random.uniform(0, self.amplitude) / largest)


class RandomGhostingTransform(_PerSampleTransform):
    """Periodic k-space modulation along a random axis of ``axes``; the k-space centre is never modulated
    (offset >= 1), so the image mean stays (TorchIO's RandomGhosting restores the centre likewise)."""

    def __init__(
        self, period: tuple[int, int], intensity: tuple[float, float], p_per_sample: float, **kwargs: Any
    ) -> None:
        _require(2 <= period[0] <= period[1], "ghosting_period", f"needs 2 <= low <= high, got {period}")
        _require(0 <= intensity[0] <= intensity[1] <= 1, "ghosting_intensity", f"must lie in [0, 1], got {intensity}")
        super().__init__(p_per_sample, **kwargs)
        self.period = period
        self.intensity = intensity

    def _augment(self, image: np.ndarray, label: np.ndarray | None, axes: tuple[int, ...]) -> np.ndarray:
        axis = int(np.random.choice(axes))
        period = int(np.random.randint(self.period[0], self.period[1] + 1))
        offset = int(np.random.randint(1, period))
        return kspace_ghosting(image, axis, period, offset, float(np.random.uniform(*self.intensity)))


class RandomMotionTransform(_PerSampleTransform):
    """2-4 head positions during the scan, each holding a contiguous run of k-space lines along a random
    phase-encoding axis; the run with the k-space centre is the reference position (shift 0), where the
    label is, and the others are translated by up to ``max_shift`` voxels along each axis of ``axes``."""

    def __init__(self, num_positions: tuple[int, int], max_shift: float, p_per_sample: float, **kwargs: Any) -> None:
        _require(
            2 <= num_positions[0] <= num_positions[1],
            "motion_num_positions",
            f"needs 2 <= low <= high, got {num_positions}",
        )
        _require(max_shift >= 0, "motion_max_shift_voxels", f"must be >= 0, got {max_shift}")
        super().__init__(p_per_sample, **kwargs)
        self.num_positions = num_positions
        self.max_shift = max_shift

    def _augment(self, image: np.ndarray, label: np.ndarray | None, axes: tuple[int, ...]) -> np.ndarray:
        axis = int(np.random.choice(axes))
        lines = image.shape[axis]
        positions = min(int(np.random.randint(self.num_positions[0], self.num_positions[1] + 1)), lines)
        cuts = np.sort(np.random.choice(np.arange(1, lines), positions - 1, replace=False))
        segments = np.searchsorted(cuts, np.arange(lines), side="right")
        shifts = np.zeros((positions, image.ndim))
        shifts[:, list(axes)] = np.random.uniform(-self.max_shift, self.max_shift, (positions, len(axes)))
        shifts[segments[lines // 2]] = 0.0  # the k-space centre's position is the labelled one
        return motion_blur(image, axis, shifts, segments)


class RandomContrastRemapTransform(_PerSampleTransform):
    """A random piecewise-linear intensity curve over the masked intensity range (``contrast_mask``), rising
    through sorted random values, or with ``p_non_monotone`` through unsorted ones; mean and standard
    deviation inside the mask are kept."""

    def __init__(
        self, num_points: int, p_non_monotone: float, p_per_sample: float, ignore_label: int = -1, **kwargs: Any
    ) -> None:
        _require(num_points >= 2, "contrast_remap_points", f"must be at least 2, got {num_points}")
        super().__init__(p_per_sample, **kwargs)
        self.num_points = num_points
        self.p_non_monotone = p_non_monotone
        self.ignore_label = ignore_label

    def _augment(self, image: np.ndarray, label: np.ndarray | None, axes: tuple[int, ...]) -> np.ndarray:
        mask = contrast_mask(image, label, self.ignore_label)
        non_monotone = np.random.uniform() < self.p_non_monotone
        levels = np.random.uniform(0, 1, self.num_points)
        if not mask.any():
            return image
        low, high = float(image[mask].min()), float(image[mask].max())
        if high <= low:
            return image
        curve_y = low + (high - low) * (levels if non_monotone else np.sort(levels))
        return remap_contrast(image, mask, np.linspace(low, high, self.num_points), curve_y)


class RandomThickSliceTransform(_PerSampleTransform):
    """Slabs of ``factor ~ U{low..high}`` slices along a random axis of ``axes``, at a random slab phase, and
    back with an interpolation order drawn from ``orders``."""

    def __init__(self, factor: tuple[int, int], orders: Sequence[int], p_per_sample: float, **kwargs: Any) -> None:
        _require(2 <= factor[0] <= factor[1], "thick_slice_factor", f"needs 2 <= low <= high, got {factor}")
        _require(len(orders) > 0 and set(orders) <= {0, 1}, "thick_slice_orders", f"must be 0 and/or 1, got {orders}")
        super().__init__(p_per_sample, **kwargs)
        self.factor = factor
        self.orders = tuple(orders)

    def _augment(self, image: np.ndarray, label: np.ndarray | None, axes: tuple[int, ...]) -> np.ndarray:
        axis = int(np.random.choice(axes))
        factor = int(np.random.randint(self.factor[0], self.factor[1] + 1))
        order = self.orders[int(np.random.randint(len(self.orders)))]
        return simulate_thick_slices(image, axis, factor, order, offset=int(np.random.randint(factor)))
