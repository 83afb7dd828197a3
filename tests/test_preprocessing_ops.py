"""Crop, resample, normalize and foreground sampling against hand computation, skimage and nnU-Net."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import binary_fill_holes
from skimage.transform import resize

from autoseg.errors import AutosegError
from autoseg.fingerprint import IntensityStats
from autoseg.plan import ResamplingPlan
from autoseg.preprocessing import (
    NORMALIZERS,
    bounding_box,
    compute_new_shape,
    crop_to_nonzero,
    nonzero_mask,
    normalize_case,
    resample_image,
    resample_label,
    resample_probabilities,
    sample_class_locations,
    thick_axis,
    uncrop,
)
from autoseg.preprocessing.crop import box_slices
from autoseg.preprocessing.foreground import sample_size

PLAN = ResamplingPlan()


def skimage_resize(volume: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    return resize(volume.astype(np.float64), shape, order=order, mode="edge", anti_aliasing=False)


def blob_label(shape: tuple[int, ...]) -> np.ndarray:
    """Nested smooth blobs 1 and 2 in background 0, with -1 at the sides (as crop_to_nonzero marks)."""
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    label = np.zeros(shape, dtype=np.int8)
    label[z**2 + y**2 + x**2 < 0.6] = 1
    label[z**2 + (y - 0.2) ** 2 + x**2 < 0.15] = 2
    label[np.abs(x) > 0.85] = -1
    return label


# --- crop -----------------------------------------------------------------------------------------------


def head_image(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two channels, nonzero in a box with a hole inside; a label with one voxel outside the box."""
    image = np.zeros((2, 20, 24, 22), dtype=np.float32)
    image[0, 3:15, 5:20, 4:18] = rng.random((12, 15, 14)) + 1
    image[1, 4:17, 6:19, 2:16] = rng.random((13, 13, 14)) + 1
    image[:, 8:10, 10:12, 8:10] = 0  # an enclosed hole: inside the body
    label = np.zeros((20, 24, 22), dtype=np.uint8)
    label[6:9, 8:12, 6:10] = 1
    label[3, 5, 2] = 2  # labelled although both channels are zero there
    return image, label


def test_nonzero_mask_is_any_channel_with_holes_filled() -> None:
    image, _ = head_image(np.random.default_rng(0))
    expected = binary_fill_holes((image[0] != 0) | (image[1] != 0))
    mask = nonzero_mask(image)
    np.testing.assert_array_equal(mask, expected)
    assert mask[9, 11, 9]


def test_bounding_box() -> None:
    mask = np.zeros((6, 7, 8), dtype=bool)
    mask[1, 2, 3] = mask[4, 5, 3] = True
    assert bounding_box(mask) == ((1, 5), (2, 6), (3, 4))
    assert bounding_box(np.zeros((3, 4), dtype=bool)) == ((0, 3), (0, 4))


def test_crop_round_trip_and_outside_marking() -> None:
    image, label = head_image(np.random.default_rng(1))
    image_c, label_c, box = crop_to_nonzero(image, label)
    assert box == ((3, 17), (5, 20), (2, 18))
    assert image_c.shape == (2, 14, 15, 16) and label_c.shape == (14, 15, 16)
    np.testing.assert_array_equal(uncrop(image_c, box, image.shape[1:], fill=0), image)
    assert label_c.dtype == np.int16  # uint8 cannot hold -1
    inside = nonzero_mask(image)[3:17, 5:20, 2:18]
    original = label[3:17, 5:20, 2:18]
    np.testing.assert_array_equal(label_c == -1, (original == 0) & ~inside)
    assert label_c[0, 0, 0] == 2  # a labelled voxel outside the mask keeps its label
    assert label_c[9 - 3, 11 - 5, 9 - 2] == 0  # the filled hole is inside
    np.testing.assert_array_equal(uncrop(label_c, box, label.shape, fill=-1)[label > 0], label[label > 0])
    assert label[3, 5, 2] == 2  # the input is not modified


def test_crop_without_label_makes_one_from_the_mask() -> None:
    image, _ = head_image(np.random.default_rng(2))
    _, label_c, box = crop_to_nonzero(image)
    assert label_c.dtype == np.int8
    np.testing.assert_array_equal(label_c, np.where(nonzero_mask(image)[box_slices(box)], 0, -1))


def test_all_zero_image_keeps_the_whole_volume() -> None:
    image = np.zeros((1, 5, 6, 7), dtype=np.float32)
    image_c, label_c, box = crop_to_nonzero(image, np.zeros((5, 6, 7), dtype=np.int8))
    assert box == ((0, 5), (0, 6), (0, 7))
    assert image_c.shape == image.shape and (label_c == -1).all()


# --- resample -------------------------------------------------------------------------------------------


def test_compute_new_shape_and_thick_axis() -> None:
    assert compute_new_shape((160, 192, 160), (1.0, 1.0, 1.0), (1.2, 1.2, 1.2)) == (133, 160, 133)
    assert compute_new_shape((10, 20), (5.0, 0.5), (5.0, 1.0)) == (10, 10)
    assert thick_axis((1, 1, 1), (1.2, 1.2, 1.2), 3) is None
    assert thick_axis((5, 1, 1), (1, 1, 1), 3) == 0  # the old spacing decides first
    assert thick_axis((1, 1, 1), (1, 4, 1), 3) == 1  # else the new one
    assert thick_axis((1, 5, 5), (1, 1, 1), 3) is None  # two axes share the largest spacing
    assert thick_axis((1, 2.9, 1), (1, 1, 1), 3) is None


@pytest.mark.parametrize(("shape", "new_shape"), [((20, 31, 17), (17, 44, 13)), ((9, 12, 10), (7, 16, 8))])
def test_resample_image_matches_skimage(shape: tuple[int, ...], new_shape: tuple[int, ...]) -> None:
    image = np.random.default_rng(3).random((2, *shape)).astype(np.float32)
    old, new = (1.0, 1.0, 1.0), tuple(n / m for n, m in zip(shape, new_shape))
    out = resample_image(image, new_shape, old, new, PLAN)
    assert out.dtype == np.float32 and out.shape == (2, *new_shape)
    for c in range(2):
        np.testing.assert_allclose(out[c], skimage_resize(image[c], new_shape, 3), atol=1e-5)
    probs = resample_probabilities(image, new_shape, old, new, PLAN)
    np.testing.assert_allclose(probs[0], skimage_resize(image[0], new_shape, 1), atol=1e-5)


def test_resample_image_same_shape_is_a_no_op() -> None:
    image = np.random.default_rng(4).random((1, 4, 5, 6)).astype(np.float32)
    assert resample_image(image, (4, 5, 6), (1, 1, 1), (1, 1, 1), PLAN) is image


def test_separate_z_for_anisotropic_spacing() -> None:
    image = np.random.default_rng(5).random((1, 8, 20, 18)).astype(np.float32)
    old, new = (5.0, 1.0, 1.0), (2.5, 0.8, 0.8)
    new_shape = compute_new_shape(image.shape[1:], old, new)
    assert new_shape == (16, 25, 22) and thick_axis(old, new, PLAN.anisotropy_threshold) == 0
    out = resample_image(image, new_shape, old, new, PLAN)
    in_plane = np.stack([skimage_resize(s, new_shape[1:], 3) for s in image[0]])
    expected = skimage_resize(in_plane, new_shape, 0)  # nearest neighbour between slices
    np.testing.assert_allclose(out[0], expected, atol=1e-5)
    assert np.abs(out[0] - skimage_resize(image[0], new_shape, 3)).max() > 1e-2  # not a 3-D spline
    # a thick axis other than the first, and a 2-D configuration (first axis unchanged) work alike
    moved = np.ascontiguousarray(image.transpose(0, 2, 3, 1))
    out_moved = resample_image(moved, (25, 22, 16), (1.0, 1.0, 5.0), (0.8, 0.8, 2.5), PLAN)
    np.testing.assert_allclose(out_moved[0], expected.transpose(1, 2, 0), atol=1e-5)
    flat = resample_image(image, (8, 25, 22), (5.0, 1.0, 1.0), (5.0, 0.8, 0.8), PLAN)
    np.testing.assert_allclose(flat[0], in_plane, atol=1e-5)


def test_resample_label_keeps_labels_and_recovers_a_smooth_blob() -> None:
    label = blob_label((24, 28, 26))
    up = resample_label(label, (48, 48, 48), (1, 1, 1), (0.5, 28 / 48, 26 / 48), PLAN)
    assert up.dtype == label.dtype
    assert set(np.unique(up)) == {-1, 0, 1, 2}
    down = resample_label(up, label.shape, (0.5, 28 / 48, 26 / 48), (1, 1, 1), PLAN)
    assert (down == label).mean() > 0.99


def test_resample_label_ties_go_to_the_nearest_neighbour() -> None:
    # Halving [1, 0, 1, 0, ...] puts every sample exactly between a 1 and a 0; its nearest neighbour is the 0.
    label = np.zeros((8, 3, 3), dtype=np.int8)
    label[0::2] = 1
    out = resample_label(label, (4, 3, 3), (1, 1, 1), (2, 1, 1), PLAN)
    assert (out == 0).all()
    assert (resample_label(1 - label, (4, 3, 3), (1, 1, 1), (2, 1, 1), PLAN) == 1).all()


def test_resample_label_order_0_is_nearest_neighbour() -> None:
    label = np.random.default_rng(6).integers(-1, 4, (9, 11, 10)).astype(np.int16)
    out = resample_label(label, (13, 7, 10), (1, 1, 1), (9 / 13, 11 / 7, 1), ResamplingPlan(label_order=0))
    np.testing.assert_array_equal(out, skimage_resize(label, (13, 7, 10), 0).astype(np.int16))


def test_resample_label_separate_z_takes_slices_by_nearest_neighbour() -> None:
    label = blob_label((6, 30, 28))
    out = resample_label(label, (12, 24, 22), (5, 1, 1), (2.5, 1.25, 28 / 22), PLAN)
    in_plane = resample_label(label, (6, 24, 22), (5, 1, 1), (5, 1.25, 28 / 22), PLAN)
    for z in range(12):
        assert any((out[z] == in_plane[k]).all() for k in range(6))
    assert set(np.unique(out)) == {-1, 0, 1, 2}


@pytest.mark.parametrize(
    ("shape", "old", "new"),
    [
        ((20, 31, 17), (1.0, 1.0, 1.0), (1.2, 0.7, 1.3)),
        ((12, 40, 36), (5.0, 1.0, 1.0), (2.5, 1.3, 1.3)),
        ((12, 40, 36), (5.0, 1.0, 1.0), (5.0, 0.8, 0.8)),
        ((36, 40, 12), (1.0, 1.0, 5.0), (1.3, 1.3, 2.5)),
    ],
)
def test_resampling_agrees_with_nnunet(shape: tuple[int, ...], old: tuple[float, ...], new: tuple[float, ...]) -> None:
    pytest.importorskip("nnunetv2")
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

    new_shape = compute_new_shape(shape, old, new)
    image = np.random.default_rng(7).random((2, *shape)).astype(np.float32)
    expected = resample_data_or_seg_to_shape(image, new_shape, old, new, False, 3, 0, None)
    np.testing.assert_allclose(resample_image(image, new_shape, old, new, PLAN), expected, atol=1e-5)
    label = blob_label(shape)
    label[np.random.default_rng(8).random(shape) < 0.03] = 3  # speckle: many three-label junctions
    expected_label = resample_data_or_seg_to_shape(label[None], new_shape, old, new, True, 1, 0, None)[0]
    np.testing.assert_array_equal(resample_label(label, new_shape, old, new, PLAN), expected_label)
    probs = resample_data_or_seg_to_shape(image, shape, new, old, False, 1, 0, None)
    ours = resample_probabilities(image, shape, new, old, PLAN)
    np.testing.assert_allclose(ours, probs, atol=1e-5)


# --- normalize ------------------------------------------------------------------------------------------

STATS = IntensityStats(
    mean=40.0, median=35.0, std=20.0, min=-100.0, max=300.0, percentile_00_5=-50.0, percentile_99_5=150.0
)


def test_zscore_without_and_with_mask() -> None:
    rng = np.random.default_rng(9)
    image = (rng.random((6, 7, 8)) * 100).astype(np.float32)
    x = image.astype(np.float64)
    out = NORMALIZERS.get("zscore")()(image.copy(), None, None)
    np.testing.assert_allclose(out, (x - x.mean()) / x.std(), atol=1e-5)
    mask = np.zeros(image.shape, dtype=bool)
    mask[1:5, 2:6, 1:7] = True
    out = NORMALIZERS.get("zscore")()(image.copy(), mask, None)
    inside = x[mask]
    np.testing.assert_allclose(out[mask], (inside - inside.mean()) / inside.std(), atol=1e-5)
    assert (out[~mask] == 0).all()
    assert (NORMALIZERS.get("zscore")()(image.copy(), np.zeros_like(mask), None) == 0).all()


def test_ct_rescale_and_none() -> None:
    image = np.array([[-200.0, -50.0, 0.0], [40.0, 150.0, 400.0]], dtype=np.float32)
    x = image.astype(np.float64)
    ct = NORMALIZERS.get("ct")()(image.copy(), None, STATS)
    np.testing.assert_allclose(ct, (np.clip(x, -50, 150) - 40) / 20, atol=1e-6)
    rescaled = NORMALIZERS.get("rescale_to_0_1")()(image.copy(), None, None)
    np.testing.assert_allclose(rescaled, (x - x.min()) / (x.max() - x.min()), atol=1e-6)
    np.testing.assert_array_equal(NORMALIZERS.get("none")()(image.copy(), None, None), image)
    with pytest.raises(AutosegError, match="intensity statistics"):
        NORMALIZERS.get("ct")()(image.copy(), None, None)


def test_unknown_normalizer_names_the_known_ones() -> None:
    with pytest.raises(AutosegError, match="zscore"):
        NORMALIZERS.get("zscor")


def test_normalize_case_per_channel_in_place() -> None:
    rng = np.random.default_rng(10)
    image = (rng.random((2, 5, 6, 7)) * 300 - 100).astype(np.float32)
    label = np.zeros((5, 6, 7), dtype=np.int8)
    label[0] = -1
    original = image.copy().astype(np.float64)
    out = normalize_case(image, label, ("zscore", "ct"), (True, False), (STATS, STATS))
    assert out is image and out.dtype == np.float32
    inside = original[0][label >= 0]
    np.testing.assert_allclose(out[0][label >= 0], (inside - inside.mean()) / inside.std(), atol=1e-5)
    assert (out[0][0] == 0).all()
    np.testing.assert_allclose(out[1], (np.clip(original[1], -50, 150) - 40) / 20, atol=1e-5)
    with pytest.raises(AutosegError, match="2 channels"):
        normalize_case(image, label, ("zscore",), (False,), (STATS,))


# --- foreground -----------------------------------------------------------------------------------------


def test_sample_size_rule() -> None:
    assert sample_size(50) == 50
    assert sample_size(20_000) == 10_000
    assert sample_size(2_000_000) == 20_000


def test_sample_class_locations() -> None:
    label = np.zeros((40, 40, 40), dtype=np.int8)
    label.reshape(-1)[:20_000] = 1
    label[39, 39, -50:] = 0
    label[39, 39, 30:] = 2  # 10 voxels
    rng = np.random.default_rng(11)
    label[rng.random(label.shape) < 0.001] = 3
    locations = sample_class_locations(label, [1, 2, 3, 5], seed=0)
    assert locations[1].shape == (10_000, 3) and locations[1].dtype == np.int32
    assert locations[2].shape == (10, 3)
    assert len(locations[3]) == (label == 3).sum()
    assert locations[5].shape == (0, 3)
    for value, coords in locations.items():
        assert (label[tuple(coords.T)] == value).all()
        assert len(np.unique(coords, axis=0)) == len(coords)
    again = sample_class_locations(label, [1, 2, 3, 5], seed=0)
    assert all(np.array_equal(locations[k], again[k]) for k in locations)
    other = sample_class_locations(label, [1], seed=1)
    assert not np.array_equal(locations[1], other[1])
