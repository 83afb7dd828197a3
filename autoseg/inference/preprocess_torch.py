"""Preprocessing for prediction split in two: cropping on the CPU, normalisation and resampling on the device.

``preprocess_case`` does everything on the CPU: transpose, crop to nonzero, normalise, resample to the
configuration's spacing. On a GPU the last two are the expensive part (a cubic-spline resampling of every
channel), and a reader thread doing them can fall behind the network. Here they are split:

- ``crop_case`` (CPU, thread-safe, pure numpy): transpose and ``crop_to_nonzero``, keeping the nonzero
  mask that masked normalisation (``use_mask_for_norm``) needs. It depends only on the plan's
  ``transpose_forward``, so members of an ensemble that share it share one crop.
- ``finish_on_device``: each channel is uploaded, normalised and resampled on the device, one channel at a
  time (one cropped channel and its intermediates on the device besides the result).

Normalisation: every built-in scheme of ``autoseg.preprocessing.normalize`` has a torch twin here doing
the same float32 arithmetic, with the per-image statistics (``zscore``) summed in float64 over chunks, as
``mean_and_std`` does (float32 on Apple MPS, which has no float64). Twins are looked up by the registered
class itself, not by its name, so a subclass that changes the arithmetic never gets its parent's twin; a
scheme without a twin (a lab's own ``Normalizer``) is run by its CPU normaliser on the channel before the
upload (``register_torch_normalizer`` adds a twin).

Resampling: ``autoseg.inference.resample_torch.ProbabilityResampler`` with the plan's ``image_order``, i.e.
the very banded interpolation matrices of ``autoseg.preprocessing.resample`` moved to the device, the same
clipping and the same thick-axis rule (in-plane first, then the thick axis with ``out_of_plane_order``).

The result equals ``preprocess_case``'s image to float32 rounding (the axes are multiplied in another
order; tests/test_preprocess_torch.py), and its ``CaseProperties`` are the same, so restoring the
prediction to the input's grid is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from autoseg.errors import AutosegError
from autoseg.fingerprint import IntensityStats
from autoseg.inference.resample_torch import ProbabilityResampler
from autoseg.io import Geometry
from autoseg.plan import Configuration, Plan
from autoseg.preprocessing.case import CaseProperties, target_spacing
from autoseg.preprocessing.crop import BoundingBox, crop_to_nonzero
from autoseg.preprocessing.normalize import (
    NORMALIZERS,
    CTNormalizer,
    NoNormalizer,
    Normalizer,
    RescaleTo01Normalizer,
    ZScoreNormalizer,
)
from autoseg.preprocessing.resample import compute_new_shape

# Statistics are summed over pieces of this many voxels (32 MiB in float64), so their float64 temporaries
# stay small next to the channel; larger than the CPU's 1 << 20 because each piece costs a kernel launch.
_DEVICE_CHUNK_VOXELS = 1 << 22

# (channel (float32, normalised in place and returned), mask or None, the dataset's stats) -> channel
TorchNormalizer = Callable[[torch.Tensor, torch.Tensor | None, IntensityStats | None], torch.Tensor]

TORCH_NORMALIZERS: dict[type[Normalizer], TorchNormalizer] = {}


def register_torch_normalizer(normalizer: type[Normalizer]) -> Callable[[TorchNormalizer], TorchNormalizer]:
    """Declare a function the torch twin of ``normalizer`` (the registered class itself, not a name)."""

    def decorator(twin: TorchNormalizer) -> TorchNormalizer:
        TORCH_NORMALIZERS[normalizer] = twin
        return twin

    return decorator


@dataclass
class CroppedCase:
    """A case transposed and cropped to its nonzero box on the CPU: what ``finish_on_device`` starts from."""

    case_id: str
    geometry: Geometry  # of the input files, untransposed
    transpose_forward: tuple[int, ...]
    image: np.ndarray  # (C, *cropped) in the input's dtype
    inside: np.ndarray  # (*cropped) bool: the hole-filled nonzero mask, use_mask_for_norm's mask
    shape_before_crop: tuple[int, ...]  # transposed
    bbox: BoundingBox  # transposed axes
    spacing_mm: tuple[float, ...]  # the input's spacing, transposed


@dataclass
class DevicePreprocessedCase:
    """``preprocess_case``'s image and properties, the image a float32 tensor on the device."""

    image: torch.Tensor  # (C, *shape_after_resampling) float32
    properties: CaseProperties


def crop_case(images: np.ndarray, geometry: Geometry, transpose_forward: tuple[int, ...], case_id: str) -> CroppedCase:
    """``preprocess_case``'s first steps (CPU): ``images`` (C, z, y, x) transposed and cropped to nonzero."""
    axes = tuple(int(a) for a in transpose_forward)
    image = images.transpose(0, *(a + 1 for a in axes))
    spacing = tuple(float(geometry.spacing_mm[a]) for a in axes)
    shape_before_crop = tuple(int(s) for s in image.shape[1:])
    cropped, label_cropped, bbox = crop_to_nonzero(image)
    return CroppedCase(
        case_id=case_id,
        geometry=geometry,
        transpose_forward=axes,
        image=cropped,
        inside=label_cropped >= 0,  # normalize_case's mask: crop_to_nonzero marks the outside with -1
        shape_before_crop=shape_before_crop,
        bbox=tuple((int(a), int(b)) for a, b in bbox),
        spacing_mm=spacing,
    )


def finish_on_device(
    cropped: CroppedCase, plan: Plan, configuration: Configuration, device: torch.device | str
) -> DevicePreprocessedCase:
    """Normalise and resample ``cropped`` to the configuration's spacing on ``device``, as ``preprocess_case``."""
    device = torch.device(device)
    if tuple(plan.transpose_forward) != cropped.transpose_forward:
        raise ValueError(
            f"case {cropped.case_id}: cropped with transpose {cropped.transpose_forward}, but the plan of"
            f" configuration {configuration.name!r} transposes with {tuple(plan.transpose_forward)}"
        )
    channels = cropped.image.shape[0]
    normalization, use_mask = configuration.normalization, configuration.use_mask_for_norm
    if not len(normalization) == len(use_mask) == channels:
        raise AutosegError(
            f"case {cropped.case_id}: the image has {channels} channels but the plan gives {len(normalization)}"
            f" normalization schemes and {len(use_mask)} use_mask_for_norm flags; the plan was made for"
            " another dataset?"
        )
    intensity = plan.foreground_intensity_per_channel
    spacing = cropped.spacing_mm
    shape_after_crop = tuple(int(s) for s in cropped.image.shape[1:])
    new_spacing = target_spacing(configuration, spacing)
    new_shape = compute_new_shape(shape_after_crop, spacing, new_spacing)
    resampling = configuration.resampling
    resampler = ProbabilityResampler(
        shape_after_crop, new_shape, spacing, new_spacing, resampling, device, order=resampling.image_order
    )
    mask = torch.from_numpy(cropped.inside).to(device) if any(use_mask) else None
    result = torch.empty((channels, *resampler.new_shape), dtype=torch.float32, device=device)
    for channel, (name, masked) in enumerate(zip(normalization, use_mask)):
        normalizer = NORMALIZERS.get(name)
        stats = intensity[channel] if channel < len(intensity) else None
        twin = TORCH_NORMALIZERS.get(normalizer)
        if twin is None:  # a scheme of one's own without a twin: its CPU normaliser, then the upload
            array = cropped.image[channel].astype(np.float32, copy=True)
            array = normalizer()(array, cropped.inside if masked else None, stats)
            volume = _upload_float32(np.asarray(array, dtype=np.float32), device)
        else:
            volume = twin(_upload_float32(cropped.image[channel], device), mask if masked else None, stats)
        result[channel] = resampler(volume)
        del volume
    properties = CaseProperties(
        schema_version=CaseProperties.SCHEMA_VERSION,
        case_id=cropped.case_id,
        geometry=cropped.geometry,
        shape_before_crop=cropped.shape_before_crop,
        bbox=cropped.bbox,
        shape_after_crop=shape_after_crop,
        spacing_after_crop_mm=tuple(float(s) for s in spacing),
        spacing_mm=tuple(float(s) for s in new_spacing),
        shape_after_resampling=tuple(int(s) for s in resampler.new_shape),
        class_location_counts={},
    )
    return DevicePreprocessedCase(result, properties)


def _upload_float32(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A float32 copy of ``array`` on ``device`` that the twins may overwrite (never ``array``'s memory).

    The array goes up in its own dtype (half the transfer for int16 CT) and is converted there.
    """
    source = torch.from_numpy(np.ascontiguousarray(array))
    tensor = source.to(device)
    if tensor.dtype != torch.float32:
        return tensor.float()
    return tensor.clone() if tensor.data_ptr() == source.data_ptr() else tensor


def _statistics_dtype(device: torch.device) -> torch.dtype:
    """float64 as ``mean_and_std``, except on Apple MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def mean_and_std_torch(image: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean_and_std`` on the device: mean and population std (0-dim tensors) of ``image``, inside ``mask``.

    Two passes in float64 over chunks, without a device-to-host sync. An empty mask gives mean and std 0
    (``mean_and_std`` raises; the callers treat an empty mask apart).
    """
    dtype = _statistics_dtype(image.device)
    flat = image.reshape(-1)
    flat_mask = None if mask is None else mask.reshape(-1)
    total = torch.zeros((), dtype=dtype, device=image.device)
    count = torch.tensor(flat.numel(), dtype=dtype, device=image.device)
    if flat_mask is not None:
        count = flat_mask.sum(dtype=dtype)
    pieces = range(0, flat.numel(), _DEVICE_CHUNK_VOXELS)
    for start in pieces:
        piece = flat[start : start + _DEVICE_CHUNK_VOXELS].to(dtype, copy=True)  # a copy: filled below
        if flat_mask is not None:
            piece.masked_fill_(~flat_mask[start : start + _DEVICE_CHUNK_VOXELS], 0.0)
        total += piece.sum()
    mean = total / count.clamp_min(1)
    squares = torch.zeros((), dtype=dtype, device=image.device)
    for start in pieces:
        piece = flat[start : start + _DEVICE_CHUNK_VOXELS].to(dtype) - mean
        if flat_mask is not None:
            piece.masked_fill_(~flat_mask[start : start + _DEVICE_CHUNK_VOXELS], 0.0)
        squares += torch.dot(piece, piece)
    return mean, torch.sqrt(squares / count.clamp_min(1))


@register_torch_normalizer(ZScoreNormalizer)
def zscore_torch(image: torch.Tensor, mask: torch.Tensor | None, stats: IntensityStats | None) -> torch.Tensor:
    """``ZScoreNormalizer``: the same float32 steps; an empty mask leaves all zeros, as there."""
    mean, std = mean_and_std_torch(image, mask)
    image -= mean.float()
    image /= std.clamp_min(ZScoreNormalizer.eps).float()
    if mask is not None:
        # the outside is zero as on the CPU (``image *= mask``); masked_fill also clears what an empty
        # mask's division by eps made of the image
        image.masked_fill_(~mask, 0.0)
    return image


@register_torch_normalizer(CTNormalizer)
def ct_torch(image: torch.Tensor, mask: torch.Tensor | None, stats: IntensityStats | None) -> torch.Tensor:
    """``CTNormalizer``: clip to the foreground's 0.5-99.5 percentiles, z-score with its mean and std."""
    if stats is None:
        raise AutosegError(
            "'ct' normalization needs the dataset's foreground intensity statistics"
            " (foreground_intensity_per_channel in the plan); rerun `autoseg plan` on a fingerprint that has them"
        )
    # float32 bounds and constants, as numpy casts them for the float32 image
    image.clamp_(float(np.float32(stats.percentile_00_5)), float(np.float32(stats.percentile_99_5)))
    image -= float(np.float32(stats.mean))
    image /= float(np.float32(max(stats.std, CTNormalizer.eps)))
    return image


@register_torch_normalizer(NoNormalizer)
def none_torch(image: torch.Tensor, mask: torch.Tensor | None, stats: IntensityStats | None) -> torch.Tensor:
    """``NoNormalizer``: the intensities as they are (already float32)."""
    return image


@register_torch_normalizer(RescaleTo01Normalizer)
def rescale_to_0_1_torch(image: torch.Tensor, mask: torch.Tensor | None, stats: IntensityStats | None) -> torch.Tensor:
    """``RescaleTo01Normalizer``: the minimum to 0, the maximum to 1."""
    image -= image.min()
    image /= image.max().clamp_min(RescaleTo01Normalizer.eps)
    return image
