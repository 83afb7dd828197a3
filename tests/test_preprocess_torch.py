"""Preprocessing on the device (``autoseg.inference.preprocess_torch``) against ``preprocess_case`` on the CPU.

Run here on CPU tensors: the torch arithmetic is the same on every device, so what these tests pin down is
that the split path (crop on the CPU, normalise and resample with torch) gives ``preprocess_case``'s image
to float32 rounding and its very properties, for every built-in normalisation scheme (masked or not), for
isotropic and thick-slice resampling, transposed plans and 2D configurations; and that a predictor with
``device_preprocessing`` predicts what it predicts without.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import blob_case
from test_predict import (  # noqa: F401  (plan and input_dir are fixtures, used by name)
    ON_GRID,
    THICK_ROTATED,
    asymmetric_case,
    dice,
    input_dir,
    plan,
    write_model,
)

from autoseg.fingerprint import IntensityStats
from autoseg.inference import preprocess_torch
from autoseg.inference.predictor import Predictor, predict_folder
from autoseg.inference.preprocess_torch import (
    TORCH_NORMALIZERS,
    crop_case,
    finish_on_device,
    mean_and_std_torch,
)
from autoseg.io import Geometry, read_image
from autoseg.plan import Configuration, NetworkPlan, Plan, ResamplingPlan
from autoseg.preprocessing.case import preprocess_case
from autoseg.preprocessing.normalize import (
    NORMALIZERS,
    Normalizer,
    ZScoreNormalizer,
    mean_and_std,
    register_normalizer,
)
from autoseg.preprocessing.resample import thick_axis

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
# float32 rounding, relative to the image's largest magnitude: the axes are multiplied in another order than
# on the CPU (measured up to 3.8e-7 here); 2e-6 leaves room without hiding a wrong weight or statistic
RELATIVE_TOLERANCE = 2e-6
# the foreground statistics of the 'ct' scheme: clips the blob's 50..270 intensities at both ends
CT_STATS = IntensityStats(
    mean=120.0, median=115.0, std=40.0, min=0.0, max=300.0, percentile_00_5=60.0, percentile_99_5=200.0
)


def make_plan(
    normalization: tuple[str, ...],
    use_mask: tuple[bool, ...],
    spacing_mm: tuple[float, ...],
    transpose: tuple[int, ...] = (0, 1, 2),
    resampling: ResamplingPlan | None = None,
) -> tuple[Plan, Configuration]:
    dim = len(spacing_mm)
    network = NetworkPlan("plain_unet", (4, 8), ((3,) * dim, (3,) * dim), ((1,) * dim, (2,) * dim), (1, 1), (1,))
    configuration = Configuration(
        name=f"{dim}d", data_identifier="test", spacing_mm=spacing_mm, median_shape=(16,) * dim,
        patch_size=(16,) * dim, batch_size=2, batch_dice=False, normalization=normalization,
        use_mask_for_norm=use_mask, network=network, resampling=resampling or ResamplingPlan(),
    )  # fmt: skip
    backward = tuple(int(a) for a in np.argsort(transpose))
    hand_plan = Plan(
        schema_version=Plan.SCHEMA_VERSION, dataset_name="Dataset001_Test", planner="test", gpu_memory_gb=8.0,
        transpose_forward=transpose, transpose_backward=backward, original_median_spacing_mm=(1.0, 1.0, 1.0),
        original_median_shape=(16, 16, 16), channel_names=tuple(f"c{c}" for c in range(len(normalization))),
        labels={"background": 0, "outer": 1, "inner": 2},
        foreground_intensity_per_channel=(CT_STATS,) * len(normalization),
        configurations={configuration.name: configuration},
    )  # fmt: skip
    return hand_plan, configuration


def assert_device_path_equals_the_cpu_one(
    image: np.ndarray, geometry: Geometry, hand_plan: Plan, configuration: Configuration
) -> np.ndarray:
    expected = preprocess_case(image, None, geometry, hand_plan, configuration, "case", 0)
    cropped = crop_case(image, geometry, hand_plan.transpose_forward, "case")
    before = cropped.image.copy()
    actual = finish_on_device(cropped, hand_plan, configuration, "cpu")
    assert np.array_equal(cropped.image, before)  # the CPU crop is not normalised in place (shared memory)
    assert actual.properties == expected.properties
    assert actual.image.dtype == torch.float32 and tuple(actual.image.shape) == expected.image.shape
    scale = max(1.0, float(np.abs(expected.image).max()))
    assert np.abs(actual.image.numpy() - expected.image).max() <= RELATIVE_TOLERANCE * scale
    return expected.image


# (spacing of the case, target spacing, resampling plan, thick axis expected)
ISOTROPIC = ((1.2, 1.0, 0.9), (1.0, 1.1, 0.7), ResamplingPlan(), None)
THICK = ((4.0, 1.0, 1.0), (1.5, 0.8, 0.9), ResamplingPlan(), 0)  # 4 / 1 > 3: the thick axis apart, order 0
THICK_LINEAR = ((1.0, 4.5, 1.2), (1.0, 1.5, 0.9), ResamplingPlan(out_of_plane_order=1), 1)


@pytest.mark.parametrize("scheme", ["zscore", "zscore_masked", "ct", "none", "rescale_to_0_1"])
@pytest.mark.parametrize("grid", [ISOTROPIC, THICK, THICK_LINEAR], ids=["isotropic", "thick", "thick_linear"])
def test_every_builtin_scheme_equals_preprocess_case(scheme, grid):
    spacing, target, resampling, axis = grid
    assert thick_axis(spacing, target, resampling.anisotropy_threshold) == axis
    name, masked = scheme.removesuffix("_masked"), scheme.endswith("_masked")
    hand_plan, configuration = make_plan((name,), (masked,), target, resampling=resampling)
    image, _ = blob_case((14, 16, 15), np.random.default_rng(0))
    result = assert_device_path_equals_the_cpu_one(
        image, Geometry(spacing, (0.0,) * 3, IDENTITY), hand_plan, configuration
    )
    if masked:  # a real mask: the air in the crop box's corners is outside, zero after normalisation
        assert abs(result[0, 0, 0, 0]) < 1e-3 * np.abs(result).max()  # (up to the splines' ringing)


def test_masked_and_unmasked_zscore_differ_and_both_match():
    """Two channels with different schemes, one masked: each channel gets its own (the mask only where asked)."""
    image, _ = blob_case((12, 14, 16), np.random.default_rng(1), channels=2)
    geometry = Geometry((3.5, 1.0, 1.1), (0.0,) * 3, IDENTITY)  # thick first axis, transposed below
    hand_plan, configuration = make_plan(("zscore", "zscore"), (True, False), (1.1, 1.0, 1.5), transpose=(1, 2, 0))
    result = assert_device_path_equals_the_cpu_one(image, geometry, hand_plan, configuration)
    assert (result[0] == 0).sum() > (result[1] == 0).sum()  # only the masked channel is zeroed outside


def test_mixed_schemes_and_a_2d_configuration():
    image, _ = blob_case((10, 14, 12), np.random.default_rng(2), channels=2)
    geometry = Geometry((3.0, 0.9, 1.1), (0.0,) * 3, IDENTITY)
    hand_plan, configuration = make_plan(("ct", "zscore"), (False, True), (1.2, 0.8))  # 2D: keeps the slice spacing
    assert_device_path_equals_the_cpu_one(image, geometry, hand_plan, configuration)


def test_an_all_zero_image_stays_zero_under_masked_zscore():
    """Nothing is nonzero: the crop keeps the volume, the mask is empty, and both paths give zeros (no NaN)."""
    hand_plan, configuration = make_plan(("zscore",), (True,), (1.0, 1.0, 1.0))
    image = np.zeros((1, 6, 7, 8), np.float32)
    geometry = Geometry((1.0, 1.3, 0.8), (0.0,) * 3, IDENTITY)
    result = assert_device_path_equals_the_cpu_one(image, geometry, hand_plan, configuration)
    assert not result.any()


def test_statistics_over_several_chunks_equal_mean_and_std(monkeypatch):
    monkeypatch.setattr(preprocess_torch, "_DEVICE_CHUNK_VOXELS", 1000)  # 8 chunks, the last one partial
    values = np.random.default_rng(3).normal(40.0, 7.0, (20, 19, 20)).astype(np.float32)
    mask = np.random.default_rng(4).random(values.shape) < 0.3
    for m in (None, mask):
        mean, std = mean_and_std_torch(torch.from_numpy(values), None if m is None else torch.from_numpy(m))
        expected_mean, expected_std = mean_and_std(values, m)
        assert mean.dtype == torch.float64
        assert abs(float(mean) - expected_mean) < 1e-12 * abs(expected_mean)
        assert abs(float(std) - expected_std) < 1e-12 * expected_std


class SquareRootNormalizer(Normalizer):
    """A scheme of one's own without a torch twin: sqrt of the intensities, then / the masked max."""

    def __call__(self, image: np.ndarray, mask: np.ndarray | None, stats: IntensityStats | None) -> np.ndarray:
        np.sqrt(np.abs(image), out=image)
        image /= np.float32(max(float(image[mask].max() if mask is not None else image.max()), 1.0))
        return image


class ShiftedZScore(ZScoreNormalizer):
    """A subclass that changes the arithmetic: its parent's twin must not be used for it."""

    def __call__(self, image: np.ndarray, mask: np.ndarray | None, stats: IntensityStats | None) -> np.ndarray:
        return super().__call__(image, mask, stats) + np.float32(3.0)


for _name, _normalizer in (("test_square_root", SquareRootNormalizer), ("test_shifted_zscore", ShiftedZScore)):
    if _name not in NORMALIZERS:
        register_normalizer(_name)(_normalizer)


@pytest.mark.parametrize("name", ["test_square_root", "test_shifted_zscore"])
def test_a_scheme_without_a_twin_falls_back_to_its_cpu_normaliser(name):
    assert NORMALIZERS.get(name) not in TORCH_NORMALIZERS
    image, _ = blob_case((12, 12, 14), np.random.default_rng(5))
    hand_plan, configuration = make_plan((name,), (True,), (1.5, 1.0, 0.8))
    geometry = Geometry(THICK[0], (0.0,) * 3, IDENTITY)
    result = assert_device_path_equals_the_cpu_one(image, geometry, hand_plan, configuration)
    if name == "test_shifted_zscore":  # the shift came through (the twin would have given none)
        assert np.isclose(np.median(result[result != 0]), 3.0, atol=1.5)


def test_a_plan_with_another_transpose_is_refused():
    hand_plan, configuration = make_plan(("zscore",), (False,), (1.0, 1.0, 1.0), transpose=(2, 0, 1))
    image, _ = blob_case((8, 9, 10), np.random.default_rng(6))
    cropped = crop_case(image, Geometry((1.0, 1.0, 1.0), (0.0,) * 3, IDENTITY), (0, 1, 2), "case")
    with pytest.raises(ValueError, match="transpose"):
        finish_on_device(cropped, hand_plan, configuration, "cpu")


# ------------------------------------------------------------------------------------------------ predictor


@pytest.fixture(scope="module")
def ct_model(plan: Plan, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """test_predict's threshold model with 'ct' on channel 0 and masked z-score on channel 1.

    With mean -50 and std 2 'ct' maps x to (x + 50) / 2 after clipping to [60, 250]: body 100 -> 75,
    label 1 150 -> 100, label 2 270 -> 250 -> 150. Against the fold-0 thresholds (125, 210) label 1 is
    then background and label 2 is class 1, where the raw image gives both labels: a prediction that
    skipped (or misapplied) the normalisation cannot go unseen.
    """
    stats = IntensityStats(mean=-50.0, median=100.0, std=2.0, min=0.0, max=300.0, percentile_00_5=60.0,
                           percentile_99_5=250.0)  # fmt: skip
    configurations = {
        name: dataclasses.replace(conf, normalization=("ct", "zscore"), use_mask_for_norm=(False, True))
        for name, conf in plan.configurations.items()
    }
    ct_plan = dataclasses.replace(plan, foreground_intensity_per_channel=(stats, stats), configurations=configurations)
    return write_model(tmp_path_factory.mktemp("ct") / plan.dataset_name, ct_plan, ("3d_fullres",), folds=(0,))


def test_a_predictor_preprocessing_on_the_device_predicts_the_same(ct_model):
    predictors = {
        on: Predictor(ct_model, device="cpu", cpu_bf16=False, use_mirroring=False, device_preprocessing=on)
        for on in (False, True)
    }
    assert Predictor(ct_model, device="cpu", cpu_bf16=False).device_preprocessing is False  # the CPU default
    for case_id, shape, geometry, seed in (
        ("grid", (20, 22, 12), ON_GRID, 1),
        ("thick", (22, 18, 8), THICK_ROTATED, 2),
    ):
        image, label = asymmetric_case(shape, seed)
        segmentations = {
            on: predictor.predict_case(image, geometry, case_id)[0] for on, predictor in predictors.items()
        }
        assert np.array_equal(segmentations[True], segmentations[False]), case_id
        # not a trivial agreement: the normalised image decides (see ct_model), label 2 is found as class 1
        assert dice(segmentations[True] == 1, label == 2) > 0.8 and not (segmentations[True] == 2).any(), case_id
    on, off = predictors[True].timings[-1], predictors[False].timings[-1]
    assert on.device_preprocess_s > 0 and off.device_preprocess_s == 0.0
    assert on.total_s == pytest.approx(on.preprocess_s + on.network_s + on.export_s + on.device_preprocess_s)


def test_folder_prediction_with_reader_threads_and_device_preprocessing(ct_model, input_dir, tmp_path):  # noqa: F811
    for on in (False, True):
        predict_folder(ct_model, input_dir, tmp_path / str(on), device="cpu", cpu_bf16=False, use_mirroring=False,
                       show_progress=False, num_workers=2, device_preprocessing=on)  # fmt: skip
    for case_id in ("grid", "thick"):
        off, on_ = (read_image(tmp_path / str(on) / f"{case_id}.nii.gz")[0] for on in (False, True))
        assert np.array_equal(off, on_) and (on_ == 1).any(), case_id


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_preprocessing_equals_the_cpu_one():
    image, _ = blob_case((40, 48, 44), np.random.default_rng(7), channels=2)
    geometry = Geometry((4.0, 0.9, 1.0), (0.0,) * 3, IDENTITY)
    hand_plan, configuration = make_plan(("ct", "zscore"), (False, True), (1.2, 0.8, 0.8))
    expected = preprocess_case(image, None, geometry, hand_plan, configuration, "case", 0)
    actual = finish_on_device(
        crop_case(image, geometry, hand_plan.transpose_forward, "case"), hand_plan, configuration, "cuda"
    )
    assert actual.image.is_cuda and actual.properties == expected.properties
    # TF32 matmuls (if switched on) would round the weights to ~1e-3 (resample_torch's docstring)
    tolerance = 2e-3 if torch.backends.cuda.matmul.allow_tf32 else 1e-5
    assert np.abs(actual.image.cpu().numpy() - expected.image).max() <= tolerance * np.abs(expected.image).max()
