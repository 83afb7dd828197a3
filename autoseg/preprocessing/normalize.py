"""Intensity normalization: one registered scheme per name, named per channel in the plan.

The built-in schemes are nnU-Net's (preprocessing/normalization/default_normalization_schemes.py). A scheme
of your own is a ``Normalizer`` subclass decorated with ``@register_normalizer("name")``.
Everything works on float32, in place, to keep the memory of the preprocessing hot path low.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from autoseg.errors import AutosegError
from autoseg.registry import Registry

if TYPE_CHECKING:  # autoseg.fingerprint imports this package (cropping), so only for the annotations
    from autoseg.fingerprint import IntensityStats

# Statistics are summed in float64 over pieces of this many voxels, so their temporaries stay small.
_CHUNK_VOXELS = 1 << 20


class Normalizer(ABC):
    """Normalizes one channel of one case."""

    # Guard against dividing by a zero standard deviation or range (nnU-Net's eps for float32 targets).
    eps: ClassVar[float] = 1e-8

    @abstractmethod
    def __call__(self, image: np.ndarray, mask: np.ndarray | None, stats: IntensityStats | None) -> np.ndarray:
        """Normalize ``image`` (float32, overwritten) and return it.

        ``mask`` (bool, same shape) is given when the plan sets ``use_mask_for_norm`` for this channel:
        True inside the body (cropped label >= 0). ``stats`` are the dataset's foreground intensities.
        """


NORMALIZERS: Registry[type[Normalizer]] = Registry("normalizer")


def register_normalizer(name: str) -> Callable[[type[Normalizer]], type[Normalizer]]:
    return NORMALIZERS.register(name)


def _chunks(image: np.ndarray, mask: np.ndarray | None) -> Iterator[np.ndarray]:
    """The (masked) voxels of ``image`` in pieces, as float64."""
    flat = image.reshape(-1)
    flat_mask = None if mask is None else mask.reshape(-1)
    for start in range(0, flat.size, _CHUNK_VOXELS):
        piece = flat[start : start + _CHUNK_VOXELS]
        if flat_mask is not None:
            piece = piece[flat_mask[start : start + _CHUNK_VOXELS]]
        yield piece.astype(np.float64)


def mean_and_std(image: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float]:
    """Mean and (population) standard deviation of ``image``, inside ``mask`` if given; two float64 passes."""
    count, total = 0, 0.0
    for piece in _chunks(image, mask):
        count += piece.size
        total += float(piece.sum())
    if count == 0:
        raise ValueError("no voxels to take statistics of")
    mean = total / count
    squares = 0.0
    for piece in _chunks(image, mask):
        piece -= mean
        squares += float(np.dot(piece, piece))
    return mean, float(np.sqrt(squares / count))


@register_normalizer("zscore")
class ZScoreNormalizer(Normalizer):
    """Per image: subtract the mean, divide by the standard deviation (inside the mask if one is used)."""

    def __call__(self, image: np.ndarray, mask: np.ndarray | None, stats: IntensityStats | None) -> np.ndarray:
        if mask is None:
            mean, std = mean_and_std(image)
            image -= np.float32(mean)
            image /= np.float32(max(std, self.eps))
            return image
        if not mask.any():
            # Nothing inside: nnU-Net's statistics would be NaN; an all-outside image stays all zero.
            image[...] = 0
            return image
        mean, std = mean_and_std(image, mask)
        image -= np.float32(mean)
        image /= np.float32(max(std, self.eps))
        # The outside is zero in every channel already (that is what made it outside), and nnU-Net relies
        # on it staying zero; setting it keeps that true for any mask a caller passes.
        image *= mask
        return image


@register_normalizer("ct")
class CTNormalizer(Normalizer):
    """Dataset-wide: clip to the foreground's 0.5-99.5 percentiles, then z-score with its mean and std."""

    def __call__(self, image: np.ndarray, mask: np.ndarray | None, stats: IntensityStats | None) -> np.ndarray:
        if stats is None:
            raise AutosegError(
                "'ct' normalization needs the dataset's foreground intensity statistics"
                " (foreground_intensity_per_channel in the plan); rerun `autoseg plan` on a fingerprint that has them"
            )
        np.clip(image, stats.percentile_00_5, stats.percentile_99_5, out=image)
        image -= np.float32(stats.mean)
        image /= np.float32(max(stats.std, self.eps))
        return image


@register_normalizer("none")
class NoNormalizer(Normalizer):
    """Leave intensities as they are (only cast to float32)."""

    def __call__(self, image: np.ndarray, mask: np.ndarray | None, stats: IntensityStats | None) -> np.ndarray:
        return image


@register_normalizer("rescale_to_0_1")
class RescaleTo01Normalizer(Normalizer):
    """Per image: map the minimum to 0 and the maximum to 1."""

    def __call__(self, image: np.ndarray, mask: np.ndarray | None, stats: IntensityStats | None) -> np.ndarray:
        image -= image.min()
        image /= np.float32(max(float(image.max()), self.eps))
        return image


def normalize_case(
    image: np.ndarray,
    label_cropped: np.ndarray | None,
    normalization: tuple[str, ...],
    use_mask_for_norm: tuple[bool, ...],
    intensity: tuple[IntensityStats, ...],
) -> np.ndarray:
    """Normalize each channel of ``image`` (C, *spatial) with its scheme; returns float32.

    A float32 ``image`` is normalized in place (and returned); other dtypes are converted first. The mask
    for ``use_mask_for_norm`` is ``label_cropped >= 0``, the region inside the body that crop_to_nonzero
    marked.
    """
    channels = image.shape[0]
    if not len(normalization) == len(use_mask_for_norm) == channels:
        raise AutosegError(
            f"the image has {channels} channels but the plan gives {len(normalization)} normalization schemes"
            f" and {len(use_mask_for_norm)} use_mask_for_norm flags; the plan was made for another dataset?"
        )
    image = image.astype(np.float32, copy=False)
    mask = None
    if any(use_mask_for_norm):
        if label_cropped is None:
            raise ValueError("use_mask_for_norm needs the cropped label map (from crop_to_nonzero)")
        mask = label_cropped >= 0
    for channel, (name, use_mask) in enumerate(zip(normalization, use_mask_for_norm)):
        normalizer = NORMALIZERS.get(name)()
        stats = intensity[channel] if channel < len(intensity) else None
        view = image[channel]
        normalized = normalizer(view, mask if use_mask else None, stats)
        if normalized is not view:
            view[...] = normalized
    return image
