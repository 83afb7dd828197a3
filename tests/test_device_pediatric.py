"""Torch twins of the pediatric acquisition transforms: each twin against the numpy twin of ``pediatric.py``,
the whole batch against the numpy twins driven by the same draw, and the sampling (probabilities, channels,
in-plane axes, determinism)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from numpy.polynomial.legendre import legvander

from autoseg.augment import AugmentationParams
from autoseg.augment.device_pediatric import (
    BiasFieldDraw,
    ContrastRemapDraw,
    GhostingDraw,
    MotionDraw,
    ThickSliceDraw,
    acquisition_axes,
    apply_acquisition,
    bias_field_map_torch,
    bias_field_torch,
    draw_acquisition,
    kspace_ghosting_torch,
    legendre_basis,
    motion_blur_torch,
    remap_contrast_torch,
    simulate_thick_slices_torch,
)
from autoseg.augment.pediatric import (
    bias_field,
    bias_field_map,
    contrast_mask,
    kspace_ghosting,
    motion_blur,
    remap_contrast,
    simulate_thick_slices,
)
from autoseg.errors import AutosegError

ATOL = 1e-5  # float32 on values of order 1 (the numpy twins work partly in float64)
P_NAMES = ("p_contrast_remap", "p_bias_field", "p_motion", "p_ghosting", "p_thick_slice")
SHAPES = [(6, 7, 8), (9, 10)]


def params_with(**p: float) -> AugmentationParams:
    return dataclasses.replace(AugmentationParams(), **p)


def every_transform(p: float) -> AugmentationParams:
    return params_with(**dict.fromkeys(P_NAMES, p))


def random_items(shape: tuple[int, ...], count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, *shape)).astype(np.float32)


def assert_items_match(out: torch.Tensor, expected: list[np.ndarray], atol: float = ATOL) -> None:
    assert out.dtype == torch.float32 and out.shape == (len(expected), *expected[0].shape)
    for item, reference in zip(out.numpy(), expected):
        np.testing.assert_allclose(item, reference, atol=atol, rtol=0)


# --- twins against numpy ----------------------------------------------------------------------------------------
def test_legendre_basis_is_legvander():
    basis = legendre_basis(9, 5, torch.device("cpu"), torch.float64).numpy()
    np.testing.assert_allclose(basis, legvander(np.linspace(-1, 1, 9), 4), atol=1e-12)
    assert legendre_basis(4, 1, torch.device("cpu"), torch.float32).shape == (4, 1)


@pytest.mark.parametrize("shape", SHAPES)
def test_bias_field_twin(shape):
    images = random_items(shape, 3)
    coefficients = np.random.default_rng(1).uniform(-0.3, 0.3, (3, *(4,) * len(shape)))
    field = bias_field_map_torch(shape, torch.as_tensor(coefficients, dtype=torch.float32))
    assert_items_match(field, [bias_field_map(shape, c) for c in coefficients])
    out = bias_field_torch(torch.from_numpy(images), coefficients)
    assert_items_match(out, [bias_field(i, c) for i, c in zip(images, coefficients)])


@pytest.mark.parametrize("shape", SHAPES)
def test_kspace_ghosting_twin(shape):
    images = random_items(shape, 4)
    period, offset, intensity = (
        [2, 4, 5, 3],
        [0, 1, 3, 2],
        [0.5, 1.0, 0.3, 0.0],
    )  # 5 divides no length, 0 moves the mean
    for axis in range(len(shape)):
        out = kspace_ghosting_torch(torch.from_numpy(images), axis, period, offset, intensity)
        expected = [kspace_ghosting(images[i], axis, period[i], offset[i], intensity[i]) for i in range(4)]
        assert_items_match(out, expected)


@pytest.mark.parametrize("shape", SHAPES)
def test_motion_blur_twin(shape):
    images = random_items(shape, 3)
    rng = np.random.default_rng(2)
    for axis in range(len(shape)):
        shifts = rng.uniform(-3, 3, (3, 3, len(shape)))
        shifts[0, 1] = [2.0] + [0.0] * (len(shape) - 1)  # an integer shift: a roll
        segments = rng.integers(0, 3, (3, shape[axis]))
        out = motion_blur_torch(torch.from_numpy(images), axis, shifts, segments)
        assert_items_match(out, [motion_blur(images[i], axis, shifts[i], segments[i]) for i in range(3)])
    one_position = np.zeros((3, shape[0]), np.int64)
    rolled = motion_blur_torch(torch.from_numpy(images), 0, np.full((3, 1, len(shape)), 1.0), one_position)
    assert_items_match(rolled, [np.roll(image, 1, axis=tuple(range(len(shape)))) for image in images])
    with pytest.raises(ValueError, match="segments"):
        motion_blur_torch(torch.from_numpy(images), 0, np.zeros((3, 1, len(shape))), one_position + 1)


@pytest.mark.parametrize("shape", SHAPES)
def test_remap_contrast_twin(shape):
    rng = np.random.default_rng(3)
    images = random_items(shape, 5)
    images[:, : shape[0] // 2] = 0.0  # background
    labels = rng.integers(-1, 3, (5, *shape)).astype(np.int16)
    masks = np.stack([contrast_mask(i, lab) for i, lab in zip(images, labels)])
    masks[3] = False
    masks[3].flat[7] = True  # one voxel: left as it is
    curve_x = np.sort(rng.uniform(-2, 2, (5, 5)), axis=1)
    curve_y = rng.uniform(-2, 2, (5, 5))
    curve_y[1] = np.sort(curve_y[1])  # rising, and the others non-monotone
    curve_y[4] = 0.5  # flat: left as it is
    out = remap_contrast_torch(torch.from_numpy(images), torch.from_numpy(masks), curve_x, curve_y)
    assert_items_match(out, [remap_contrast(images[i], masks[i], curve_x[i], curve_y[i]) for i in range(5)])
    assert torch.equal(out[3], torch.from_numpy(images[3])) and torch.equal(out[4], torch.from_numpy(images[4]))
    assert not np.allclose(out[0].numpy(), images[0])


@pytest.mark.parametrize("length", [3, 7, 16])
def test_thick_slices_twin_every_factor_order_and_offset(length):
    combos = [(f, o, s) for f in range(2, 6) for o in (0, 1) for s in range(f)]
    images = random_items((length, 3, 4), len(combos))
    factor, order, offset = (np.array(column) for column in zip(*combos))
    out = simulate_thick_slices_torch(torch.from_numpy(images), 0, factor, order, offset)
    # numpy's twin fails when no slab starts inside the axis (offset >= length); the torch twin then averages
    # the whole axis as one slab, as a first slab covering "the slices before" the first start would
    whole = images.mean(axis=1, keepdims=True).repeat(length, axis=1)
    expected = [
        simulate_thick_slices(images[i], 0, *combos[i]) if combos[i][2] < length else whole[i]
        for i in range(len(combos))
    ]
    assert_items_match(out, expected)
    flat = random_items((5, length), 4)  # 2D, along the last axis
    out = simulate_thick_slices_torch(torch.from_numpy(flat), 1, [2, 3, 4, 5], [1, 0, 1, 0], [1, 2, 0, 2])
    expected = [
        simulate_thick_slices(flat[i], 1, f, o, s)
        for i, (f, o, s) in enumerate(zip([2, 3, 4, 5], [1, 0, 1, 0], [1, 2, 0, 2]))
    ]
    assert_items_match(out, expected)
    with pytest.raises(ValueError, match="order"):
        simulate_thick_slices_torch(torch.from_numpy(flat), 1, 2, 2, 0)


# --- the batch against the numpy twins, driven by the same draw ----------------------------------------------------
def head_batch(shape: tuple[int, ...], batch: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy positive intensities inside a sphere, 0 outside, a padding border of label -1 and image 0."""
    rng = np.random.default_rng(0)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    radius = np.sqrt(sum(g**2 for g in grids))
    label = np.where(radius < 0.8, 1, 0) + (radius < 0.4)
    label[:1] = -1
    image = np.where(label > 0, 1.0 + label, 0.0) + 0.1 * rng.standard_normal((batch, channels, *shape))
    image = np.where(label == -1, 0.0, image).astype(np.float32)
    return torch.from_numpy(image), torch.from_numpy(np.repeat(label[None], batch, 0).astype(np.int16))


def numpy_reference(
    image: np.ndarray, label: np.ndarray, draws: list, channels: int, params: AugmentationParams
) -> np.ndarray:
    """What the CPU samplers compute with these parameters: each numpy twin, item by item, in order."""
    out = image.copy()
    for draw in draws:
        items = [(b, c) for b in draw.samples for c in range(channels)]
        for i, (b, c) in enumerate(items):
            x = out[b, c]
            if isinstance(draw, ContrastRemapDraw):
                mask = contrast_mask(x, label[b], -1)
                low, high = float(x[mask].min()), float(x[mask].max())
                curve_x = np.linspace(low, high, params.contrast_remap_points)
                out[b, c] = remap_contrast(x, mask, curve_x, low + (high - low) * draw.levels[i])
            elif isinstance(draw, BiasFieldDraw):
                largest = np.abs(bias_field_map(x.shape, draw.coefficients[i])).max()
                out[b, c] = bias_field(x, draw.coefficients[i] * draw.amplitude[i] / largest)
            elif isinstance(draw, MotionDraw):
                out[b, c] = motion_blur(x, int(draw.axis[i]), draw.shifts[i], draw.segments[i])
            elif isinstance(draw, GhostingDraw):
                period, offset = int(draw.period[i]), int(draw.offset[i])
                out[b, c] = kspace_ghosting(x, int(draw.axis[i]), period, offset, float(draw.intensity[i]))
            elif isinstance(draw, ThickSliceDraw):
                factor, order, offset = int(draw.factor[i]), int(draw.order[i]), int(draw.offset[i])
                out[b, c] = simulate_thick_slices(x, int(draw.axis[i]), factor, order, offset)
    return out


@pytest.mark.parametrize(("shape", "in_plane_only"), [((8, 12, 12), False), ((8, 12, 12), True), ((14, 12), False)])
def test_apply_acquisition_is_the_numpy_twins_of_its_draw(shape, in_plane_only):
    image, label = head_batch(shape, batch=4, channels=2)
    before_image, before_label = image.clone(), label.clone()
    params = every_transform(0.6)
    out = apply_acquisition(image, label, params, np.random.default_rng(12), torch.Generator(), in_plane_only)
    draws = draw_acquisition(params, 4, 2, shape, np.random.default_rng(12), in_plane_only)
    assert [type(d) for d in draws] == [ContrastRemapDraw, BiasFieldDraw, MotionDraw, GhostingDraw, ThickSliceDraw]
    assert all(0 < len(d.samples) < 4 for d in draws)  # seed 12: every transform fires on some samples, not all
    expected = numpy_reference(image.numpy(), label.numpy(), draws, 2, params)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-4, rtol=0)
    assert out.shape == image.shape and out.dtype == torch.float32
    assert torch.equal(image, before_image) and torch.equal(label, before_label)  # inputs untouched


def test_apply_acquisition_is_deterministic():
    image, label = head_batch((8, 10, 10), batch=3, channels=2)
    params = every_transform(0.5)

    def run(seed: int) -> torch.Tensor:
        return apply_acquisition(
            image, label, params, np.random.default_rng(seed), torch.Generator().manual_seed(1), False
        )

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))
    permuted = image.permute(0, 2, 3, 4, 1).contiguous().permute(0, 4, 1, 2, 3)  # same values, channels last
    assert torch.equal(
        apply_acquisition(permuted, label, params, np.random.default_rng(3), torch.Generator(), False), run(3)
    )
    nothing = apply_acquisition(image, label, every_transform(0.0), np.random.default_rng(3), torch.Generator(), False)
    assert torch.equal(nothing, image)


def test_every_channel_gets_its_own_parameters():
    image = torch.from_numpy(np.repeat(random_items((10, 10, 10), 2)[:, None], 2, axis=1))  # two equal channels
    label = torch.zeros((2, 10, 10, 10), dtype=torch.int16)
    for name in P_NAMES:
        out = apply_acquisition(
            image, label, params_with(**{name: 1.0}), np.random.default_rng(0), torch.Generator(), False
        )
        assert not torch.allclose(out[:, 0], out[:, 1], atol=1e-3), name


# --- sampling ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "p"),
    [
        ("p_contrast_remap", 0.1),
        ("p_bias_field", 0.25),
        ("p_motion", 0.5),
        ("p_ghosting", 0.2),
        ("p_thick_slice", 0.35),
    ],
)
def test_each_transform_fires_on_its_fraction_of_samples_and_only_there(name, p):
    # 2000 samples: the count's binomial standard error is sqrt(2000 p (1 - p)) (13 at p = 0.1); 3 of them is
    # the tolerance. A 10 x 10 image: every ghosting offset (<= 9) hits a line, so a picked sample always changes.
    batch = 2000
    image = torch.from_numpy(random_items((10, 10), batch, seed=5)[:, None])
    label = torch.zeros((batch, 10, 10), dtype=torch.int16)
    params = params_with(**{name: p})
    out = apply_acquisition(image, label, params, np.random.default_rng(11), torch.Generator(), False)
    changed = np.flatnonzero((out != image).flatten(1).any(1).numpy())
    (draw,) = draw_acquisition(params, batch, 1, (10, 10), np.random.default_rng(11), False)
    np.testing.assert_array_equal(changed, draw.samples)  # the picked samples change, no others
    assert abs(len(changed) - batch * p) <= 3 * math.sqrt(batch * p * (1 - p))


def test_in_plane_only_leaves_the_first_axis_alone():
    # constant within each axis-0 slice: in-plane ghosting (offset >= 1 spares the centre line), motion (shifts
    # in-plane only) and thick slices cannot change it; along axis 0 any of the three would.
    profile = np.random.default_rng(6).standard_normal((6, 2, 12)).astype(np.float32)
    image = torch.from_numpy(np.broadcast_to(profile[..., None, None], (6, 2, 12, 10, 10)).copy())
    label = torch.zeros((6, 12, 10, 10), dtype=torch.int16)
    params = params_with(p_motion=1.0, p_ghosting=1.0, p_thick_slice=1.0)
    in_plane = apply_acquisition(image, label, params, np.random.default_rng(0), torch.Generator(), True)
    torch.testing.assert_close(in_plane, image, atol=1e-5, rtol=0)
    every_axis = apply_acquisition(image, label, params, np.random.default_rng(0), torch.Generator(), False)
    assert (every_axis - image).abs().max() > 0.1  # the control: acting along axis 0 shows
    draws = draw_acquisition(params, 6, 2, (12, 10, 10), np.random.default_rng(0), True)
    assert all(set(d.axis) <= {1, 2} for d in draws)
    assert acquisition_axes(2, True) == (1,) and acquisition_axes(3, False) == (0, 1, 2)  # CPU's rule for 2D


def test_in_plane_only_on_2d_acts_along_the_last_axis():
    profile = np.random.default_rng(8).standard_normal((4, 1, 12)).astype(np.float32)
    image = torch.from_numpy(np.broadcast_to(profile[..., None], (4, 1, 12, 10)).copy())
    label = torch.zeros((4, 12, 10), dtype=torch.int16)
    params = params_with(p_motion=1.0, p_ghosting=1.0, p_thick_slice=1.0)
    out = apply_acquisition(image, label, params, np.random.default_rng(0), torch.Generator(), True)
    torch.testing.assert_close(out, image, atol=1e-5, rtol=0)


def test_errors_name_the_field():
    image, label = head_batch((8, 10, 10), batch=2, channels=1)
    with pytest.raises(AutosegError, match="ghosting_period"):
        apply_acquisition(
            image,
            label,
            params_with(p_ghosting=0.5, ghosting_period=(1, 3)),
            np.random.default_rng(0),
            torch.Generator(),
            False,
        )
    with pytest.raises(AutosegError, match="label"):
        apply_acquisition(
            image, label[:, None], every_transform(0.5), np.random.default_rng(0), torch.Generator(), False
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    image, label = head_batch((16, 24, 24), batch=4, channels=2)
    params = every_transform(0.7)
    cpu = apply_acquisition(image, label, params, np.random.default_rng(2), torch.Generator(), False)
    device = torch.device("cuda")
    gpu = apply_acquisition(
        image.to(device), label.to(device), params, np.random.default_rng(2), torch.Generator(device), False
    )
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
