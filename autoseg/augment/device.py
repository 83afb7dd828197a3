"""nnU-Net's training augmentation in torch ops, batched over the samples, on the batch's own device.

A second implementation of ``pipeline.train_transforms`` (batchgenerators on the CPU), reading the same
``AugmentationParams`` and ``SpatialSetup``: the same transforms in the same order (spatial -> acquisition
(pediatric) -> noise, blur, brightness, contrast, low resolution, inverted gamma, gamma -> mirroring), with the
same probabilities and parameter distributions, and each op computing what its batchgenerators twin computes.

Two steps, so that tests can fix the parameters:

* ``DeviceAugmenter.sample`` draws every per-sample random number (a few per sample) on the host from
  ``np.random.default_rng(seed)`` into a ``BatchParameters`` of numpy arrays;
* ``DeviceAugmenter.apply`` runs the ops; the random fields (elastic displacement, Gaussian noise) come from a
  ``torch.Generator`` on the batch's device. ``__call__`` seeds both from one integer, so a batch is a pure
  function of its inputs and the seed (not bit-identical to the CPU chain: the random streams differ).

Conventions kept from batchgenerators (``augment_spatial`` and ``utils``):

* Spatial: the patch's zero-centred voxel grid is elastically displaced, rotated (``rotate_coords_3d``: the
  coordinates times ``Rx @ Ry @ Rz``), multiplied by the scale (a factor above 1 shows more of the sample)
  and centred on the sample's centre ``(S - 1) / 2``; ``grid_sample`` with ``align_corners=True`` then maps
  those voxel indices onto voxel centres exactly as ``map_coordinates`` does. As scipy's ``mode='constant'``,
  a point outside ``[0, S - 1]`` on any axis is outside (image 0, label -1) rather than blended with the
  padding. Labels: each label's indicator is interpolated linearly and the argmax taken (ties go to the
  nearest-neighbour label, as batchgenerators' ``seg_tiebreak='nearest'``), computed from the 2**dims corner
  labels of each output voxel, so the cost does not grow with the number of labels; ``order_label`` 0 is
  nearest. A sample without rotation, scaling or elastic deformation is centre-cropped at ``(S - P) // 2``, as
  ``center_crop_aug`` does. Dummy 2D folds the first axis into the channels and transforms each slice alike.
* Gaussian noise: batchgenerators draws a "variance" from ``gaussian_noise_variance`` and passes it to
  ``np.random.normal`` as the standard deviation; so does this twin, so that both add the same noise.
* Blur: scipy's Gaussian kernel (radius ``int(4 sigma + 0.5)``) with scipy's ``'reflect'`` border, one
  separable pass per axis, a sigma per channel.
* Simulated low resolution: skimage's ``resize`` (scipy ``zoom`` with ``grid_mode``, edge border, spline
  results clipped to the input's range) down and back up, at any ``order_downsample``/``order_upsample``
  (cubic included; torch has no cubic 3D ``interpolate``): splines are separable, so each axis is one matrix
  product with a (size_out, size_in) matrix that scipy builds on the host by resizing unit vectors.

The acquisition (pediatric) transforms live in ``autoseg.augment.device_pediatric``, imported only when one
of their probabilities is above 0: its ``apply_acquisition(image, label, params, rng, generator,
in_plane_only)`` runs between the spatial and the intensity steps, drawing from the host generator where
``sample`` left off (``BatchParameters.rng_state``). ``unsupported`` says when these parameters cannot run here.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from autoseg.augment.params import AugmentationParams
from autoseg.augment.pipeline import IGNORE_LABEL, SpatialSetup
from autoseg.errors import AutosegError

__all__ = ["BatchParameters", "DeviceAugmenter", "gaussian_smooth", "unsupported"]

GAUSSIAN_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default, used by batchgenerators' blur and elastic field
GAMMA_EPSILON = 1e-7  # batchgenerators augment_gamma's epsilon in the range division
RETAIN_STATS_EPSILON = 1e-8  # batchgenerators augment_gamma: x / (std + 1e-8) * old_std
# normalised-coordinate slack for "inside [0, S-1]": float32 grids land 1e-7 off the border where float64 does not
INSIDE_TOLERANCE = 1e-6
ACQUISITION_FIELDS = ("p_bias_field", "p_contrast_remap", "p_motion", "p_ghosting", "p_thick_slice")
PEDIATRIC_MODULE = "autoseg.augment.device_pediatric"
SEED_MODULUS = 2**64  # torch.Generator.manual_seed and default_rng both take any non-negative int below this
SUPPORTED_SPATIAL_ORDERS = (0, 1)  # grid_sample: nearest, (bi/tri)linear; it has no cubic 3D


@dataclass(frozen=True)
class BatchParameters:
    """Every per-sample random number of one batch (B samples, C channels); drawn by ``DeviceAugmenter.sample``.

    Boolean arrays say whether a transform fires; the value arrays hold the drawn value for every sample (also
    where it does not fire, where it is unused). Spatial axes are those the spatial transform acts on: all of
    them, or the two in-plane axes in dummy-2D mode.
    """

    elastic: np.ndarray  # (B,) bool
    elastic_alpha: np.ndarray  # (B,) displacement magnitude, batchgenerators' alpha
    elastic_sigma: np.ndarray  # (B,) smoothing of the displacement field, voxels
    rotation: np.ndarray  # (B,) bool
    angles: np.ndarray  # (B, len(setup.rotation_rad)) radians, 0 where the sample or that axis does not rotate
    scaling: np.ndarray  # (B,) bool
    scale: np.ndarray  # (B, spatial axes) coordinate factors, 1 where the sample does not scale
    noise: np.ndarray  # (B,) bool
    noise_std: np.ndarray  # (B,) drawn from gaussian_noise_variance and used as std, as batchgenerators does
    blur: np.ndarray  # (B,) bool: the sample is picked
    blur_channel: np.ndarray  # (B, C) bool: picked sample and picked channel
    blur_sigma: np.ndarray  # (B, C) voxels
    brightness: np.ndarray  # (B,) bool
    brightness_factor: np.ndarray  # (B, C)
    contrast: np.ndarray  # (B,) bool
    contrast_factor: np.ndarray  # (B, C)
    low_resolution: np.ndarray  # (B,) bool
    low_resolution_channel: np.ndarray  # (B, C) bool
    low_resolution_zoom: np.ndarray  # (B, C)
    gamma_inverted: np.ndarray  # (B,) bool
    gamma_inverted_value: np.ndarray  # (B, C); column 0 for every channel unless gamma_per_channel
    gamma: np.ndarray  # (B,) bool
    gamma_value: np.ndarray  # (B, C)
    mirror: np.ndarray  # (B, len(setup.mirror_axes)) bool
    # the host generator's state after these draws: the acquisition step continues the same stream from it
    rng_state: dict[str, Any]

    @property
    def spatially_modified(self) -> np.ndarray:
        """(B,) bool: resampled through a grid (as batchgenerators' ``modified_coords``), else centre-cropped."""
        return self.elastic | self.rotation | self.scaling


def _acquisition_active(params: AugmentationParams) -> bool:
    return any(getattr(params, name) > 0 for name in ACQUISITION_FIELDS)


def unsupported(params: AugmentationParams) -> str | None:
    """Why ``params`` cannot run on the device (None: they can); the CPU pipeline runs everything."""
    if params.order_image not in SUPPORTED_SPATIAL_ORDERS:
        return f"AugmentationParams.order_image={params.order_image}: the device twin interpolates with order 0 or 1"
    if params.order_label not in SUPPORTED_SPATIAL_ORDERS:
        return f"AugmentationParams.order_label={params.order_label}: the device twin resamples labels with 0 or 1"
    if _acquisition_active(params):
        try:
            importlib.import_module(PEDIATRIC_MODULE)
        except ImportError as error:
            active = [name for name in ACQUISITION_FIELDS if getattr(params, name) > 0]
            return f"{', '.join(active)} > 0 but {PEDIATRIC_MODULE} cannot be imported ({error})"
    return None


# --- sampling ---------------------------------------------------------------------------------------------------
def _split_range(rng: np.random.Generator, bounds: tuple[float, float], size: tuple[int, ...]) -> np.ndarray:
    """batchgenerators' draw for scale, contrast and gamma: half the time U(low, 1) if low < 1, else U(1, high)."""
    low, high = bounds
    below = rng.uniform(low, 1.0, size)
    above = rng.uniform(max(low, 1.0), high, size)
    return np.where((rng.random(size) < 0.5) & (low < 1), below, above)


def _fires(rng: np.random.Generator, p: float, size: int | tuple[int, ...]) -> np.ndarray:
    return rng.random(size) < p


def _per_channel(values: np.ndarray, per_channel: bool) -> np.ndarray:
    """(B, C) draws; without ``per_channel`` the first channel's value for every channel."""
    return values if per_channel else np.repeat(values[:, :1], values.shape[1], axis=1)


def upload(values: Any, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host numbers (numpy, lists, CPU tensors) as a tensor on ``device`` without waiting for it; a tensor
    already on a device is only converted there.

    ``torch.as_tensor(values, device="cuda")`` copies from pageable memory and then synchronises the stream,
    so every drawn parameter would make the host wait for the augmentation kernels queued before it. Through
    pinned memory the copy is queued like a kernel and the host goes on launching.
    """
    if isinstance(values, torch.Tensor) and values.device.type != "cpu":
        return values.to(device=device, dtype=dtype)
    tensor = torch.as_tensor(values, dtype=dtype)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


# --- ops on rows (N, *spatial) ------------------------------------------------------------------------------------
def _gaussian_kernels(sigma: np.ndarray) -> tuple[np.ndarray, int]:
    """scipy's ``_gaussian_kernel1d`` for each sigma, zero-padded to the largest radius: (N, 2 R + 1), R."""
    radii = (GAUSSIAN_TRUNCATE * np.asarray(sigma, dtype=float) + 0.5).astype(int)
    radius = int(radii.max())
    x = np.arange(-radius, radius + 1)
    kernels = np.exp(-0.5 * x[None] ** 2 / np.asarray(sigma, dtype=float)[:, None] ** 2) * (
        abs(x)[None] <= radii[:, None]
    )
    return kernels / kernels.sum(1, keepdims=True), radius


def _reflect_indices(size: int, radius: int, device: torch.device) -> torch.Tensor:
    """Indices of scipy's ``'reflect'`` extension (d c b a | a b c d | d c b a) by ``radius`` on both sides."""
    index = torch.arange(-radius, size + radius, device=device) % (2 * size)
    return torch.where(index >= size, 2 * size - 1 - index, index)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def gaussian_smooth(
    rows: torch.Tensor, sigma: np.ndarray, mode: str = "reflect", axes: Sequence[int] | None = None
) -> torch.Tensor:
    """``scipy.ndimage.gaussian_filter(row, sigma[n], mode=mode)`` for every row of ``rows`` (N, *spatial).

    ``mode`` is ``'reflect'`` (scipy's default, the blur) or ``'constant'`` (zeros, the elastic field); one
    separable grouped convolution per axis in ``axes`` (default: all).
    """
    if mode not in ("reflect", "constant"):
        raise ValueError(f"mode must be 'reflect' or 'constant', got {mode!r}")
    spatial = rows.ndim - 1
    host_kernels, radius = _gaussian_kernels(sigma)  # a few numbers: built on the host, in float64 as scipy
    kernels = upload(host_kernels, rows.device, rows.dtype)
    out = rows
    for axis in range(spatial) if axes is None else axes:
        dim = axis + 1
        if mode == "reflect":
            padded = out.index_select(dim, _reflect_indices(out.shape[dim], radius, rows.device))
        else:
            pad = [0, 0] * spatial
            pad[2 * (spatial - 1 - axis)] = pad[2 * (spatial - 1 - axis) + 1] = radius
            padded = F.pad(out, pad)
        shape = [len(rows), 1] + [1] * spatial
        shape[2 + axis] = 2 * radius + 1
        out = _CONV[spatial](padded[None], kernels.view(shape), groups=len(rows))[0]
    return out


def _on_rows(
    rows: torch.Tensor, picked: np.ndarray, op: Callable[[torch.Tensor, np.ndarray], torch.Tensor]
) -> torch.Tensor:
    """``op`` on the picked rows of (N, ...) only (``op`` gets them and their indices), the rest unchanged."""
    index = np.flatnonzero(picked)
    if index.size == 0:
        return rows
    at = upload(index, rows.device)
    return rows.index_copy(0, at, op(rows.index_select(0, at), index))


def _column(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """Per-row numbers as a (N, 1, ..., 1) tensor broadcasting over ``like`` (N, *spatial)."""
    return upload(values, like.device, like.dtype).view(-1, *[1] * (like.ndim - 1))


def _contrast(rows: torch.Tensor, factor: np.ndarray) -> torch.Tensor:
    """batchgenerators ``augment_contrast`` (preserve_range): about the mean, clipped to the old range."""
    dims = tuple(range(1, rows.ndim))
    mean = rows.mean(dims, keepdim=True)
    low, high = rows.amin(dims, keepdim=True), rows.amax(dims, keepdim=True)
    return torch.minimum(torch.maximum((rows - mean) * _column(factor, rows) + mean, low), high)


def _gamma(rows: torch.Tensor, gamma: np.ndarray, invert: bool, retain_stats: bool, per_channel: bool) -> torch.Tensor:
    """batchgenerators ``augment_gamma`` on rows (a channel each, or a whole sample without per_channel)."""
    dims = tuple(range(1, rows.ndim))
    x = -rows if invert else rows
    mean, std = x.mean(dims, keepdim=True), x.std(dims, keepdim=True, unbiased=False)
    low = x.amin(dims, keepdim=True)
    spread = x.amax(dims, keepdim=True) - low
    # per channel batchgenerators multiplies back by (range + eps), for whole samples by the range alone
    back = spread + GAMMA_EPSILON if per_channel else spread
    x = torch.pow((x - low) / (spread + GAMMA_EPSILON), _column(gamma, rows)) * back + low
    if retain_stats:
        x = x - x.mean(dims, keepdim=True)
        x = x / (x.std(dims, keepdim=True, unbiased=False) + RETAIN_STATS_EPSILON) * std + mean
    return -x if invert else x


@functools.lru_cache(maxsize=512)
def _resize_matrix(size_in: int, size_out: int, order: int) -> np.ndarray:
    """(size_out, size_in): skimage ``resize`` of a 1D signal (scipy ``zoom``, ``grid_mode``, edge border) as a
    matrix, built on the host by resizing each unit vector. Spline resizing is separable, so one matrix per axis
    reproduces the CPU's N-D resize at any order, cubic included."""
    factor = size_out / size_in
    units = np.eye(size_in)
    return np.stack([ndimage.zoom(u, factor, order=order, mode="nearest", grid_mode=True) for u in units], axis=1)


def _resize(rows: torch.Tensor, size: Sequence[int], order: int) -> torch.Tensor:
    """skimage ``resize(row, size, order, mode='edge', anti_aliasing=False)`` of every row of (N, *spatial)."""
    low = rows.flatten(1).amin(1).view(-1, *[1] * (rows.ndim - 1))
    high = rows.flatten(1).amax(1).view(-1, *[1] * (rows.ndim - 1))
    for axis, (size_in, size_out) in enumerate(zip(rows.shape[1:], size)):
        if size_in != size_out:
            matrix = upload(_resize_matrix(size_in, size_out, order), rows.device, rows.dtype)
            rows = torch.movedim(torch.tensordot(matrix, rows, dims=([1], [axis + 1])), 0, axis + 1)
    # skimage clips spline results to the input's range (clip=True); orders 0 and 1 stay inside it anyway
    return torch.minimum(torch.maximum(rows, low), high) if order > 1 else rows


def low_resolution(rows: torch.Tensor, target: Sequence[int], order_down: int, order_up: int) -> torch.Tensor:
    """Rows (N, *spatial) down to ``target`` and back (batchgenerators ``augment_linear_downsampling_scipy``)."""
    return _resize(_resize(rows, target, order_down), rows.shape[1:], order_up)


# --- spatial --------------------------------------------------------------------------------------------------------
def _rotation_matrix(angles: np.ndarray) -> np.ndarray:
    """batchgenerators' rotation: ``rotate_coords_3d`` multiplies coordinates by ``Rx @ Ry @ Rz`` from the right."""
    if len(angles) == 1:
        c, s = math.cos(angles[0]), math.sin(angles[0])
        return np.array([[c, -s], [s, c]])
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rx @ ry @ rz


def _centre_crop(x: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    starts = [(s - p) // 2 for s, p in zip(x.shape[2:], patch)]
    return x[(slice(None), slice(None), *(slice(a, a + p) for a, p in zip(starts, patch)))]


def _resample_label(
    label: torch.Tensor, grid: torch.Tensor, inside: torch.Tensor, order: int, dense: bool | None = None
) -> torch.Tensor:
    """Labels (N, L, *S) at ``grid`` (N, *P, dims), as batchgenerators' ``interpolate_img(is_seg=True)``.

    Order 1 scores each label by the linear-interpolation weights of the corners holding it (its interpolated
    indicator) and takes the best; ties go to the nearest corner's label if it is among them, else to the
    smallest label. Only the 2**dims corner labels can win, so the cost does not grow with the number of labels.
    Order 0 takes the nearest corner (scipy rounds halves up). Outside the sample: IGNORE_LABEL.

    Inside a region all corners agree, so on a CPU only the boundary voxels are scored (``dense=False``). On
    other devices (``dense=None`` picks) every voxel is scored: finding the boundary voxels would need
    ``nonzero``, which waits for the device, and the dense vote is cheap there. Both give the same labels.
    """
    n, channels = label.shape[:2]
    sample = label.shape[2:]
    dims = len(sample)
    strides = [math.prod(sample[axis + 1 :]) for axis in range(dims)]
    # voxel index coordinates in axis order (align_corners=True), flattened over the patch: (N, P) each
    coords = [((grid[..., dims - 1 - axis] + 1) * ((sample[axis] - 1) / 2)).flatten(1) for axis in range(dims)]
    floors = [c.floor() for c in coords]
    fractions = [c - f for c, f in zip(coords, floors)]
    flat_label = label.flatten(2)

    def index(axis: int, offset: torch.Tensor | int) -> torch.Tensor:  # flat-index term of one axis, (N, P)
        return (floors[axis] + offset).clamp(0, sample[axis] - 1).long() * strides[axis]

    def labels_at(terms: Sequence[torch.Tensor]) -> torch.Tensor:  # (N, L, P)
        flat = terms[0]
        for term in terms[1:]:
            flat = flat + term
        return flat_label.gather(2, flat[:, None].expand(-1, channels, -1))

    nearest = labels_at([index(axis, (fractions[axis] >= 0.5).long()) for axis in range(dims)])
    if order == 0:
        result = nearest
    else:
        corners = list(itertools.product((0, 1), repeat=dims))
        terms = [(index(axis, 0), index(axis, 1)) for axis in range(dims)]
        labels = torch.stack([labels_at([terms[a][o] for a, o in enumerate(offsets)]) for offsets in corners], -1)
        labels = labels.view(-1, len(corners))  # (N L P, K)
        if dense is None:
            dense = label.device.type != "cpu"
        if dense:
            local = [f[:, None].expand(-1, channels, -1).reshape(-1) for f in fractions]
            result = _vote(labels, local, nearest.reshape(-1), corners)
        else:
            result = labels[:, 0].clone()
            mixed = (labels != labels[:, :1]).any(1).nonzero().squeeze(1)
            if len(mixed):
                voxels = coords[0].shape[1]
                at = (mixed // (channels * voxels)) * voxels + mixed % voxels  # row of (N, P) tensors
                local = [f.reshape(-1).index_select(0, at) for f in fractions]
                near = nearest.reshape(-1).index_select(0, mixed)
                result.index_copy_(0, mixed, _vote(labels.index_select(0, mixed), local, near, corners))
    return result.view(n, channels, *grid.shape[1:-1]).masked_fill(~inside[:, None], IGNORE_LABEL)


def _vote(
    corner: torch.Tensor, fractions: Sequence[torch.Tensor], near: torch.Tensor, corners: Sequence[tuple[int, ...]]
) -> torch.Tensor:
    """The label of each row of ``corner`` (M, K) with the largest summed linear weight (from ``fractions``, one
    (M,) per axis); ties go to ``near`` (M,) when it is among the best, else to the smallest label."""
    weights = torch.ones(corner.shape, device=corner.device)  # (M, K) linear weights
    for k, offsets in enumerate(corners):
        for f, o in zip(fractions, offsets):
            weights[:, k] *= f if o else 1 - f
    scores = torch.zeros_like(weights)  # each corner's label's summed weight, one corner at a time: (M, K) memory
    for k in range(len(corners)):
        scores += (corner == corner[:, k : k + 1]) * weights[:, k : k + 1]
    top = scores == scores.amax(-1, keepdim=True)
    smallest = torch.where(top, corner, torch.iinfo(corner.dtype).max).amin(-1)
    nearest_on_top = ((corner == near[:, None]) & top).any(-1)
    return torch.where(nearest_on_top, near, smallest)


class DeviceAugmenter:
    """``pipeline.train_augmenter``'s transforms in torch ops on the batch's device; see the module docstring.

    ``__call__`` takes image (B, C, *sample) float32 and label (B, *sample) int16 (no channel axis; -1 ignored)
    and returns image (B, C, *patch) float32 and label (B, *patch) int16 on the same device.
    """

    def __init__(self, patch_size: Sequence[int], setup: SpatialSetup, params: AugmentationParams) -> None:
        reason = unsupported(params)
        if reason is not None:
            raise AutosegError(f"DeviceAugmenter: {reason}; use the CPU pipeline (pipeline.train_augmenter)")
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) not in (2, 3) or len(setup.sample_size) != len(self.patch_size):
            raise AutosegError(
                f"DeviceAugmenter: patch_size {self.patch_size} and setup.sample_size {setup.sample_size} must both"
                " have 2 or 3 entries"
            )
        if setup.do_dummy_2d and len(self.patch_size) != 3:
            raise AutosegError(f"DeviceAugmenter: dummy 2D needs a 3D patch, got {self.patch_size}")
        self.setup = setup
        self.params = params

    @property
    def _spatial_dims(self) -> int:
        return 2 if self.setup.do_dummy_2d else len(self.patch_size)

    # --- parameters ---
    def sample(self, batch_size: int, num_channels: int, seed: int) -> BatchParameters:
        """All per-sample random numbers of a batch, from ``np.random.default_rng(seed)``."""
        return self._draw(np.random.default_rng(seed % SEED_MODULUS), batch_size, num_channels)

    def _draw(self, rng: np.random.Generator, batch: int, channels: int) -> BatchParameters:
        p, setup = self.params, self.setup
        bc = (batch, channels)
        elastic = _fires(rng, p.p_elastic, batch)
        alpha = rng.uniform(*p.elastic_alpha, batch)
        sigma = rng.uniform(*p.elastic_sigma, batch)
        rotation = _fires(rng, p.p_rotation, batch)
        n_angles = len(setup.rotation_rad)
        axis_rotates = rng.random((batch, n_angles)) <= p.p_rotation_per_axis
        angles = np.stack([rng.uniform(low, high, batch) for low, high in setup.rotation_rad], axis=1)
        angles = np.where(axis_rotates & rotation[:, None], angles, 0.0)
        scaling = _fires(rng, p.p_scaling, batch)
        scale_axes = self._spatial_dims if p.independent_scale_per_axis else 1
        scale = _split_range(rng, p.scaling_range, (batch, scale_axes))
        scale = np.where(scaling[:, None], np.broadcast_to(scale, (batch, self._spatial_dims)), 1.0)
        noise = _fires(rng, p.p_gaussian_noise, batch)
        noise_std = rng.uniform(*p.gaussian_noise_variance, batch)
        blur = _fires(rng, p.p_gaussian_blur, batch)
        blur_channel = blur[:, None] & (rng.random(bc) <= p.blur_p_per_channel)  # batchgenerators: <=
        blur_sigma = _per_channel(rng.uniform(*p.blur_sigma, bc), p.blur_different_sigma_per_channel)
        brightness = _fires(rng, p.p_brightness, batch)
        brightness_factor = rng.uniform(*p.brightness_range, bc)  # per channel, as the pipeline configures it
        contrast = _fires(rng, p.p_contrast, batch)
        contrast_factor = _split_range(rng, p.contrast_range, bc)  # ContrastAugmentationTransform: per channel
        low_res = _fires(rng, p.p_low_resolution, batch)
        low_res_channel = low_res[:, None] & (rng.random(bc) < p.low_resolution_p_per_channel)
        zooms = _per_channel(rng.uniform(*p.low_resolution_zoom, bc), p.low_resolution_per_channel)
        gamma_inverted = _fires(rng, p.p_gamma_inverted, batch)
        gamma_inverted_value = _per_channel(_split_range(rng, p.gamma_range, bc), p.gamma_per_channel)
        gamma = _fires(rng, p.p_gamma, batch)
        gamma_value = _per_channel(_split_range(rng, p.gamma_range, bc), p.gamma_per_channel)
        mirror = _fires(rng, p.p_mirror_per_axis, (batch, len(setup.mirror_axes)))
        return BatchParameters(
            elastic=elastic,
            elastic_alpha=alpha,
            elastic_sigma=sigma,
            rotation=rotation,
            angles=angles,
            scaling=scaling,
            scale=scale,
            noise=noise,
            noise_std=noise_std,
            blur=blur,
            blur_channel=blur_channel,
            blur_sigma=blur_sigma,
            brightness=brightness,
            brightness_factor=brightness_factor,
            contrast=contrast,
            contrast_factor=contrast_factor,
            low_resolution=low_res,
            low_resolution_channel=low_res_channel,
            low_resolution_zoom=zooms,
            gamma_inverted=gamma_inverted,
            gamma_inverted_value=gamma_inverted_value,
            gamma=gamma,
            gamma_value=gamma_value,
            mirror=mirror,
            rng_state=dict(rng.bit_generator.state),
        )

    # --- the whole chain ---
    def __call__(self, image: torch.Tensor, label: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        parameters = self.sample(image.shape[0], image.shape[1], seed)
        generator = torch.Generator(device=image.device)
        generator.manual_seed(seed % SEED_MODULUS)
        return self.apply(image, label, parameters, generator)

    def apply(
        self, image: torch.Tensor, label: torch.Tensor, parameters: BatchParameters, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The chain with fixed ``parameters``; random fields (elastic, noise) from ``generator``."""
        self._check(image, label)
        image, label = self._spatial(image.float(), label, parameters, generator)
        if _acquisition_active(self.params):
            image = self._acquisition(image, label, parameters, generator)
        image = self._intensity(image, parameters, generator)
        image, label = self._mirror(image, label, parameters)
        return image.contiguous(), label.to(torch.int16).contiguous()

    def _check(self, image: torch.Tensor, label: torch.Tensor) -> None:
        dims = len(self.patch_size)
        sample = tuple(image.shape[2:])
        problem = None
        if image.ndim != dims + 2 or not image.is_floating_point():
            problem = (
                f"image must be a float (B, C, *sample) tensor with {dims} spatial axes,"
                f" got {image.dtype} {tuple(image.shape)}"
            )
        elif label.shape != (image.shape[0], *sample) or label.device != image.device:
            problem = (
                f"label must be (B, *sample) = {(image.shape[0], *sample)} on {image.device},"
                f" got {tuple(label.shape)} on {label.device}"
            )
        elif any(s < p for s, p in zip(sample, self.patch_size)):
            problem = f"the sample {sample} is smaller than the patch {self.patch_size}; cut setup.sample_size"
        elif self.setup.do_dummy_2d and sample[0] != self.patch_size[0]:
            problem = (
                f"dummy 2D keeps the first axis: the sample's {sample[0]} must equal the patch's {self.patch_size[0]}"
            )
        if problem:
            raise AutosegError(f"DeviceAugmenter: {problem}")

    def _acquisition(
        self, image: torch.Tensor, label: torch.Tensor, parameters: BatchParameters, generator: torch.Generator
    ) -> torch.Tensor:
        module = importlib.import_module(PEDIATRIC_MODULE)
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = parameters.rng_state
        result: torch.Tensor = module.apply_acquisition(
            image, label, self.params, rng, generator, self.setup.do_dummy_2d
        )
        return result

    def _spatial(
        self, image: torch.Tensor, label: torch.Tensor, parameters: BatchParameters, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, channels = image.shape[:2]
        if self.setup.do_dummy_2d:  # fold the first axis into the channels, as Convert3DTo2DTransform
            depth = image.shape[2]
            folded, labels = image.flatten(1, 2), label
            patch = self.patch_size[1:]
        else:
            folded, labels, patch = image, label[:, None], self.patch_size
        out_image, out_label = _centre_crop(folded, patch), _centre_crop(labels, patch)
        modified = np.flatnonzero(parameters.spatially_modified)
        if modified.size:
            at = upload(modified, image.device)
            grid = self._grid(parameters, modified, folded.shape[2:], patch, generator, image.device)
            inside = (grid.abs() <= 1 + INSIDE_TOLERANCE).all(-1)
            mode = "bilinear" if self.params.order_image == 1 else "nearest"
            moved = F.grid_sample(folded.index_select(0, at), grid, mode=mode, align_corners=True)
            moved = moved * inside[:, None]
            moved_label = _resample_label(labels.index_select(0, at), grid, inside, self.params.order_label)
            out_image = out_image.index_copy(0, at, moved)
            out_label = out_label.index_copy(0, at, moved_label)
        if self.setup.do_dummy_2d:
            out_image = out_image.reshape(batch, channels, depth, *patch)
            return out_image, out_label
        return out_image, out_label[:, 0]

    def _grid(
        self,
        parameters: BatchParameters,
        rows: np.ndarray,
        sample: Sequence[int],
        patch: Sequence[int],
        generator: torch.Generator,
        device: torch.device,
    ) -> torch.Tensor:
        """grid_sample's (n, *patch, dims) grid: index coordinates ``M (mesh + elastic) + (S - 1) / 2``, normalised."""
        dims = len(patch)
        to_normal = np.diag(2.0 / np.maximum(np.array(sample, dtype=float) - 1, 1))
        linear = np.stack(
            [to_normal @ np.diag(parameters.scale[b]) @ _rotation_matrix(parameters.angles[b]).T for b in rows]
        )  # (n, dims, dims): patch index offsets -> normalised sample coordinates
        half_patch = np.diag((np.array(patch, dtype=float) - 1) / 2)
        theta = np.zeros((len(rows), dims, dims + 1))
        theta[:, :, :dims] = (linear @ half_patch)[:, ::-1, ::-1]  # grid_sample orders axes x, y(, z)
        grid = F.affine_grid(upload(theta, device, torch.float32), [len(rows), 1, *patch], align_corners=True)
        elastic = np.flatnonzero(parameters.elastic[rows])
        if elastic.size:
            chosen = rows[elastic]
            field = torch.rand((elastic.size * dims, *patch), generator=generator, device=device) * 2 - 1
            sigma = np.repeat(parameters.elastic_sigma[chosen], dims)
            field = gaussian_smooth(field, sigma, mode="constant").view(elastic.size, dims, *patch)
            field = field * _column(parameters.elastic_alpha[chosen], field)
            normal = torch.einsum("nij,nj...->ni...", upload(linear[elastic], device, torch.float32), field)
            at = upload(elastic, device)
            grid = grid.index_add(0, at, normal.flip(1).movedim(1, -1))
        return grid

    # --- intensity ---
    def _intensity(self, image: torch.Tensor, parameters: BatchParameters, generator: torch.Generator) -> torch.Tensor:
        p = self.params
        batch, channels = image.shape[:2]
        spatial = image.shape[2:]

        def per_channel(mask: np.ndarray) -> np.ndarray:  # (B,) or (B, C) -> (B * C,)
            return np.broadcast_to(mask.reshape(batch, -1), (batch, channels)).reshape(-1)

        def noise(rows: torch.Tensor, index: np.ndarray) -> torch.Tensor:
            draw = torch.randn(rows.shape, generator=generator, device=rows.device, dtype=rows.dtype)
            return rows + draw * _column(parameters.noise_std[index], rows)

        image = _on_rows(image, parameters.noise, noise)  # one std for all channels (per_channel=False)
        rows = image.reshape(batch * channels, *spatial)
        rows = _on_rows(
            rows,
            per_channel(parameters.blur_channel),
            lambda x, i: gaussian_smooth(x, parameters.blur_sigma.reshape(-1)[i], mode="reflect"),
        )
        rows = _on_rows(
            rows,
            per_channel(parameters.brightness),
            lambda x, i: x * _column(parameters.brightness_factor.reshape(-1)[i], x),
        )
        rows = _on_rows(
            rows, per_channel(parameters.contrast), lambda x, i: _contrast(x, parameters.contrast_factor.reshape(-1)[i])
        )
        rows = _on_rows(rows, per_channel(parameters.low_resolution_channel), self._low_resolution(parameters))
        image = rows.reshape(image.shape)

        def gamma(values: np.ndarray, invert: bool) -> Callable[[torch.Tensor, np.ndarray], torch.Tensor]:
            return lambda x, i: _gamma(x, values[i], invert, p.gamma_retain_stats, p.gamma_per_channel)

        for fired, values, invert in (
            (parameters.gamma_inverted, parameters.gamma_inverted_value, True),
            (parameters.gamma, parameters.gamma_value, False),
        ):
            if p.gamma_per_channel:  # a row per channel
                rows = image.reshape(batch * channels, *spatial)
                image = _on_rows(rows, per_channel(fired), gamma(values.reshape(-1), invert)).reshape(image.shape)
            else:  # a row per sample, one gamma for all its channels
                image = _on_rows(image, fired, gamma(values[:, 0], invert))
        return image

    def _low_resolution(self, parameters: BatchParameters) -> Callable[[torch.Tensor, np.ndarray], torch.Tensor]:
        p = self.params
        zooms = parameters.low_resolution_zoom.reshape(-1)

        def op(rows: torch.Tensor, index: np.ndarray) -> torch.Tensor:
            shape = np.array(rows.shape[1:])
            targets = np.round(shape[None] * zooms[index][:, None]).astype(int)
            if self.setup.do_dummy_2d:
                targets[:, 0] = shape[0]  # the thick axis stays, as ignore_axes=(0,)
            out = rows.clone()
            for target in np.unique(targets, axis=0):  # rows of one target size together
                same = np.flatnonzero((targets == target).all(1))
                at = upload(same, rows.device)
                done = low_resolution(rows.index_select(0, at), target.tolist(), p.order_downsample, p.order_upsample)
                out = out.index_copy(0, at, done)
            return out

        return op

    # --- mirroring ---
    def _mirror(
        self, image: torch.Tensor, label: torch.Tensor, parameters: BatchParameters
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for column, axis in enumerate(self.setup.mirror_axes):
            flips = parameters.mirror[:, column]
            if not flips.any():
                continue
            mask = upload(flips, image.device)
            image = torch.where(mask.view(-1, *[1] * (image.ndim - 1)), image.flip(axis + 2), image)
            label = torch.where(mask.view(-1, *[1] * (label.ndim - 1)), label.flip(axis + 1), label)
        return image, label
