"""Sliding-window prediction (tiles, Gaussian weights, mirroring, 2D on 3D) and export to the original geometry."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import blob_case
from torch import nn

from autoseg import serialization
from autoseg.errors import AutosegError
from autoseg.inference import (
    ProbabilitiesInfo,
    export_prediction,
    gaussian_importance_map,
    load_probabilities,
    predict_preprocessed_case,
    probabilities_files,
    sliding_window_predict,
    tile_starts,
)
from autoseg.io import Geometry, read_image, write_image
from autoseg.paths import Paths
from autoseg.pipeline import plan_and_preprocess
from autoseg.plan import Plan
from autoseg.preprocessing.case import CaseProperties
from autoseg.preprocessing.run import case_files

# ---------------------------------------------------------------------------------------------- networks


def identity_conv(channels: int, dim: int) -> nn.Module:
    """A 1x1 convolution with identity weights: logits == input channels (K == C)."""
    conv = (nn.Conv3d if dim == 3 else nn.Conv2d)(channels, channels, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(channels).reshape(channels, channels, *([1] * dim)))
        conv.bias.zero_()
    return conv


def asymmetric_conv(channels: int, classes: int, dim: int, seed: int = 0) -> nn.Module:
    """A random 3^dim convolution: translation-equivariant but not mirror-symmetric."""
    torch.manual_seed(seed)
    return nn.Sequential(
        (nn.Conv3d if dim == 3 else nn.Conv2d)(channels, 4, 3, padding=1),
        nn.ReLU(),
        (nn.Conv3d if dim == 3 else nn.Conv2d)(4, classes, 3, padding=1),
    )


class TileMean(nn.Module):
    """Every voxel gets its tile's mean per channel, so overlapping tiles disagree and the weights show."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(2, x.ndim))
        return x.mean(dim=dims, keepdim=True).expand_as(x) + 0.0


class Recording(nn.Module):
    """Identity that records how it was called; returns a deep-supervision list."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.calls: list[tuple[tuple[int, ...], bool, bool]] = []

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.calls.append((tuple(x.shape), self.training, torch.is_inference_mode_enabled()))
        return [x * self.scale, x[:, :, ::2]]


# ------------------------------------------------------------------------------------ Gaussian and tiles


def test_gaussian_map_matches_nnunet_and_is_positive():
    sliding = pytest.importorskip("nnunetv2.inference.sliding_window_prediction")
    for patch in [(12, 16, 9), (20, 7), (32, 32, 32)]:
        ours = gaussian_importance_map(patch, dtype=torch.float64)
        theirs = sliding.compute_gaussian(
            patch, value_scaling_factor=10, dtype=torch.float64, device=torch.device("cpu")
        )
        assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-9), patch
        assert ours.max().item() == pytest.approx(10.0) and (ours > 0).all()
        centre = tuple(p // 2 for p in patch)
        assert ours[centre].item() == pytest.approx(10.0)
    odd = gaussian_importance_map((9, 15, 7))
    for axis in range(3):
        assert torch.allclose(odd, odd.flip(axis))
    # in half precision the corners underflow; they must become the smallest positive weight
    half = gaussian_importance_map((64, 64, 64), dtype=torch.float16)
    assert half.dtype == torch.float16 and (half > 0).all() and half.max().item() == pytest.approx(10.0, rel=1e-3)


def test_tile_starts_match_nnunet_and_cover_the_image():
    sliding = pytest.importorskip("nnunetv2.inference.sliding_window_prediction")
    rng = np.random.default_rng(0)
    for _ in range(200):
        dim = int(rng.integers(1, 4))
        patch = tuple(int(p) for p in rng.integers(1, 40, dim))
        shape = tuple(int(p + rng.integers(0, 120)) for p in patch)
        step = float(rng.choice([0.25, 0.5, 0.7, 1.0]))
        starts = tile_starts(shape, patch, step)
        assert starts == sliding.compute_steps_for_sliding_window(shape, patch, step), (shape, patch, step)
        for size, p, axis_starts in zip(shape, patch, starts):
            assert axis_starts[0] == 0 and axis_starts[-1] == size - p
            assert all(b - a <= p * step + 1 for a, b in itertools.pairwise(axis_starts))
    assert tile_starts((110,), (64,), 0.5) == [[0, 23, 46]]
    with pytest.raises(ValueError, match="smaller than the patch"):
        tile_starts((10, 20), (16, 16))


# ----------------------------------------------------------------------------------------- reconstruction

RECONSTRUCTION_CASES = {
    "3d": ((2, 20, 23, 17), (8, 12, 10), None),
    "3d_mirror": ((2, 20, 23, 17), (8, 12, 10), (0, 1, 2)),
    "3d_smaller_than_patch": ((2, 5, 30, 9), (8, 12, 10), (0, 2)),
    "2d_on_3d": ((2, 5, 23, 31), (16, 12), None),
    "2d_on_3d_mirror": ((2, 5, 23, 31), (16, 12), (0, 1)),
    "2d_on_3d_smaller_than_patch": ((2, 3, 9, 31), (16, 12), (1,)),
    "2d_image": ((2, 23, 31), (16, 12), (0, 1)),
}


@pytest.mark.parametrize("case", list(RECONSTRUCTION_CASES))
@pytest.mark.parametrize("use_gaussian", [True, False])
def test_identity_network_reconstructs_its_input(case, use_gaussian):
    shape, patch, mirror_axes = RECONSTRUCTION_CASES[case]
    image = torch.randn(shape)
    network = identity_conv(shape[0], len(patch))
    for tile_batch_size in (1, 3):
        result = sliding_window_predict(
            network, image, patch, num_classes=shape[0], mirror_axes=mirror_axes,
            use_gaussian=use_gaussian, tile_batch_size=tile_batch_size,
        )  # fmt: skip
        assert result.shape == image.shape and result.dtype == torch.float32
        assert torch.allclose(result, image, atol=1e-5), (case, tile_batch_size)


def test_weighting_is_the_gaussian_average_of_the_tiles():
    """Brute force: every tile predicts its mean; the result is the Gaussian-weighted mean of those."""
    image = torch.randn(1, 19, 26, 15)
    patch = (8, 10, 9)
    for use_gaussian in (True, False):
        result = sliding_window_predict(TileMean(), image, patch, 1, use_gaussian=use_gaussian, step_size=0.5)
        weights = gaussian_importance_map(patch, dtype=torch.float64) if use_gaussian else torch.ones(patch)
        total = torch.zeros(image.shape[1:], dtype=torch.float64)
        weight_sum = torch.zeros_like(total)
        for corner in itertools.product(*tile_starts(image.shape[1:], patch, 0.5)):
            region = tuple(slice(c, c + p) for c, p in zip(corner, patch))
            total[region] += weights * image[(0, *region)].double().mean()
            weight_sum[region] += weights
        assert torch.allclose(result[0].double(), total / weight_sum, atol=1e-5)
    assert not torch.allclose(
        sliding_window_predict(TileMean(), image, patch, 1, use_gaussian=True),
        sliding_window_predict(TileMean(), image, patch, 1, use_gaussian=False),
        atol=1e-3,
    )


@pytest.mark.parametrize("dim", [2, 3])
def test_mirroring_averages_all_flips_flipped_back(dim):
    """One tile (image == patch): the Gaussian cancels and the result is the mean over the 2**n flips."""
    patch = (6, 8, 7)[-dim:]
    image = torch.randn(2, *patch)
    network = asymmetric_conv(2, 3, dim)
    axes = tuple(range(dim))
    batch = image[None]
    with torch.no_grad():
        expected = torch.stack([
            network(batch.flip([a + 2 for a in subset])).flip([a + 2 for a in subset])[0]
            for n in range(dim + 1) for subset in itertools.combinations(axes, n)
        ]).mean(0)  # fmt: skip
        plain = network(batch)[0]
    for tile_batch_size in (1, 3, 8):
        result = sliding_window_predict(network, image, patch, 3, mirror_axes=axes, tile_batch_size=tile_batch_size)
        assert torch.allclose(result, expected, atol=1e-5)
    assert not torch.allclose(expected, plain, atol=1e-3)  # the flips matter for this network
    only_first = sliding_window_predict(network, image, patch, 3, mirror_axes=(0,))
    with torch.no_grad():
        assert torch.allclose(only_first, (plain + network(batch.flip(2)).flip(2)[0]) / 2, atol=1e-5)


def test_2d_network_on_a_volume_predicts_each_slice():
    volume = torch.randn(2, 4, 21, 30)
    network = asymmetric_conv(2, 3, dim=2, seed=1)
    patch = (12, 16)
    together = sliding_window_predict(network, volume, patch, 3, mirror_axes=(0, 1), tile_batch_size=5, progress=True)
    assert together.shape == (3, 4, 21, 30)
    for z in range(volume.shape[1]):
        alone = sliding_window_predict(network, volume[:, z], patch, 3, mirror_axes=(0, 1), tile_batch_size=2)
        assert torch.allclose(together[:, z], alone, atol=1e-5), z


def test_batching_does_not_change_the_result_and_half_accumulation_is_close():
    image = torch.randn(1, 18, 22, 20)
    network = asymmetric_conv(1, 2, dim=3, seed=2)
    patch = (8, 8, 12)
    reference = sliding_window_predict(network, image, patch, 2, mirror_axes=(1,), tile_batch_size=1)
    for tile_batch_size in (2, 7, 64):
        result = sliding_window_predict(network, image, patch, 2, mirror_axes=(1,), tile_batch_size=tile_batch_size)
        assert torch.allclose(result, reference, atol=1e-5)
    half = sliding_window_predict(network, image, patch, 2, mirror_axes=(1,), accumulate_dtype=torch.float16)
    assert half.dtype == torch.float32 and torch.allclose(half, reference, atol=2e-2)
    on_cpu = sliding_window_predict(network, image.numpy().astype(np.float64), patch, 2, mirror_axes=(1,), device="cpu")
    assert torch.allclose(on_cpu, reference, atol=1e-5)


def test_network_runs_in_eval_and_inference_mode_and_keeps_its_mode():
    network = Recording()
    network.train()
    image = np.random.default_rng(0).normal(size=(1, 10, 12, 14)).astype(np.float32)
    image.flags.writeable = False  # as a memory-mapped preprocessed case
    result = sliding_window_predict(network, image, (8, 8, 8), 1, mirror_axes=(0, 1), tile_batch_size=4)
    assert network.training
    assert np.allclose(result.numpy(), image, atol=1e-5)
    assert network.calls and all(not training and inference for _, training, inference in network.calls)
    assert all(shape[0] <= 4 for shape, _, _ in network.calls)
    tiles = np.prod([len(s) for s in tile_starts(image.shape[1:], (8, 8, 8))])
    assert tiles == 2 * 2 * 3 and sum(shape[0] for shape, _, _ in network.calls) == tiles * 4  # 4 mirror passes
    result += 1  # an ordinary tensor, not an inference tensor


def test_wrong_network_output_and_arguments_raise():
    image = torch.randn(2, 10, 10, 10)
    with pytest.raises(ValueError, match="expected logits of shape"):
        sliding_window_predict(identity_conv(2, 3), image, (8, 8, 8), num_classes=3)
    with pytest.raises(ValueError, match="mirror_axes"):
        sliding_window_predict(identity_conv(2, 3), image, (8, 8, 8), 2, mirror_axes=(0, 3))
    with pytest.raises(ValueError, match="does not fit a 2D patch"):
        sliding_window_predict(identity_conv(2, 2), image[None], (8, 8), 2)


# --------------------------------------------------------------------------------------------------- export

ROTATED = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


@pytest.fixture
def preprocessed(make_dataset, tmp_path):
    """Three cases with a coarse last axis (so the plan transposes); case00 on another grid and pose."""
    root = make_dataset(spacing=(1.0, 1.0, 2.0), shape=(20, 22, 12))
    # a coarser grid than the plan's, so that preprocessing upsamples it and export has to downsample
    image, label = blob_case((20, 18, 12), np.random.default_rng(5))
    geometry = Geometry((1.0, 1.25, 2.0), (4.0, -3.5, 12.0), ROTATED)
    write_image(image[0], geometry, root / "imagesTr" / "case00_0000.nii.gz")
    write_image(label, geometry, root / "labelsTr" / "case00.nii.gz")
    paths = Paths(tmp_path / "pre")
    folders = plan_and_preprocess(root, paths, num_workers=1, show_progress=False)
    plan = serialization.load(Plan, paths.plan_file(root.name, "default"))
    return root, folders, plan


def one_hot_logits(folder: Path, case_id: str, num_classes: int) -> tuple[np.ndarray, CaseProperties]:
    files = case_files(folder, case_id)
    seg = np.maximum(np.load(files["label"]), 0)
    logits = np.stack([(seg == k).astype(np.float32) * 10 for k in range(num_classes)])
    return logits, serialization.load(CaseProperties, files["properties"])


def test_export_returns_to_the_original_geometry(preprocessed, tmp_path):
    root, folders, plan = preprocessed
    assert plan.transpose_forward != (0, 1, 2)
    assert set(folders) >= {"2d", "3d_fullres"}
    for name in folders:
        configuration = plan.configuration(name)
        for case_id in ("case00", "case01"):
            logits, properties = one_hot_logits(folders[name], case_id, len(plan.labels))
            out = tmp_path / "predictions" / name / f"{case_id}.nii.gz"
            export_prediction(torch.from_numpy(logits), properties, plan, configuration, out, save_probabilities=True)
            written, geometry = read_image(out)
            original, original_geometry = read_image(root / "labelsTr" / f"{case_id}.nii.gz")
            assert written.shape == original.shape and written.dtype == np.uint8
            assert geometry.matches(original_geometry, tolerance=1e-6) == [], (name, case_id)
            for value in (1, 2):
                assert dice(written == value, original == value) > 0.98, (name, case_id, value)
            if case_id == "case01":  # same grid as the plan: nothing is resampled, so it is exact
                assert np.array_equal(written, original)

            npz_file, json_file = probabilities_files(out)
            assert npz_file == out.parent / f"{case_id}.npz" and json_file.is_file()
            with np.load(npz_file, allow_pickle=False) as data:
                probabilities = data["probabilities"]
            assert probabilities.shape == (len(plan.labels), *original.shape)
            assert np.allclose(probabilities.astype(np.float32).sum(0), 1, atol=3e-3)
            assert np.array_equal(probabilities.argmax(0), written)
            info = serialization.load(ProbabilitiesInfo, json_file)
            assert info.case_id == case_id and info.configuration == name and info.labels == plan.labels
            assert info.shape == probabilities.shape and info.geometry.matches(original_geometry, tolerance=1e-6) == []
            loaded, loaded_info = load_probabilities(npz_file)
            assert np.array_equal(loaded, probabilities) and loaded_info == info
    assert not [p for p in (tmp_path / "predictions").rglob(".*")]  # no temporary files left behind


def test_export_on_the_device_equals_the_cpu_export(preprocessed, tmp_path):
    """Whole-case validation on a GPU restores with the predictor's torch path; same files as the CPU's."""
    from autoseg.inference.export import export_prediction_torch

    _root, folders, plan = preprocessed
    for name in folders:
        configuration = plan.configuration(name)
        for case_id in ("case00", "case01"):
            logits, properties = one_hot_logits(folders[name], case_id, len(plan.labels))
            noisy = logits + np.random.default_rng(1).normal(0, 3, logits.shape).astype(np.float32)
            cpu, torch_out = tmp_path / "cpu" / name / f"{case_id}.nii.gz", tmp_path / "t" / name / f"{case_id}.nii.gz"
            export_prediction(noisy, properties, plan, configuration, cpu, save_probabilities=True)
            export_prediction_torch(torch.from_numpy(noisy.copy()), properties, plan, configuration, torch_out, True)
            a, b = read_image(cpu)[0], read_image(torch_out)[0]
            assert a.shape == b.shape and (a != b).mean() < 1e-3, (name, case_id)  # near-ties may flip
            pa, pb = (np.load(probabilities_files(f)[0])["probabilities"].astype(np.float32) for f in (cpu, torch_out))
            assert np.abs(pa - pb).max() < 2e-3
    with pytest.raises(AutosegError, match="logits of shape"):
        export_prediction_torch(torch.zeros(1, 2, 2, 2), properties, plan, configuration, tmp_path / "bad.nii.gz")


def test_export_maps_channels_to_sorted_label_values_and_checks_the_shape(preprocessed, tmp_path):
    _root, folders, plan = preprocessed
    configuration = plan.configuration("3d_fullres")
    logits, properties = one_hot_logits(folders["3d_fullres"], "case01", len(plan.labels))
    # a plan whose labels are not 0..K-1: channel k stands for the k-th smallest value
    sparse = Plan(**{**plan.__dict__, "labels": {"background": 0, "inner": 7, "outer": 3}})
    out = tmp_path / "sparse" / "case01.nrrd"
    export_prediction(logits, properties, sparse, configuration, out)
    written, _ = read_image(out)
    original, _ = read_image(_root / "labelsTr" / "case01.nii.gz")
    assert np.array_equal(written, np.array([0, 3, 7])[original])
    assert not probabilities_files(out)[0].exists()
    with pytest.raises(AutosegError, match="case01: logits of shape"):
        export_prediction(logits[:2], properties, plan, configuration, tmp_path / "bad.nii.gz")
    assert not (tmp_path / "bad.nii.gz").exists()


def test_predict_preprocessed_case_then_export(preprocessed, tmp_path):
    """An 'oracle' network whose logits are the one-hot label passed in as the image."""
    root, folders, plan = preprocessed
    for name in ("2d", "3d_fullres"):
        configuration = plan.configuration(name)
        logits, properties = one_hot_logits(folders[name], "case02", len(plan.labels))
        network = identity_conv(len(plan.labels), configuration.dim)
        predicted = predict_preprocessed_case(
            network, logits, configuration, mirror_axes=tuple(range(configuration.dim)), device="cpu",
            num_classes=len(plan.labels),
        )  # fmt: skip
        assert predicted.shape == logits.shape
        assert np.allclose(predicted.numpy(), logits, atol=1e-4)
        out = tmp_path / name / "case02.nii.gz"
        export_prediction(predicted, properties, plan, configuration, out)
        written, _ = read_image(out)
        assert np.array_equal(written, read_image(root / "labelsTr" / "case02.nii.gz")[0])


def test_stored_probability_info_is_plain_json(preprocessed, tmp_path):
    _root, folders, plan = preprocessed
    configuration = plan.configuration("3d_fullres")
    logits, properties = one_hot_logits(folders["3d_fullres"], "case01", len(plan.labels))
    out = tmp_path / "p" / "case01.nii.gz"
    export_prediction(logits, properties, plan, configuration, out, True, probabilities_dtype=np.float32)
    npz_file, json_file = probabilities_files(out)
    assert json.loads(json_file.read_text())["dtype"] == "float32"
    json_file.write_text(json_file.read_text().replace('"shape": [', '"shape": [9, '))
    with pytest.raises(AutosegError):
        load_probabilities(npz_file)
