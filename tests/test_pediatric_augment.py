"""Pediatric robustness augmentation: each deterministic twin against hand computations, the samplers through
ComposeAugmenter (reproducible, label untouched, 2D and 3D), and the ``pediatric`` and ``pediatric_artefacts``
trainers' chains."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from autoseg.trainers.pediatric import PediatricTrainer
from autoseg.trainers.pediatric_artefacts import PediatricArtefactsTrainer
from batchgenerators.transforms.abstract_transforms import Compose

from autoseg.augment import AugmentationParams, ComposeAugmenter, spatial_setup, train_augmenter
from autoseg.augment.pediatric import (
    RandomBiasFieldTransform,
    RandomContrastRemapTransform,
    RandomGhostingTransform,
    RandomMotionTransform,
    RandomThickSliceTransform,
    bias_field,
    bias_field_map,
    contrast_mask,
    kspace_ghosting,
    motion_blur,
    remap_contrast,
    simulate_thick_slices,
)
from autoseg.errors import AutosegError

NEW_P = ("p_bias_field", "p_contrast_remap", "p_motion", "p_ghosting", "p_thick_slice")


def samplers(axes: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Each sampler, firing on every sample."""
    return {
        "bias": RandomBiasFieldTransform(0.3, 3, p_per_sample=1.0, axes=axes),
        "remap": RandomContrastRemapTransform(5, 0.5, p_per_sample=1.0, axes=axes),
        "motion": RandomMotionTransform((2, 4), 3.0, p_per_sample=1.0, axes=axes),
        "ghosting": RandomGhostingTransform((4, 10), (0.5, 1.0), p_per_sample=1.0, axes=axes),
        "thick": RandomThickSliceTransform((2, 5), (0, 1), p_per_sample=1.0, axes=axes),
    }


def head_batch(shape: tuple[int, ...], batch: int = 2, channels: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """A sphere of labels 1 (shell) and 2 (core) with noisy positive intensities, 0 outside, a -1 border."""
    rng = np.random.default_rng(0)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = np.sqrt(sum(g**2 for g in grids))
    label = np.zeros(shape, np.int16)
    label[r < 0.8] = 1
    label[r < 0.4] = 2
    label[(slice(0, 1),)] = -1  # padding
    labels = np.repeat(label[None, None], batch, axis=0)
    image = np.where(label > 0, 1.0 + label, 0.0) + 0.1 * rng.standard_normal((batch, channels, *shape))
    image = np.where(labels == -1, 0.0, image).astype(np.float32)
    return image, labels


# --- bias field ----------------------------------------------------------------------------------------------
def test_bias_field_zero_is_identity_and_linear_term_is_a_ramp():
    image = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    assert np.array_equal(bias_field(image, np.zeros((4, 4, 4))), image)
    coefficients = np.zeros((2, 2, 2))
    coefficients[0, 1, 0] = 0.2  # P_1 along y: the ramp linspace(-1, 1)
    expected = image * (1 + 0.2 * np.linspace(-1, 1, 6)[None, :, None])
    assert np.allclose(bias_field(image, coefficients), expected, atol=1e-6)
    # P_2(x) = (3 x^2 - 1) / 2 at x = -1, 0, 1 is 1, -0.5, 1
    assert np.allclose(bias_field_map((3,), np.array([0.0, 0.0, 1.0])), [1.0, -0.5, 1.0])


@pytest.mark.parametrize("shape", [(12, 14, 16), (20, 18)])
def test_bias_field_sampler_stays_within_amplitude(shape):
    ones = np.ones((8, 1, *shape), np.float32)
    out = ComposeAugmenter(Compose([RandomBiasFieldTransform(0.3, 3, 1.0)]))(ones, np.zeros_like(ones, np.int16), 5)[0]
    deviation = np.abs(out - 1).reshape(8, -1).max(axis=1)
    assert deviation.max() <= 0.3 + 1e-6 and deviation.min() > 0  # every sample got a field, none beyond 30 %
    assert np.ptp(out[0]) > 0


# --- ghosting ------------------------------------------------------------------------------------------------
def test_ghosting_puts_copies_at_fov_over_period():
    delta = np.zeros(16)
    delta[3] = 1.0
    # every 4th line (k = 0, 4, 8, 12) removed: f - 1/4 * (f + copies shifted by 4, 8, 12)
    expected = np.zeros(16)
    expected[3], expected[[7, 11, 15]] = 0.75, -0.25
    assert np.allclose(kspace_ghosting(delta, 0, 4, 0, 1.0), expected)
    # lines k = 1, 5, 9, 13: copy j gets the phase cos(2 pi j / 4) = 1, 0, -1, 0; the mean stays
    expected = np.zeros(16)
    expected[3], expected[11] = 0.75, 0.25
    out = kspace_ghosting(delta, 0, 4, 1, 1.0)
    assert np.allclose(out, expected) and out.sum() == pytest.approx(1.0)
    image = np.random.default_rng(0).random((8, 12))
    assert np.allclose(kspace_ghosting(image, 1, 4, 2, 0.0), image)  # intensity 0: nothing happens
    ghosted = kspace_ghosting(np.tile(delta, (3, 1)), 1, 4, 0, 0.5)  # along the last axis of a 2D image
    row = np.zeros(16)
    row[3], row[[7, 11, 15]] = 0.875, -0.125  # half of each removed line: copies of 0.5 / 4
    assert np.allclose(ghosted, np.tile(row, (3, 1)))


# --- motion --------------------------------------------------------------------------------------------------
def test_motion_blur_single_position_is_identity_or_roll():
    image = np.random.default_rng(0).random((6, 7, 8))
    assert np.allclose(motion_blur(image, 1, np.zeros((1, 3)), np.zeros(7, int)), image)
    assert np.allclose(motion_blur(image, 1, np.array([[2.0, 0, 0]]), np.zeros(7, int)), np.roll(image, 2, axis=0))
    assert np.allclose(motion_blur(image, 0, np.array([[0, 0, -3.0]]), np.zeros(6, int)), np.roll(image, -3, axis=2))


def test_motion_blur_mixes_lines_by_segment():
    # delta at 0, N = 4: spectrum all ones; position 1 (shift 1) multiplies line k by exp(-2 pi i k / 4).
    # acquisition order: frequencies -2, -1 from position 1, then 0, 1 from position 0, so the spectrum is
    # (k = 0..3) 1, 1, -1, i and the real part of its inverse FFT is (1 + i, 3 + i, -1 - i, 1 - i) / 4
    delta = np.array([1.0, 0, 0, 0])
    out = motion_blur(delta, 0, np.array([[0.0], [1.0]]), np.array([1, 1, 0, 0]))
    assert np.allclose(out, [0.25, 0.75, -0.25, 0.25])
    with pytest.raises(ValueError, match="segments"):
        motion_blur(delta, 0, np.array([[0.0]]), np.array([0, 0, 1, 0]))


# --- contrast remapping --------------------------------------------------------------------------------------
def test_remap_contrast_inverts_two_classes_and_keeps_statistics():
    image = np.zeros((4, 6), np.float32)
    image[:, 1:3], image[:, 3:5] = 1.0, 3.0  # class 1, class 2; columns 0 and 5 outside the mask
    mask = image > 0
    out = remap_contrast(image, mask, np.array([1.0, 3.0]), np.array([3.0, 1.0]))
    # 1 -> 3 and 3 -> 1: already the same mean (2) and std (1), so the classes swap exactly
    assert np.allclose(out[:, 1:3], 3.0) and np.allclose(out[:, 3:5], 1.0)
    assert np.array_equal(out[~mask], image[~mask])
    squashed = remap_contrast(image, mask, np.array([0.0, 2.0, 4.0]), np.array([0.0, 1.0, 1.2]))
    assert squashed[mask].mean() == pytest.approx(2.0) and squashed[mask].std() == pytest.approx(1.0)
    assert np.allclose(squashed[:, 1:3], 1.0) and np.allclose(squashed[:, 3:5], 3.0)  # order kept
    assert np.array_equal(remap_contrast(image, mask, np.array([0.0, 4.0]), np.array([2.0, 2.0])), image)


def test_contrast_mask_takes_head_or_labels_never_padding():
    image = np.array([0.0, 0.0, 1.0, 2.0, 0.0])
    label = np.array([-1, 0, 0, 1, 2])
    assert contrast_mask(image, label).tolist() == [False, False, True, True, True]
    assert contrast_mask(image, None).tolist() == [False, False, True, True, False]


def test_monotone_sampler_keeps_the_order_of_three_classes():
    image = np.zeros((16, 1, 6, 8), np.float32)
    label = np.zeros((16, 1, 6, 8), np.int16)
    for value, columns in ((1.0, slice(0, 3)), (2.0, slice(3, 6)), (3.0, slice(6, 8))):
        image[..., columns], label[..., columns] = value, int(value)
    out = ComposeAugmenter(Compose([RandomContrastRemapTransform(5, 0.0, 1.0)]))(image.copy(), label, seed=2)[0]
    means = np.stack(
        [out[..., :3].mean(axis=(1, 2, 3)), out[..., 3:6].mean(axis=(1, 2, 3)), out[..., 6:].mean(axis=(1, 2, 3))]
    )
    assert np.all(np.diff(means, axis=0) > 0)
    assert not np.allclose(out, image)  # the spacing between the classes changed
    inverted = ComposeAugmenter(Compose([RandomContrastRemapTransform(5, 1.0, 1.0)]))(image.copy(), label, seed=2)[0]
    orders = {tuple(np.argsort([inverted[b, 0, 0, 0], inverted[b, 0, 0, 3], inverted[b, 0, 0, 6]])) for b in range(16)}
    assert len(orders) > 1  # non-monotone curves reorder the classes in some samples


# --- thick slices --------------------------------------------------------------------------------------------
def test_thick_slices_average_slabs():
    slabs = np.repeat(np.array([1.0, 5.0, 2.0, 7.0]), 2)[None, :, None] * np.ones((3, 8, 2))
    assert np.array_equal(simulate_thick_slices(slabs, 1, 2), slabs)  # constant per slab: unchanged
    values = np.arange(8.0)
    assert simulate_thick_slices(values, 0, 2).tolist() == [0.5, 0.5, 2.5, 2.5, 4.5, 4.5, 6.5, 6.5]
    assert simulate_thick_slices(values[:7], 0, 3).tolist() == [1, 1, 1, 4, 4, 4, 6]  # last slab is thinner
    assert simulate_thick_slices(values, 0, 3, offset=1).tolist() == [0, 2, 2, 2, 5, 5, 5, 7]
    # linear: slab means at slab centres 0.5, 2.5, ... give the ramp back, clamped at both ends
    assert simulate_thick_slices(values, 0, 2, order=1).tolist() == [0.5, 1, 2, 3, 4, 5, 6, 6.5]
    volume = np.random.default_rng(0).random((4, 6, 5)).astype(np.float32)
    out = simulate_thick_slices(volume, 2, 5)
    assert out.dtype == np.float32 and np.allclose(out, volume.mean(axis=2, keepdims=True))


# --- samplers ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(10, 12, 14), (18, 16)])
@pytest.mark.parametrize("name", ["bias", "remap", "motion", "ghosting", "thick"])
def test_sampler_is_reproducible_changes_only_the_image_and_keeps_shapes(name, shape):
    augment = ComposeAugmenter(Compose([samplers()[name]]))
    image, label = head_batch(shape)
    out_image, out_label = augment(image.copy(), label.copy(), seed=4)
    assert out_image.shape == image.shape and out_image.dtype == np.float32
    assert np.array_equal(out_label, label)
    assert not np.allclose(out_image, image), f"{name} did nothing"
    again = augment(image.copy(), label.copy(), seed=4)[0]
    other = augment(image.copy(), label.copy(), seed=5)[0]
    assert np.array_equal(out_image, again) and not np.allclose(out_image, other)


@pytest.mark.parametrize("name", ["motion", "ghosting", "thick"])
def test_in_plane_samplers_leave_the_thick_axis_alone(name):
    """Dummy-2D axes (1, 2): an image that varies only along axis 0 is unchanged."""
    profile = np.random.default_rng(0).random(6).astype(np.float32)
    image = np.broadcast_to(profile[None, None, :, None, None], (8, 1, 6, 10, 12)).copy()
    out = ComposeAugmenter(Compose([samplers(axes=(1, 2))[name]]))(image.copy(), np.zeros(image.shape, np.int16), 1)
    assert np.allclose(out[0], image, atol=1e-5)


def test_sampler_arguments_are_checked():
    with pytest.raises(AutosegError, match="bias_field_amplitude"):
        RandomBiasFieldTransform(1.0, 3, 0.1)
    with pytest.raises(AutosegError, match="thick_slice_factor"):
        RandomThickSliceTransform((1, 3), (0,), 0.1)
    with pytest.raises(AutosegError, match="ghosting_period"):
        RandomGhostingTransform((1, 3), (0.5, 1.0), 0.1)


# --- the pediatric chain -------------------------------------------------------------------------------------
def test_defaults_are_off_pediatric_remaps_and_pediatric_artefacts_switches_everything_on():
    default = AugmentationParams()
    assert all(getattr(default, p) == 0 for p in NEW_P)
    remap_only = PediatricTrainer.augmentation
    assert remap_only == dataclasses.replace(default, p_contrast_remap=0.2)
    params = PediatricArtefactsTrainer.augmentation
    assert all(0 < getattr(params, p) <= 0.3 for p in NEW_P)
    assert params.p_elastic > 0 and params.scaling_range[1] == pytest.approx(1 / 0.6)

    def trainer_for(patch: tuple[int, ...]) -> PediatricArtefactsTrainer:
        setup = SimpleNamespace(configuration=SimpleNamespace(patch_size=patch))
        trainer = PediatricArtefactsTrainer(setup)  # type: ignore[arg-type]
        trainer.contrast_variety = None  # type: ignore[misc]  # no preprocessed data: the remapping stays on
        return trainer

    assert trainer_for((32, 32, 32)).train_augmentations().elastic_alpha == (0.0, 900.0)
    assert trainer_for((64, 64)).train_augmentations().elastic_alpha == (0.0, 200.0)
    assert trainer_for((6, 40, 40)).train_augmentations().elastic_alpha == (0.0, 200.0)  # dummy 2D


@pytest.mark.parametrize("trainer_class", [PediatricTrainer, PediatricArtefactsTrainer])
def test_the_pediatric_trainers_end_with_the_default_augmentation(trainer_class):
    from autoseg.training.trainer import TrainOptions

    setup = SimpleNamespace(configuration=SimpleNamespace(patch_size=(32, 32, 32)))
    trainer = trainer_class(setup, TrainOptions(epochs=40))  # type: ignore[arg-type]
    trainer.contrast_variety = None  # no preprocessed data (tests/test_contrast_variety.py reads real cases)
    assert [trainer.epoch_augmentations(e) == trainer_class.augmentation for e in (0, 29)] == [True, True]
    assert trainer.epoch_augmentations(30) == AugmentationParams() == trainer.epoch_augmentations(39)


@pytest.mark.parametrize("patch", [(16, 20, 24), (6, 28, 24), (32, 28)])
def test_pediatric_chain_runs_and_keeps_shapes(patch):
    params = dataclasses.replace(PediatricArtefactsTrainer.augmentation, **dict.fromkeys(NEW_P, 1.0))
    setup = spatial_setup(patch, params)
    image, label = head_batch(setup.sample_size, batch=2, channels=2)
    augment = train_augmenter(patch, setup, params)
    out_image, out_label = augment(image.copy(), label.copy(), seed=3)
    assert out_image.shape == (2, 2, *patch) and out_image.dtype == np.float32
    assert out_label.shape == (2, 1, *patch) and out_label.dtype == np.int16
    assert np.all(np.isfinite(out_image)) and set(np.unique(out_label)) <= {-1, 0, 1, 2}
    again = augment(image.copy(), label.copy(), seed=3)
    assert np.array_equal(out_image, again[0]) and np.array_equal(out_label, again[1])


def test_thick_slices_on_an_axis_shorter_than_the_offset() -> None:
    """Offset 4 of factor 5 on 2 slices: no slab starts inside the axis, so the whole axis is one slab."""
    image = np.arange(6.0).reshape(2, 3)
    out = simulate_thick_slices(image, axis=0, factor=5, order=0, offset=4)
    assert np.array_equal(out, np.broadcast_to(image.mean(axis=0), image.shape))
