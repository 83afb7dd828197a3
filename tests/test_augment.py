"""Training augmentation: the spatial set-up rules, and each transform alone on a batch whose image is its label."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from autoseg.augment import AugmentationParams, spatial_setup, train_augmenter, validation_augmenter

SPATIAL = ("p_rotation", "p_scaling", "p_elastic")
INTENSITY = (
    "p_gaussian_noise",
    "p_gaussian_blur",
    "p_brightness",
    "p_contrast",
    "p_low_resolution",
    "p_gamma_inverted",
    "p_gamma",
)
ALL_P = (*SPATIAL, *INTENSITY, "p_mirror_per_axis")


def only(name: str) -> AugmentationParams:
    """Every probability 0 except ``name``, which is 1."""
    return dataclasses.replace(AugmentationParams(), **{p: (1.0 if p == name else 0.0) for p in ALL_P})


def blob_batch(shape: tuple[int, ...], batch: int = 2, channels: int = 1, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Labels 0/1/2 in off-centre ellipsoids (so that rotating or mirroring changes them); image = label."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    labels = np.zeros((batch, 1, *shape), np.int16)
    for b in range(batch):
        centre = rng.uniform(-0.3, 0.3, len(shape))
        radii = rng.uniform(0.3, 0.6, len(shape))
        r = np.sqrt(sum(((g - c) / a) ** 2 for g, c, a in zip(grids, centre, radii)))
        labels[b, 0][r < 1] = 1
        labels[b, 0][r < 0.5] = 2
    image = np.repeat(labels.astype(np.float32), channels, axis=1)
    return image, labels


def centre(array: np.ndarray, patch: tuple[int, ...]) -> np.ndarray:
    """The centre crop that the spatial transform takes when it neither rotates nor scales."""
    starts = [(s - p) // 2 for s, p in zip(array.shape[2:], patch)]
    return array[(Ellipsis, *(slice(a, a + p) for a, p in zip(starts, patch)))]


def test_setup_rules():
    assert spatial_setup((20, 160, 112)).do_dummy_2d
    assert not spatial_setup((64, 64, 64)).do_dummy_2d
    dummy = spatial_setup((20, 160, 112))
    assert dummy.sample_size[0] == 20 and len(dummy.rotation_rad) == 1
    assert dummy.rotation_rad[0] == pytest.approx((-np.pi, np.pi))
    assert np.allclose(spatial_setup((64, 64, 64)).rotation_rad, [(-np.pi / 6, np.pi / 6)] * 3)
    assert spatial_setup((64, 64)).mirror_axes == (0, 1) and spatial_setup((64, 64, 64)).mirror_axes == (0, 1, 2)
    for patch in ((20, 160, 112), (64, 64, 64), (40, 48, 56), (64, 64), (256, 96)):
        setup = spatial_setup(patch)
        assert len(setup.sample_size) == len(patch)
        assert all(s >= p for s, p in zip(setup.sample_size, patch))
    # rotating a cube by 30 degrees and zooming out by 0.85 needs a larger sample than the patch itself
    assert all(s > 64 for s in spatial_setup((64, 64, 64)).sample_size)


@pytest.mark.parametrize("patch", [(16, 20, 24), (6, 28, 24), (32, 28)])
def test_default_pipeline_output_shapes_and_determinism(patch):
    setup = spatial_setup(patch)
    image, label = blob_batch(setup.sample_size, batch=3, channels=2)
    augment = train_augmenter(patch, setup)
    state = np.random.get_state()
    out_image, out_label = augment(image.copy(), label.copy(), seed=7)
    assert out_image.shape == (3, 2, *patch) and out_image.dtype == np.float32
    assert out_label.shape == (3, 1, *patch) and out_label.dtype == np.int16
    again = augment(image.copy(), label.copy(), seed=7)
    assert np.array_equal(out_image, again[0]) and np.array_equal(out_label, again[1])
    assert np.array_equal(np.random.get_state()[1], state[1])  # the caller's global generator is left alone


@pytest.mark.parametrize(
    ("name", "patch"),
    [
        ("p_rotation", (20, 22, 24)),
        ("p_scaling", (20, 22, 24)),
        ("p_rotation", (6, 30, 26)),  # dummy 2D: slice by slice
        ("p_scaling", (6, 30, 26)),
        ("p_rotation", (34, 30)),
        ("p_scaling", (34, 30)),
    ],
)
def test_spatial_transforms_move_image_and_label_together(name, patch):
    setup = spatial_setup(patch)
    image, label = blob_batch(setup.sample_size, batch=3)
    out_image, out_label = train_augmenter(patch, setup, only(name))(image.copy(), label.copy(), seed=3)
    assert out_image.shape == (3, 1, *patch) and out_label.shape == (3, 1, *patch)
    assert not np.array_equal(out_label, centre(label, patch)), "the transform did nothing"
    valid = out_label != -1
    assert valid.mean() > 0.5
    # cubic (image) and linear-indicator (label) interpolation may disagree only along label borders
    disagree = np.mean(np.rint(out_image[valid]) != out_label[valid])
    assert disagree < 0.01, disagree


@pytest.mark.parametrize("patch", [(12, 14, 16), (6, 30, 26), (18, 20)])
def test_mirroring_is_exact(patch):
    setup = spatial_setup(patch)
    image, label = blob_batch(setup.sample_size, batch=2)
    out_image, out_label = train_augmenter(patch, setup, only("p_mirror_per_axis"))(image, label.copy(), seed=0)
    assert np.array_equal(out_image, out_label.astype(np.float32))
    flipped = np.flip(centre(label, patch), axis=tuple(a + 2 for a in setup.mirror_axes))
    assert np.array_equal(out_label, flipped)  # p = 1: every allowed axis flips


@pytest.mark.parametrize("name", INTENSITY)
@pytest.mark.parametrize("patch", [(12, 14, 16), (6, 30, 26)])
def test_intensity_transforms_change_only_the_image(name, patch):
    setup = spatial_setup(patch)
    image, label = blob_batch(setup.sample_size, batch=4, channels=2)
    out_image, out_label = train_augmenter(patch, setup, only(name))(image.copy(), label.copy(), seed=1)
    assert np.array_equal(out_label, centre(label, patch))
    assert not np.allclose(out_image, centre(image, patch)), f"{name} did not change the image"


def test_all_probabilities_zero_is_a_centre_crop_and_validation_is_identity():
    patch = (10, 12, 14)
    setup = spatial_setup(patch)
    image, label = blob_batch(setup.sample_size)
    none = dataclasses.replace(AugmentationParams(), **dict.fromkeys(ALL_P, 0.0))
    out_image, out_label = train_augmenter(patch, setup, none)(image.copy(), label.copy(), seed=0)
    assert np.array_equal(out_image, centre(image, patch)) and np.array_equal(out_label, centre(label, patch))
    image, label = blob_batch(patch)
    out_image, out_label = validation_augmenter()(image.copy(), label.copy(), seed=0)
    assert np.array_equal(out_image, image) and np.array_equal(out_label, label)
