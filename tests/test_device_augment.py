"""The torch twin of the training augmentation (augment/device.py) against batchgenerators' CPU pipeline.

Four kinds of checks: image and label stay aligned through every spatial op; with fixed parameters each op
agrees with its batchgenerators twin voxel for voxel; over many draws the firing rates, parameter
distributions and output statistics match the CPU pipeline; and a batch is a pure function of its seed.
"""

from __future__ import annotations

import dataclasses
import sys
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from batchgenerators.augmentations import resample_augmentations
from batchgenerators.augmentations.color_augmentations import (
    augment_brightness_multiplicative,
    augment_contrast,
    augment_gamma,
)
from batchgenerators.augmentations.resample_augmentations import augment_linear_downsampling_scipy
from batchgenerators.augmentations.utils import (
    create_zero_centered_coordinate_mesh,
    elastic_deform_coordinates,
    interpolate_img,
    rotate_coords_2d,
    rotate_coords_3d,
    scale_coords,
)
from scipy import stats
from scipy.ndimage import gaussian_filter
from skimage.transform import resize
from test_augment import ALL_P, INTENSITY, SPATIAL  # the CPU pipeline's probability names

from autoseg.augment import AugmentationParams, spatial_setup, train_augmenter
from autoseg.augment import device as device_module
from autoseg.augment.device import BatchParameters, DeviceAugmenter, _resize, gaussian_smooth, unsupported
from autoseg.errors import AutosegError

PATCHES = ((16, 16, 16), (6, 24, 20), (20, 18))  # isotropic 3D, dummy 2D (24 / 6 > 3), 2D


def with_p(**probabilities: float) -> AugmentationParams:
    """Every probability 0 except the ones given."""
    return dataclasses.replace(AugmentationParams(), **{p: probabilities.get(p, 0.0) for p in ALL_P})


def blobs(shape: tuple[int, ...], batch: int, seed: int = 0) -> np.ndarray:
    """Labels 0/1/2 in off-centre ellipsoids, -1 in a padded band along the last axis (B, *shape) int16."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    labels = np.zeros((batch, *shape), np.int16)
    for b in range(batch):
        centre = rng.uniform(-0.3, 0.3, len(shape))
        radii = rng.uniform(0.3, 0.6, len(shape))
        r = np.sqrt(sum(((g - c) / a) ** 2 for g, c, a in zip(grids, centre, radii)))
        labels[b][r < 1] = 1
        labels[b][r < 0.5] = 2
        labels[b][..., : 2 + b % 2] = -1
    return labels


def smooth_image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A smooth random float32 image (z-scored), so that interpolation differences show."""
    field = gaussian_filter(np.random.default_rng(seed).normal(size=shape), 1.5)
    return ((field - field.mean()) / field.std()).astype(np.float32)


def fixed(augmenter: DeviceAugmenter, batch: int, channels: int, **values: Any) -> BatchParameters:
    """Parameters that fire nothing, with ``values`` replacing fields (e.g. rotation=..., angles=...)."""
    nothing = DeviceAugmenter(augmenter.patch_size, augmenter.setup, with_p())
    return dataclasses.replace(nothing.sample(batch, channels, 0), **values)


def run(augmenter: DeviceAugmenter, image: np.ndarray, label: np.ndarray, parameters: BatchParameters):
    out, out_label = augmenter.apply(
        torch.from_numpy(image), torch.from_numpy(label), parameters, torch.Generator().manual_seed(0)
    )
    return out.numpy(), out_label.numpy()


# --- 1. alignment ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("patch", PATCHES)
def test_label_stays_the_argmax_of_the_transformed_one_hot(patch):
    """Image = one-hot of the label: after rotation, scaling, elastic deformation and mirroring the label is the
    argmax of the interpolated indicators (the ignore label scoring 1 - their sum), wherever that is unambiguous."""
    params = with_p(p_rotation=1, p_scaling=1, p_elastic=1, p_mirror_per_axis=0.5)
    setup = spatial_setup(patch, params)
    augmenter = DeviceAugmenter(patch, setup, params)
    label = blobs(setup.sample_size, batch=4)
    one_hot = np.stack([(label == k) for k in (0, 1, 2)], axis=1).astype(np.float32)
    image, out_label = augmenter(torch.from_numpy(one_hot), torch.from_numpy(label), seed=3)
    scores = torch.cat([1 - image.sum(1, keepdim=True), image], 1)  # classes -1, 0, 1, 2
    top2 = scores.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3
    expected = scores.argmax(1) - 1
    assert clear.float().mean() > 0.8
    assert torch.equal(out_label[clear].long(), expected[clear])
    assert (out_label == -1).any() and (out_label == 2).any()  # zoom-out pulled in the outside; labels survive


# --- 2. twins with fixed parameters ---------------------------------------------------------------------------------
def cpu_spatial(image: np.ndarray, label: np.ndarray, patch, angles, scale) -> tuple[np.ndarray, np.ndarray]:
    """batchgenerators' augment_spatial for one sample, channel and fixed angles/scale (random_crop=False)."""
    coords = create_zero_centered_coordinate_mesh(patch)
    coords = rotate_coords_3d(coords, *angles) if len(patch) == 3 else rotate_coords_2d(coords, angles[0])
    coords = scale_coords(coords, scale)
    for d in range(len(patch)):
        coords[d] += image.shape[d] / 2.0 - 0.5
    return (
        interpolate_img(image, coords, 1, "constant", cval=0),
        interpolate_img(label, coords, 1, "constant", cval=-1, is_seg=True),
    )


@pytest.mark.parametrize(
    ("patch", "angles", "scale"),
    [
        ((12, 14, 16), (0.3, -0.2, 0.4), 1.2),
        ((12, 14, 16), (0.0, 0.5, 0.0), (0.8, 1.0, 1.3)),
        ((20, 18), (1.1,), 0.75),
        ((6, 24, 20), (-2.0,), 1.3),  # dummy 2D: every slice alike, in-plane
    ],
)
def test_spatial_matches_batchgenerators(patch, angles, scale):
    params = with_p()
    setup = spatial_setup(patch, params)
    sample = tuple(s + k for s, k in zip(setup.sample_size, (0, 1, 0)[: len(patch)]))  # an odd and an even margin
    if setup.do_dummy_2d:
        sample = (patch[0], *sample[1:])
    augmenter = DeviceAugmenter(patch, setup, params)
    image = np.stack([smooth_image(sample, seed) for seed in (1, 2)])[None]  # (1, 2, *sample)
    label = blobs(sample, batch=1)
    dims = 2 if setup.do_dummy_2d else len(patch)
    parameters = fixed(
        augmenter,
        1,
        2,
        rotation=np.array([True]),
        angles=np.array([angles]),
        scaling=np.array([True]),
        scale=np.broadcast_to(np.asarray(scale, float), (1, dims)).copy(),
    )
    out, out_label = run(augmenter, image, label, parameters)
    if setup.do_dummy_2d:  # the CPU folds the slices into channels: each slice alone through the 2D transform
        pairs = [cpu_spatial(image[0, c, z], label[0, z], patch[1:], angles, scale) for c in range(2) for z in range(6)]
        want = np.stack([p[0] for p in pairs]).reshape(2, *patch)
        want_label = np.stack([p[1] for p in pairs[:6]])
    else:
        want = np.stack([cpu_spatial(image[0, c], label[0], patch, angles, scale)[0] for c in range(2)])
        want_label = cpu_spatial(image[0, 0], label[0], patch, angles, scale)[1]
    assert out.shape == (1, 2, *patch) and out_label.shape == (1, *patch)
    assert np.abs(out[0] - want).max() < 1e-4
    # float32 against float64 coordinates: only near-ties of two indicators may go the other way
    assert (out_label[0] != want_label).mean() < 2e-3
    assert set(np.unique(want_label)) == set(np.unique(out_label))


@pytest.mark.parametrize("patch", [(12, 14, 16), (20, 18)])
def test_nearest_label_resampling_matches_batchgenerators(patch):
    """order_label 0: the nearest label, -1 outside the sample."""
    params = dataclasses.replace(with_p(), order_label=0)
    setup = spatial_setup(patch, params)
    augmenter = DeviceAugmenter(patch, setup, params)
    label = blobs(setup.sample_size, batch=1)
    angles = (0.4, -0.3, 0.2)[: len(setup.rotation_rad)]
    parameters = fixed(
        augmenter,
        1,
        1,
        rotation=np.array([True]),
        angles=np.array([angles]),
        scaling=np.array([True]),
        scale=np.full((1, len(patch)), 1.35),
    )
    _, out_label = run(augmenter, label[:, None].astype(np.float32), label, parameters)
    coords = create_zero_centered_coordinate_mesh(patch)
    coords = rotate_coords_3d(coords, *angles) if len(patch) == 3 else rotate_coords_2d(coords, angles[0])
    coords = scale_coords(coords, 1.35)
    for d in range(len(patch)):
        coords[d] += setup.sample_size[d] / 2.0 - 0.5
    want = interpolate_img(label[0], coords, 0, "constant", cval=-1, is_seg=True)
    assert (out_label[0] != want).mean() < 2e-3 and (want == -1).any()


@pytest.mark.parametrize("dims", [2, 3])
def test_dense_label_vote_equals_the_boundary_only_vote(dims):
    """Off the CPU every voxel is scored (no ``nonzero``, which would wait for the device); on the CPU only the
    boundary voxels. Same labels, also with several label channels, ties and grid points outside the sample."""
    gen = torch.Generator().manual_seed(dims)
    sample = (9, 11, 10)[:dims]
    label = torch.randint(0, 4, (3, 2, *sample), generator=gen, dtype=torch.int16)
    label[0] = 1  # one sample without a boundary
    patch = (7, 8, 6)[:dims]
    grid = torch.rand((3, *patch, dims), generator=gen) * 2.4 - 1.2
    grid[1, :2] = torch.linspace(-1, 1, 5)[torch.randint(0, 5, (2, *patch[1:], dims), generator=gen)]  # on voxels
    grid[2, ..., 0] = 0.5 * (2 * torch.arange(patch[-1]) / (patch[-1] - 1) - 1)  # halves: weight ties
    inside = (grid.abs() <= 1).all(-1)
    sparse = device_module._resample_label(label, grid, inside, 1, dense=False)
    dense = device_module._resample_label(label, grid, inside, 1, dense=True)
    assert torch.equal(sparse, dense)
    assert (sparse[1:] != sparse[1:, :, :1]).any() and (sparse == -1).any()


def test_elastic_deformation_matches_batchgenerators(monkeypatch):
    """The same random field through both: batchgenerators smooths it (zero border), scales it by alpha and adds it
    to the patch grid before rotating and scaling; the device twin builds the same grid."""
    patch, alpha, sigma, angles, scale = (10, 12, 14), 250.0, 3.0, (0.2, 0.1, -0.3), 1.1
    setup = spatial_setup(patch, with_p())
    augmenter = DeviceAugmenter(patch, setup, with_p())
    image = smooth_image(setup.sample_size, 8)[None, None]
    label = blobs(setup.sample_size, 1)
    uniform = np.random.default_rng(3).random((3, *patch))
    parameters = fixed(
        augmenter,
        1,
        1,
        elastic=np.array([True]),
        elastic_alpha=np.array([alpha]),
        elastic_sigma=np.array([sigma]),
        rotation=np.array([True]),
        angles=np.array([angles]),
        scaling=np.array([True]),
        scale=np.full((1, 3), scale),
    )
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: torch.from_numpy(uniform).float())
    out, out_label = run(augmenter, image, label, parameters)
    monkeypatch.undo()
    feed(monkeypatch, np.random, "random", list(uniform))
    coords = elastic_deform_coordinates(create_zero_centered_coordinate_mesh(patch), alpha, sigma)
    monkeypatch.undo()
    assert np.abs(coords - create_zero_centered_coordinate_mesh(patch)).max() > 1  # a visible deformation
    coords = scale_coords(rotate_coords_3d(coords, *angles), scale)
    for d in range(3):
        coords[d] += setup.sample_size[d] / 2.0 - 0.5
    assert np.abs(out[0, 0] - interpolate_img(image[0, 0], coords, 1, "constant", cval=0)).max() < 1e-4
    want_label = interpolate_img(label[0], coords, 1, "constant", cval=-1, is_seg=True)
    assert (out_label[0] != want_label).mean() < 2e-3


@pytest.mark.parametrize("patch", PATCHES)
def test_unchanged_samples_are_centre_cropped(patch):
    params = with_p()
    setup = spatial_setup(patch, params)
    sample = tuple(s + 1 for s in setup.sample_size)
    if setup.do_dummy_2d:
        sample = (patch[0], *sample[1:])
    augmenter = DeviceAugmenter(patch, setup, params)
    image = smooth_image((2, *sample))[:, None]
    label = blobs(sample, batch=2)
    out, out_label = run(augmenter, image, label, augmenter.sample(2, 1, 0))
    starts = [(s - p) // 2 for s, p in zip(sample, patch)]  # batchgenerators' get_lbs_for_center_crop
    window = tuple(slice(a, a + p) for a, p in zip(starts, patch))
    assert np.array_equal(out, image[(slice(None), slice(None), *window)])
    assert np.array_equal(out_label, label[(slice(None), *window)])


@pytest.mark.parametrize(("sigma", "mode"), [(0.5, "reflect"), (1.0, "reflect"), (3.0, "reflect"), (9.0, "constant")])
def test_gaussian_smooth_matches_scipy(sigma, mode):
    """Blur (scipy's reflect border, default truncate 4 as batchgenerators) and the elastic field (zero border)."""
    rows = np.random.default_rng(0).normal(size=(3, 5, 9, 12)).astype(np.float32)
    sigmas = np.array([sigma, sigma / 2, sigma * 0.75])
    got = gaussian_smooth(torch.from_numpy(rows), sigmas, mode=mode).numpy()
    for row, s, g in zip(rows, sigmas, got):
        assert np.abs(g - gaussian_filter(row, s, mode=mode, cval=0.0)).max() < 1e-5


def test_blur_fires_per_channel_with_its_own_sigma():
    patch = (12, 12, 12)
    setup = spatial_setup(patch, with_p())
    augmenter = DeviceAugmenter(patch, setup, with_p())
    image = np.stack([smooth_image(setup.sample_size, s) for s in range(3)])[None]
    label = blobs(setup.sample_size, 1)
    sigma = np.array([[0.6, 0.9, 0.7]])
    parameters = fixed(
        augmenter, 1, 3, blur=np.array([True]), blur_channel=np.array([[True, False, True]]), blur_sigma=sigma
    )
    out, _ = run(augmenter, image, label, parameters)
    crop = run(augmenter, image, label, fixed(augmenter, 1, 3))[0]
    for c in range(3):
        if c == 1:
            assert np.array_equal(out[0, c], crop[0, c])
        else:
            assert np.abs(out[0, c] - gaussian_filter(crop[0, c], sigma[0, c])).max() < 1e-5


def test_noise_has_the_drawn_std_for_all_channels():
    """batchgenerators adds N(0, v) with v drawn from gaussian_noise_variance used as the std, one v per sample."""
    patch = (12, 12, 12)
    augmenter = DeviceAugmenter(patch, spatial_setup(patch, with_p()), with_p())
    image = np.stack([smooth_image(patch, 1), smooth_image(patch, 2)], axis=0)[None].repeat(2, axis=0)
    parameters = fixed(augmenter, 2, 2, noise=np.array([True, False]), noise_std=np.array([0.08, 0.05]))
    out, _ = run(augmenter, image, blobs(patch, 2), parameters)
    added = out - image
    assert np.array_equal(out[1], image[1])
    for c in range(2):  # 1728 voxels: the std estimate is within 5 % with 3 standard errors (1.7 %) to spare
        assert added[0, c].std() == pytest.approx(0.08, rel=0.05) and abs(added[0, c].mean()) < 0.08 * 0.1
    assert abs(np.corrcoef(added[0, 0].ravel(), added[0, 1].ravel())[0, 1]) < 0.1  # independent per channel


def test_mirroring_is_exact_for_image_and_label():
    patch = (8, 10, 12)
    setup = spatial_setup(patch, with_p())
    augmenter = DeviceAugmenter(patch, setup, with_p())
    image = smooth_image((3, *patch))[:, None]
    label = blobs(patch, 3)
    flags = np.array([[True, False, True], [False, False, False], [False, True, True]])
    out, out_label = run(augmenter, image, label, fixed(augmenter, 3, 1, mirror=flags))
    for b in range(3):
        axes = tuple(a for a in range(3) if flags[b, a])
        assert np.array_equal(out[b, 0], np.flip(image[b, 0], axes))
        assert np.array_equal(out_label[b], np.flip(label[b], axes))


def feed(monkeypatch, module: Any, name: str, values: list[float]) -> None:
    """Let ``module.name`` (a random draw) return ``values`` in turn."""
    stream: Iterator[float] = iter(values)
    monkeypatch.setattr(module, name, lambda *args, **kwargs: next(stream))


def intensity_case(**values: Any) -> tuple[np.ndarray, np.ndarray]:
    """A (1, 2, 10, 11, 12) image through the device chain with ``values`` fixed; also returns the input."""
    patch = (10, 11, 12)
    augmenter = DeviceAugmenter(patch, spatial_setup(patch, with_p()), with_p())
    image = np.stack([smooth_image(patch, 4) * 2 + 1, smooth_image(patch, 5)])[None]
    out, _ = run(augmenter, image, blobs(patch, 1), fixed(augmenter, 1, 2, **values))
    return out[0], image[0].copy()


def test_brightness_matches_batchgenerators(monkeypatch):
    out, image = intensity_case(brightness=np.array([True]), brightness_factor=np.array([[0.8, 1.2]]))
    feed(monkeypatch, np.random, "uniform", [0.5, 0.8, 1.2])  # its first draw is unused with per_channel
    want = augment_brightness_multiplicative(image.copy(), (0.75, 1.25), per_channel=True)
    assert np.abs(out - want).max() < 1e-5


def test_contrast_matches_batchgenerators():
    out, image = intensity_case(contrast=np.array([True]), contrast_factor=np.array([[0.8, 1.2]]))
    factors = iter([0.8, 1.2])
    want = augment_contrast(image.copy(), contrast_range=lambda: next(factors), preserve_range=True, per_channel=True)
    assert np.abs(out - want).max() < 1e-5
    assert out[1].max() == pytest.approx(image[1].max()) and out[1].min() == pytest.approx(image[1].min())


@pytest.mark.parametrize(("invert", "per_channel"), [(False, True), (True, True), (False, False)])
def test_gamma_matches_batchgenerators(monkeypatch, invert, per_channel):
    gammas = np.array([[0.75, 1.4]]) if per_channel else np.array([[1.3, 1.3]])
    name = "gamma_inverted" if invert else "gamma"
    patch = (10, 11, 12)
    params = dataclasses.replace(with_p(), gamma_per_channel=per_channel)
    augmenter = DeviceAugmenter(patch, spatial_setup(patch, params), params)
    image = np.stack([smooth_image(patch, 4) * 2 + 1, smooth_image(patch, 5)])[None]
    parameters = fixed(augmenter, 1, 2, **{name: np.array([True]), f"{name}_value": gammas})
    out, _ = run(augmenter, image, blobs(patch, 1), parameters)
    feed(monkeypatch, np.random, "uniform", list(gammas[0]))
    want = augment_gamma(image[0].copy(), (0.7, 1.5), invert_image=invert, per_channel=per_channel, retain_stats=True)
    assert np.abs(out[0] - want).max() < 1e-4
    assert np.abs(out[0] - image[0]).max() > 0.05  # it did something


@pytest.mark.parametrize(
    ("patch", "order_down", "order_up"), [((10, 11, 12), 0, 3), ((10, 11, 12), 0, 0), ((5, 22, 18), 1, 3)]
)
def test_low_resolution_matches_batchgenerators(monkeypatch, patch, order_down, order_up):
    """Down and back up as batchgenerators (skimage resize, cubic upsampling by default); dummy 2D keeps axis 0."""
    zooms = np.array([[0.55, 0.8]])
    params = dataclasses.replace(with_p(), order_downsample=order_down, order_upsample=order_up)
    setup = spatial_setup(patch, params)
    augmenter = DeviceAugmenter(patch, setup, params)
    image = np.stack([smooth_image(patch, 4), smooth_image(patch, 5)])[None]
    parameters = fixed(
        augmenter,
        1,
        2,
        low_resolution=np.array([True]),
        low_resolution_channel=np.array([[True, True]]),
        low_resolution_zoom=zooms,
    )
    out, _ = run(augmenter, image, blobs(patch, 1), parameters)
    feed(monkeypatch, resample_augmentations, "uniform", list(zooms[0]))
    want = augment_linear_downsampling_scipy(
        image[0].copy(),
        (0.5, 1),
        per_channel=True,
        p_per_channel=1,
        order_downsample=order_down,
        order_upsample=order_up,
        ignore_axes=(0,) if setup.do_dummy_2d else None,
    )
    assert np.abs(out[0] - want).max() < 1e-5
    assert np.abs(out[0] - image[0]).max() > 0.1  # it did something
    if order_down == 0:  # the downsampled grid itself: nearest, as skimage's order 0
        target = np.round(np.array(patch) * zooms[0, 0]).astype(int)
        down = _resize(torch.from_numpy(image[0, :1]), target.tolist(), 0)[0].numpy()
        assert np.array_equal(down, resize(image[0, 0], target, order=0, mode="edge", anti_aliasing=False))


# --- 3. statistics against the CPU pipeline -------------------------------------------------------------------------
def test_sampled_parameters_follow_the_cpu_distributions():
    """2000 samples: each firing rate within 3 binomial standard errors of the CPU's probability, each drawn value
    distributed as batchgenerators draws it (Kolmogorov-Smirnov p > 0.001)."""
    params = dataclasses.replace(AugmentationParams(), p_elastic=0.3)
    patch = (16, 16, 16)
    augmenter = DeviceAugmenter(patch, spatial_setup(patch, params), params)
    n, channels = 2000, 2
    draw = augmenter.sample(n, channels, seed=11)

    def rate(fired: np.ndarray, p: float) -> None:
        fired = fired.reshape(-1)
        assert abs(fired.mean() - p) <= 3 * np.sqrt(p * (1 - p) / fired.size), (fired.mean(), p)

    rate(draw.elastic, params.p_elastic)
    rate(draw.rotation, params.p_rotation)
    rate(draw.scaling, params.p_scaling)
    rate(draw.noise, params.p_gaussian_noise)
    rate(draw.blur, params.p_gaussian_blur)
    rate(draw.blur_channel[draw.blur], params.blur_p_per_channel)
    rate(draw.brightness, params.p_brightness)
    rate(draw.contrast, params.p_contrast)
    rate(draw.low_resolution, params.p_low_resolution)
    rate(draw.low_resolution_channel[draw.low_resolution], params.low_resolution_p_per_channel)
    rate(draw.gamma_inverted, params.p_gamma_inverted)
    rate(draw.gamma, params.p_gamma)
    rate(draw.mirror, params.p_mirror_per_axis)
    assert np.all(draw.angles[~draw.rotation] == 0) and np.all(draw.scale[~draw.scaling] == 1)
    assert np.all(draw.scale[:, 0:1] == draw.scale)  # one factor for all axes

    def split(bounds: tuple[float, float]) -> Any:  # half U(low, 1), half U(1, high)
        low, high = bounds
        return lambda x: 0.5 * stats.uniform(low, 1 - low).cdf(x) + 0.5 * stats.uniform(1, high - 1).cdf(x)

    def uniform(bounds: tuple[float, float]) -> Any:
        return stats.uniform(bounds[0], bounds[1] - bounds[0]).cdf

    low, high = augmenter.setup.rotation_rad[0]
    for values, cdf in (
        (draw.angles[draw.rotation].reshape(-1), uniform((low, high))),
        (draw.scale[draw.scaling, 0], split(params.scaling_range)),
        (draw.elastic_alpha, uniform(params.elastic_alpha)),
        (draw.elastic_sigma, uniform(params.elastic_sigma)),
        (draw.noise_std, uniform(params.gaussian_noise_variance)),
        (draw.blur_sigma.reshape(-1), uniform(params.blur_sigma)),
        (draw.brightness_factor.reshape(-1), uniform(params.brightness_range)),
        (draw.contrast_factor.reshape(-1), split(params.contrast_range)),
        (draw.low_resolution_zoom.reshape(-1), uniform(params.low_resolution_zoom)),
        (draw.gamma_value.reshape(-1), split(params.gamma_range)),
        (draw.gamma_inverted_value.reshape(-1), split(params.gamma_range)),
    ):
        assert stats.kstest(values, cdf).pvalue > 1e-3


@pytest.fixture(scope="module")
def stats_batch() -> tuple[tuple[int, ...], Any, np.ndarray, np.ndarray]:
    patch = (12, 12, 12)
    setup = spatial_setup(patch, AugmentationParams())
    label = blobs(setup.sample_size, batch=8, seed=5)
    image = (label[:, None] * 1.5 + smooth_image((8, 1, *setup.sample_size), 6)).astype(np.float32)
    return patch, setup, image, label


def both(params: AugmentationParams, stats_batch, batches: int) -> tuple[np.ndarray, ...]:
    """Outputs of ``batches`` seeds from the CPU chain and from the device twin, concatenated."""
    patch, setup, image, label = stats_batch
    cpu, device = train_augmenter(patch, setup, params), DeviceAugmenter(patch, setup, params)
    outputs: list[list[np.ndarray]] = [[], [], [], []]
    for seed in range(batches):
        cpu_image, cpu_label = cpu(image.copy(), label[:, None].copy(), seed)
        dev_image, dev_label = device(torch.from_numpy(image), torch.from_numpy(label), seed)
        for store, value in zip(outputs, (cpu_image, cpu_label[:, 0], dev_image.numpy(), dev_label.numpy())):
            store.append(value)
    return tuple(np.concatenate(o) for o in outputs)


@pytest.mark.parametrize("name", [*SPATIAL[:2], *INTENSITY, "p_mirror_per_axis"])
def test_each_transform_fires_as_often_as_on_the_cpu(name, stats_batch):
    """One transform at its default probability: the fraction of samples it changes (against the centre crop) on
    the device is within 3 standard errors of the CPU's (two-sample binomial, 320 samples each)."""
    default = getattr(AugmentationParams(), name)
    cpu_image, _, dev_image, _ = both(with_p(**{name: default}), stats_batch, batches=40)
    patch, _, image, _ = stats_batch
    starts = [(s - p) // 2 for s, p in zip(image.shape[2:], patch)]
    crop = image[(slice(None), slice(None), *(slice(a, a + p) for a, p in zip(starts, patch)))]
    crop = np.concatenate([crop] * (len(cpu_image) // len(crop)))
    changed = [np.abs(out - crop).reshape(len(out), -1).max(1) > 1e-6 for out in (cpu_image, dev_image)]
    pooled = (changed[0].mean() + changed[1].mean()) / 2
    tolerance = 3 * np.sqrt(2 * pooled * (1 - pooled) / len(cpu_image))
    assert abs(changed[0].mean() - changed[1].mean()) <= tolerance, (changed[0].mean(), changed[1].mean())
    assert changed[1].mean() > 0


def test_outputs_match_the_cpu_pipeline_statistically(stats_batch):
    """The whole default chain, 480 samples: the means of the per-sample image mean and std, and the fraction of
    each label, agree with the CPU pipeline within 4 standard errors of their difference."""
    cpu_image, cpu_label, dev_image, dev_label = both(AugmentationParams(), stats_batch, batches=60)

    def per_sample(image: np.ndarray, label: np.ndarray) -> dict[str, np.ndarray]:
        flat, labels = image.reshape(len(image), -1), label.reshape(len(label), -1)
        found = {"mean": flat.mean(1), "std": flat.std(1)}
        found.update({f"label {k}": (labels == k).mean(1) for k in (-1, 0, 1, 2)})
        return found

    cpu, device = per_sample(cpu_image, cpu_label), per_sample(dev_image, dev_label)
    for key in cpu:
        a, b = cpu[key], device[key]
        error = np.sqrt(a.var() / len(a) + b.var() / len(b))
        assert abs(a.mean() - b.mean()) <= 4 * error, (key, a.mean(), b.mean(), error)


# --- 4. determinism, set-up checks, the acquisition hook -------------------------------------------------------------
@pytest.mark.parametrize("patch", PATCHES)
def test_same_seed_same_batch_other_seed_other_batch(patch):
    params = dataclasses.replace(AugmentationParams(), p_elastic=0.5, p_gaussian_noise=0.5)
    setup = spatial_setup(patch, params)
    augmenter = DeviceAugmenter(patch, setup, params)
    image = torch.from_numpy(smooth_image((4, 2, *setup.sample_size)))
    label = torch.from_numpy(blobs(setup.sample_size, 4))
    first, again, other = augmenter(image, label, 7), augmenter(image, label, 7), augmenter(image, label, 8)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    assert first[0].shape == (4, 2, *patch) and first[1].dtype == torch.int16


def test_unsupported_settings_are_refused_with_a_reason(monkeypatch):
    assert unsupported(AugmentationParams()) is None
    cubic = dataclasses.replace(AugmentationParams(), order_image=3)
    assert "order_image" in (unsupported(cubic) or "")
    with pytest.raises(AutosegError, match="order_image"):
        DeviceAugmenter((16, 16, 16), spatial_setup((16, 16, 16)), cubic)
    pediatric = dataclasses.replace(AugmentationParams(), p_bias_field=0.3)
    monkeypatch.setitem(sys.modules, device_module.PEDIATRIC_MODULE, None)  # import fails
    assert "p_bias_field" in (unsupported(pediatric) or "")
    setup = spatial_setup((16, 16, 16))
    augmenter = DeviceAugmenter((16, 16, 16), setup, AugmentationParams())
    with pytest.raises(AutosegError, match="sample"):
        augmenter(torch.zeros(1, 1, 10, 10, 10), torch.zeros(1, 10, 10, 10, dtype=torch.int16), 0)


def test_acquisition_runs_between_spatial_and_intensity(monkeypatch):
    """With an acquisition probability > 0 the pediatric module gets the spatially transformed batch, the host
    generator continuing after the device twin's draws, and in_plane_only = dummy 2D; noise follows it."""
    calls: list[dict[str, Any]] = []

    def apply_acquisition(image, label, params, rng, generator, in_plane_only):
        calls.append({"shape": tuple(image.shape), "label": tuple(label.shape), "draw": rng.random()})
        calls[-1]["in_plane_only"] = in_plane_only
        return torch.full_like(image, 5.0)

    fake = types.ModuleType(device_module.PEDIATRIC_MODULE)
    fake.apply_acquisition = apply_acquisition  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, device_module.PEDIATRIC_MODULE, fake)
    patch = (6, 24, 20)
    params = dataclasses.replace(with_p(p_rotation=1), p_motion=0.5)
    assert unsupported(params) is None
    setup = spatial_setup(patch, params)
    augmenter = DeviceAugmenter(patch, setup, params)
    image = torch.from_numpy(smooth_image((2, 1, *setup.sample_size)))
    out, _ = augmenter(image, torch.from_numpy(blobs(setup.sample_size, 2)), seed=4)
    parameters = augmenter.sample(2, 1, seed=4)
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = parameters.rng_state
    assert calls == [{"shape": (2, 1, *patch), "label": (2, *patch), "draw": rng.random(), "in_plane_only": True}]
    assert torch.all(out == 5.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_agrees_with_cpu_tensors():
    """Without the random fields (noise, elastic) a CUDA batch equals the CPU-tensor batch of the same seed."""
    params = dataclasses.replace(AugmentationParams(), p_rotation=0.5, p_scaling=0.5, p_gaussian_noise=0.0)
    patch = (16, 16, 16)
    setup = spatial_setup(patch, params)
    augmenter = DeviceAugmenter(patch, setup, params)
    image = torch.from_numpy(smooth_image((4, 2, *setup.sample_size)))
    label = torch.from_numpy(blobs(setup.sample_size, 4))
    cpu_image, cpu_label = augmenter(image, label, 9)
    gpu_image, gpu_label = augmenter(image.cuda(), label.cuda(), 9)
    assert gpu_image.is_cuda and gpu_label.dtype == torch.int16
    assert (gpu_image.cpu() - cpu_image).abs().max() < 1e-3
    assert (gpu_label.cpu() != cpu_label).float().mean() < 2e-3
