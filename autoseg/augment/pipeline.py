"""nnU-Net v2's training augmentation on the CPU, built from batchgenerators transforms.

``spatial_setup`` decides from the patch size how to rotate and mirror and how large a sample to cut;
``train_transforms`` builds the transform chain; a ``BatchAugmenter`` applies a chain to one batch
reproducibly from an integer seed. The loader only knows the ``BatchAugmenter`` protocol, so a GPU
implementation (reading the same ``AugmentationParams``) can replace the CPU one later.

Arrays follow batchgenerators: image ``(B, C, *spatial)`` under the key ``"data"``, label ``(B, 1, *spatial)``
under ``"seg"``. Labels keep -1 where the sample was padded or rotation pulled in the outside: the loss
ignores it (nnU-Net v2 turns it into background instead).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from batchgenerators.augmentations.utils import rotate_coords_2d, rotate_coords_3d
from batchgenerators.transforms.abstract_transforms import AbstractTransform, Compose
from batchgenerators.transforms.color_transforms import (
    BrightnessMultiplicativeTransform,
    ContrastAugmentationTransform,
    GammaTransform,
)
from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
from batchgenerators.transforms.spatial_transforms import SpatialTransform

from autoseg.augment.params import AugmentationParams
from autoseg.augment.pediatric import (
    RandomBiasFieldTransform,
    RandomContrastRemapTransform,
    RandomGhostingTransform,
    RandomMotionTransform,
    RandomThickSliceTransform,
)

IGNORE_LABEL = -1  # label value outside the sampled image; the loss ignores it
DATA_KEY = "data"  # batchgenerators' key names
LABEL_KEY = "seg"


@dataclass(frozen=True)
class SpatialSetup:
    """How a patch size is augmented spatially (nnU-Net's configure_rotation_dummyDA_mirroring...)."""

    # (low, high) in radians for each angle SpatialTransform draws: three (x, y, z) for 3D patches, one
    # in-plane angle for 2D patches and for the dummy-2D mode
    rotation_rad: tuple[tuple[float, float], ...]
    do_dummy_2d: bool  # anisotropic 3D patch: rotate and scale each slice in-plane only
    mirror_axes: tuple[int, ...]  # spatial axes mirrored in training, and so allowed for test-time mirroring
    sample_size: tuple[int, ...]  # the enlarged size cut before spatial augmentation


def _symmetric_rad(degrees: float) -> tuple[float, float]:
    return (-math.radians(degrees), math.radians(degrees))


def enlarged_size(
    patch_size: Sequence[int], rotation_rad: Sequence[tuple[float, float]], scale_range: tuple[float, float]
) -> tuple[int, ...]:
    """nnU-Net's ``get_patch_size``: the sample size from which rotation and scaling can cut ``patch_size``.

    Each axis rotates the patch's corner vector by its largest angle (capped at 90 degrees) and keeps the
    largest extent per axis; then the result is divided by the smallest scale factor.
    """
    coords = np.array(patch_size, dtype=float)
    extent = coords.copy()
    angles = [min(max(abs(lo), abs(hi)), math.pi / 2) for lo, hi in rotation_rad]
    if len(coords) == 3:
        for axis, angle in enumerate(angles):
            per_axis = [0.0, 0.0, 0.0]
            per_axis[axis] = angle
            extent = np.maximum(extent, np.abs(rotate_coords_3d(coords, *per_axis)))
    else:
        extent = np.maximum(extent, np.abs(rotate_coords_2d(coords, angles[0])))
    return tuple(int(e) for e in extent / min(scale_range))


def spatial_setup(patch_size: Sequence[int], params: AugmentationParams | None = None) -> SpatialSetup:
    params = params or AugmentationParams()
    patch = tuple(int(p) for p in patch_size)
    if len(patch) == 2:
        elongated = max(patch) / min(patch) > params.elongated_2d_ratio
        degrees = params.rotation_2d_elongated_deg if elongated else params.rotation_2d_deg
        rotation: tuple[tuple[float, float], ...] = (_symmetric_rad(degrees),)
        return SpatialSetup(rotation, False, (0, 1), enlarged_size(patch, rotation, params.sample_size_scale_range))
    if len(patch) != 3:
        raise ValueError(f"patch_size must have 2 or 3 entries, got {patch}")
    if max(patch) / patch[0] > params.anisotropy_threshold:
        rotation = (_symmetric_rad(params.rotation_2d_deg),)
        in_plane = enlarged_size(patch[1:], rotation, params.sample_size_scale_range)
        return SpatialSetup(rotation, True, (0, 1, 2), (patch[0], *in_plane))
    rotation = (_symmetric_rad(params.rotation_3d_deg),) * 3
    return SpatialSetup(rotation, False, (0, 1, 2), enlarged_size(patch, rotation, params.sample_size_scale_range))


class Convert3DTo2DTransform(AbstractTransform):
    """Fold the first spatial axis into the channels: (B, C, z, y, x) -> (B, C*z, y, x), for dummy 2D."""

    def __call__(self, **data_dict: Any) -> dict[str, Any]:
        for key in (DATA_KEY, LABEL_KEY):
            array = data_dict.get(key)
            if array is not None:
                data_dict[f"{key}_shape_3d"] = array.shape
                data_dict[key] = array.reshape(array.shape[0], array.shape[1] * array.shape[2], *array.shape[3:])
        return data_dict


class Convert2DTo3DTransform(AbstractTransform):
    """Undo Convert3DTo2DTransform; the in-plane size may have changed in between."""

    def __call__(self, **data_dict: Any) -> dict[str, Any]:
        for key in (DATA_KEY, LABEL_KEY):
            shape = data_dict.pop(f"{key}_shape_3d", None)
            if shape is not None:
                array = data_dict[key]
                data_dict[key] = array.reshape(shape[0], shape[1], shape[2], *array.shape[2:])
        return data_dict


class MirrorAxesTransform(AbstractTransform):
    """Flip each allowed spatial axis of every sample with ``p_per_axis``, image and label alike.

    batchgenerators' MirrorTransform fixes the per-axis probability at 0.5; this one takes it as a value.
    """

    def __init__(self, axes: Sequence[int], p_per_axis: float) -> None:
        self.axes = tuple(axes)
        self.p_per_axis = p_per_axis

    def __call__(self, **data_dict: Any) -> dict[str, Any]:
        data = data_dict[DATA_KEY]
        seg = data_dict.get(LABEL_KEY)
        for b in range(len(data)):
            for axis in self.axes:
                if np.random.uniform() < self.p_per_axis:
                    data[b] = np.flip(data[b], axis + 1).copy()
                    if seg is not None:
                        seg[b] = np.flip(seg[b], axis + 1).copy()
        return data_dict


def _spatial_transform(patch_size: Sequence[int], setup: SpatialSetup, params: AugmentationParams) -> SpatialTransform:
    final = tuple(patch_size[1:]) if setup.do_dummy_2d else tuple(patch_size)
    angles = list(setup.rotation_rad) + [(0.0, 0.0)] * (3 - len(setup.rotation_rad))
    return SpatialTransform(
        final,
        patch_center_dist_from_border=None,
        do_elastic_deform=params.p_elastic > 0,
        alpha=params.elastic_alpha,
        sigma=params.elastic_sigma,
        p_el_per_sample=params.p_elastic,
        do_rotation=params.p_rotation > 0,
        angle_x=angles[0],
        angle_y=angles[1],
        angle_z=angles[2],
        p_rot_per_sample=params.p_rotation,
        p_rot_per_axis=params.p_rotation_per_axis,
        do_scale=params.p_scaling > 0,
        scale=params.scaling_range,
        p_scale_per_sample=params.p_scaling,
        independent_scale_for_each_axis=params.independent_scale_per_axis,
        border_mode_data="constant",
        border_cval_data=0,
        order_data=params.order_image,
        border_mode_seg="constant",
        border_cval_seg=IGNORE_LABEL,
        order_seg=params.order_label,
        random_crop=False,  # the sampler already placed the patch; cut its centre
        data_key=DATA_KEY,
        label_key=LABEL_KEY,
    )


def _gamma(params: AugmentationParams, invert: bool, p: float) -> GammaTransform:
    """Gamma keeping the intensity statistics; ``invert`` applies it to the inverted image (nnU-Net: both)."""
    return GammaTransform(
        params.gamma_range,
        invert_image=invert,
        per_channel=params.gamma_per_channel,
        retain_stats=params.gamma_retain_stats,
        p_per_sample=p,
    )


def _acquisition_transforms(setup: SpatialSetup, params: AugmentationParams) -> list[tuple[float, AbstractTransform]]:
    """Pediatric robustness (augment/pediatric.py), before nnU-Net's intensity chain: tissue contrast, then
    the coil's bias field, then k-space motion and ghosting, then slice thickness; noise and blur follow."""
    # dummy 2D: the first axis already holds the thick slices; k-space artefacts and thicker slices in-plane only
    axes = (1, 2) if setup.do_dummy_2d else None
    return [
        (
            params.p_contrast_remap,
            RandomContrastRemapTransform(
                params.contrast_remap_points,
                params.contrast_remap_p_non_monotone,
                p_per_sample=params.p_contrast_remap,
                ignore_label=IGNORE_LABEL,
            ),
        ),
        (
            params.p_bias_field,
            RandomBiasFieldTransform(
                params.bias_field_amplitude, params.bias_field_order, p_per_sample=params.p_bias_field
            ),
        ),
        (
            params.p_motion,
            RandomMotionTransform(
                params.motion_num_positions, params.motion_max_shift_voxels, p_per_sample=params.p_motion, axes=axes
            ),
        ),
        (
            params.p_ghosting,
            RandomGhostingTransform(
                params.ghosting_period, params.ghosting_intensity, p_per_sample=params.p_ghosting, axes=axes
            ),
        ),
        (
            params.p_thick_slice,
            RandomThickSliceTransform(
                params.thick_slice_factor, params.thick_slice_orders, p_per_sample=params.p_thick_slice, axes=axes
            ),
        ),
    ]


def _intensity_transforms(setup: SpatialSetup, params: AugmentationParams) -> list[AbstractTransform]:
    candidates: list[tuple[float, AbstractTransform]] = [
        *_acquisition_transforms(setup, params),
        (
            params.p_gaussian_noise,
            GaussianNoiseTransform(params.gaussian_noise_variance, p_per_sample=params.p_gaussian_noise),
        ),
        (
            params.p_gaussian_blur,
            GaussianBlurTransform(
                params.blur_sigma,
                different_sigma_per_channel=params.blur_different_sigma_per_channel,
                p_per_channel=params.blur_p_per_channel,
                p_per_sample=params.p_gaussian_blur,
            ),
        ),
        (
            params.p_brightness,
            BrightnessMultiplicativeTransform(
                params.brightness_range, per_channel=True, p_per_sample=params.p_brightness
            ),
        ),
        (params.p_contrast, ContrastAugmentationTransform(params.contrast_range, p_per_sample=params.p_contrast)),
        (
            params.p_low_resolution,
            SimulateLowResolutionTransform(
                zoom_range=params.low_resolution_zoom,
                per_channel=params.low_resolution_per_channel,
                p_per_channel=params.low_resolution_p_per_channel,
                order_downsample=params.order_downsample,
                order_upsample=params.order_upsample,
                p_per_sample=params.p_low_resolution,
                ignore_axes=(0,) if setup.do_dummy_2d else None,  # keep the thick axis as it is
            ),
        ),
        (params.p_gamma_inverted, _gamma(params, invert=True, p=params.p_gamma_inverted)),
        (params.p_gamma, _gamma(params, invert=False, p=params.p_gamma)),
    ]
    return [transform for p, transform in candidates if p > 0]  # a transform that never fires is left out


def train_transforms(
    patch_size: Sequence[int], setup: SpatialSetup, params: AugmentationParams | None = None
) -> Compose:
    """The training chain: spatial (with dummy-2D folding), intensity, mirroring; nnU-Net v2's order."""
    params = params or AugmentationParams()
    transforms: list[AbstractTransform] = []
    if setup.do_dummy_2d:
        transforms.append(Convert3DTo2DTransform())
    transforms.append(_spatial_transform(patch_size, setup, params))
    if setup.do_dummy_2d:
        transforms.append(Convert2DTo3DTransform())
    transforms.extend(_intensity_transforms(setup, params))
    if setup.mirror_axes and params.p_mirror_per_axis > 0:
        transforms.append(MirrorAxesTransform(setup.mirror_axes, params.p_mirror_per_axis))
    return Compose(transforms)


def validation_transforms() -> Compose:
    """Nothing: validation patches are cut at the final size and fed as they are."""
    return Compose([])


class BatchAugmenter(Protocol):
    """Augment one batch; the result must be a pure function of the inputs and ``seed``.

    image ``(B, C, *sample)`` float32 and label ``(B, 1, *sample)`` int16 in; image ``(B, C, *patch)`` float32
    and label ``(B, 1, *patch)`` int16 out.
    """

    def __call__(self, image: np.ndarray, label: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]: ...


class ComposeAugmenter:
    """A batchgenerators chain as a BatchAugmenter: seeds numpy's and Python's global RNG from ``seed``.

    batchgenerators draws from those global generators, so the seed is set right before the chain runs and
    the caller's generator states are restored afterwards (in the main process they belong to someone else).
    """

    def __init__(self, transforms: Compose) -> None:
        self.transforms = transforms

    def __call__(self, image: np.ndarray, label: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        numpy_state = np.random.get_state()
        python_state = random.getstate()
        try:
            np.random.seed(seed % 2**32)
            random.seed(seed)
            out = self.transforms(**{DATA_KEY: image, LABEL_KEY: label})
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)
        # the spatial transform returns labels as float32 holding whole numbers
        return (
            np.ascontiguousarray(out[DATA_KEY], dtype=np.float32),
            np.ascontiguousarray(np.rint(out[LABEL_KEY]), dtype=np.int16),
        )


def train_augmenter(
    patch_size: Sequence[int], setup: SpatialSetup, params: AugmentationParams | None = None
) -> ComposeAugmenter:
    return ComposeAugmenter(train_transforms(patch_size, setup, params))


class UnchangedAugmenter:
    """The identity BatchAugmenter: validation batches, and the workers' share when the device augments.

    The sampler's arrays already are float32 and int16, so they pass without a copy (an empty
    ``ComposeAugmenter`` would still round the label through float32, a copy of each sample).
    """

    def __call__(self, image: np.ndarray, label: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(image, dtype=np.float32), np.asarray(label, dtype=np.int16)


def validation_augmenter() -> UnchangedAugmenter:
    return UnchangedAugmenter()


class EpochAugmenters:
    """A ``BatchAugmenter`` per phase of training: ``at(epoch)`` gives the one of that epoch.

    Built from the trainer's ``epoch_augmentations`` for every epoch: consecutive epochs with equal
    parameters share one augmenter, so a schedule with two phases builds two chains, whatever the budget.
    Epochs past the last phase (a budget raised on resume) keep the last phase's augmenter.
    """

    def __init__(self, phases: Sequence[tuple[int, AugmentationParams, BatchAugmenter]]) -> None:
        if not phases or phases[0][0] != 0:
            raise ValueError("the first phase must start at epoch 0")
        self.phases = tuple(phases)

    @classmethod
    def build(
        cls,
        patch_size: Sequence[int],
        params_by_epoch: Sequence[AugmentationParams],
        make: Any = None,
    ) -> EpochAugmenters:
        """One phase per run of equal parameters in ``params_by_epoch`` (one entry per epoch). Every phase
        must cut the same sample (``spatial_setup``); ``make(patch_size, setup, params)`` builds an augmenter
        (default: ``train_augmenter``)."""
        make = make or train_augmenter
        if not params_by_epoch:
            raise ValueError("params_by_epoch is empty: give the parameters of at least one epoch")
        setup = spatial_setup(patch_size, params_by_epoch[0])
        phases: list[tuple[int, AugmentationParams, BatchAugmenter]] = []
        for epoch, params in enumerate(params_by_epoch):
            if phases and params == phases[-1][1]:
                continue
            other = spatial_setup(patch_size, params)
            if other != setup:
                from autoseg.errors import AutosegError

                raise AutosegError(
                    f"the augmentation of epoch {epoch} cuts a sample of {other.sample_size} (rotation"
                    f" {other.rotation_rad}), epoch 0 one of {setup.sample_size} (rotation {setup.rotation_rad});"
                    " a schedule may change probabilities and ranges, but not the rotation ranges or"
                    " sample_size_scale_range, which size the sample the loader cuts"
                )
            phases.append((epoch, params, make(patch_size, setup, params)))
        return cls(phases)

    def _phase(self, epoch: int) -> tuple[int, AugmentationParams, BatchAugmenter]:
        return next(phase for phase in reversed(self.phases) if phase[0] <= epoch or phase is self.phases[0])

    def at(self, epoch: int) -> BatchAugmenter:
        return self._phase(epoch)[2]

    def params_at(self, epoch: int) -> AugmentationParams:
        return self._phase(epoch)[1]

    def __call__(self, image: np.ndarray, label: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """The first phase's augmentation (a caller that does not know the epoch)."""
        return self.phases[0][2](image, label, seed)
