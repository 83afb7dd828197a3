"""The uncertainty map of ``autoseg predict --save-uncertainty``: entropy of the probabilities averaged over passes.

Hand computations first (the sliding window's extra channels, the entropy of given probabilities), then the
predictor on the hand-written threshold models of tests/test_predict.py, whose two folds disagree between
intensity thresholds: there the map must be the entropy of the folds' mean softmax, not of the softmax of
their mean logits, and everything else (the segmentation) must stay as it is without the map.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_predict import (  # noqa: F401  (plan and model_dir are fixtures, used by name)
    FOLD_THRESHOLDS,
    ON_GRID,
    THICK_ROTATED,
    IntensityThreshold,
    asymmetric_case,
    input_dir,
    model_dir,
    plan,
    write_model,
)
from torch import nn

from autoseg.cli import main
from autoseg.inference.export import softmax, uncertainty_file
from autoseg.inference.models import FoldAverage, PassProbabilities
from autoseg.inference.predict import predict_preprocessed_case
from autoseg.inference.predictor import Predictor, predict_folder
from autoseg.inference.restore_torch import MemberLogits, restore_entropy
from autoseg.inference.sliding_window import sliding_window_predict
from autoseg.io import read_image
from autoseg.preprocessing.case import preprocess_case, restore_probabilities


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """-sum_k p_k log p_k over axis 0, with 0 log 0 = 0 (float64)."""
    p = np.asarray(probabilities, dtype=np.float64)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=0)


class RampLogits(nn.Module):
    """Logits (scale * z, offset) with z the voxel's index along the patch's first axis: not mirror-symmetric,
    so each fold's mirrored pass (flipped back: scale * (n - 1 - z)) disagrees with the plain one."""

    def __init__(self, scale: float, offset: float) -> None:
        super().__init__()
        self.scale, self.offset = scale, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.arange(x.shape[2], dtype=torch.float32).reshape(1, 1, -1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        return torch.cat([self.scale * z, torch.full_like(z, self.offset)], dim=1)


def test_the_extra_channels_are_the_mean_softmax_over_fold_and_mirror_passes():
    folds = FoldAverage([RampLogits(4.0, 2.0), RampLogits(-2.0, 1.0)])
    image = torch.zeros((1, 6, 4, 4))
    patch = (6, 4, 4)  # one tile: its Gaussian weight cancels in the weighted mean
    both = sliding_window_predict(PassProbabilities(folds), image, patch, 4, mirror_axes=(0,), use_amp=False)
    logits_only = sliding_window_predict(folds, image, patch, 2, mirror_axes=(0,), use_amp=False)
    assert torch.equal(both[:2], logits_only)  # the segmentation's logits are untouched

    z = np.arange(6, dtype=np.float64)
    passes = [  # (fold scale, fold offset) x (plain, mirrored and flipped back), along z
        np.stack([scale * ramp, np.full(6, offset)])
        for scale, offset in ((4.0, 2.0), (-2.0, 1.0))
        for ramp in (z, z[::-1])
    ]
    expected_probabilities = np.mean([softmax(p) for p in passes], axis=0)
    expected_logits = np.mean(passes, axis=0)
    assert np.allclose(both[2:, :, 0, 0].numpy(), expected_probabilities, atol=1e-6)
    assert np.allclose(both[:2, :, 0, 0].numpy(), expected_logits, atol=1e-5)
    assert torch.allclose(both[2:], both[2:, :, :1, :1].expand(2, 6, 4, 4))  # constant in y, x
    # the predictive entropy is not that of the softmax of the averaged logits (0.693 against 0.582 in the
    # middle, where the passes' logits (4z, 2), (4(5-z), 2), (-2z, 1), (-2(5-z), 1) average to (5, 1.5))
    assert np.abs(entropy(expected_probabilities) - entropy(softmax(expected_logits))).max() > 0.1


def test_two_passes_sure_of_different_classes_are_undecided():
    """Two folds with logits (0, -20) ~ probabilities (1, 0) and (0, 40) ~ (0, 1): their probabilities
    average to (0.5, 0.5), entropy log 2 (normalised: 1). Their logits average to (0, 10), whose softmax is
    sure of class 1 (entropy ~ 5e-4): averaging logits would hide that the folds disagree completely."""
    folds = FoldAverage([RampLogits(0.0, -20.0), RampLogits(0.0, 40.0)])
    out = sliding_window_predict(PassProbabilities(folds), torch.zeros((1, 4, 4, 4)), (4, 4, 4), 4, use_amp=False)
    assert torch.allclose(out[2:], torch.full((2, 4, 4, 4), 0.5), atol=1e-6)
    assert np.allclose(entropy(out[2:].numpy()), math.log(2), atol=1e-6)
    assert torch.allclose(out[:2], torch.tensor([0.0, 10.0]).reshape(2, 1, 1, 1).expand(2, 4, 4, 4))
    assert entropy(softmax(out[:2].numpy())).max() < 1e-3


@pytest.fixture(scope="module")
def on_grid_case(plan):  # noqa: F811
    configuration = plan.configuration("3d_fullres")
    image, _ = asymmetric_case((20, 22, 12), seed=1)
    case = preprocess_case(image, None, ON_GRID, plan, configuration, "grid", 0)
    assert case.properties.shape_after_resampling == case.properties.shape_after_crop  # nothing resampled
    return case, configuration


def test_restore_entropy_of_given_probabilities_and_of_an_ensemble(plan, on_grid_case):  # noqa: F811
    case, configuration = on_grid_case
    shape = case.image.shape[1:]
    logits = torch.zeros((3, *shape))

    def member(probabilities: tuple[float, float, float]) -> MemberLogits:
        pass_probabilities = torch.tensor(probabilities).reshape(3, 1, 1, 1).expand(3, *shape).contiguous()
        return MemberLogits(logits.clone(), case.properties, plan, configuration, pass_probabilities)

    raw = restore_entropy([member((0.5, 0.5, 0.0))], normalize=False).numpy()
    inside = tuple(slice(a, b) for a, b in (case.properties.bbox[i] for i in plan.transpose_backward))
    assert raw.shape == (20, 22, 12) and raw.dtype == np.float32
    assert np.allclose(raw[inside], math.log(2), atol=1e-6)
    outside = np.ones(raw.shape, bool)
    outside[inside] = False
    assert outside.any() and (raw[outside] == 0).all()  # background outside the crop: certain
    uniform = restore_entropy([member((1 / 3, 1 / 3, 1 / 3))]).numpy()
    assert np.allclose(uniform[inside], 1.0, atol=1e-6) and uniform.max() <= 1.0
    # members' probabilities are averaged before the entropy: (1, 0, 0) and (0, 1, 0) -> log 2 / log 3
    ensemble = restore_entropy([member((1.0, 0.0, 0.0)), member((0.0, 1.0, 0.0))]).numpy()
    assert np.allclose(ensemble[inside], math.log(2) / math.log(3), atol=1e-6)
    with pytest.raises(ValueError, match="pass probabilities"):
        restore_entropy([MemberLogits(logits, case.properties, plan, configuration)])


def _fold_probabilities(plan, images, geometry, folds):  # noqa: F811
    """Each fold's softmax restored to the input's grid. The threshold network is a 1x1 convolution, so
    its mirrored passes and overlapping tiles all agree voxel by voxel: a fold's passes are one softmax."""
    configuration = plan.configuration("3d_fullres")
    case = preprocess_case(images, None, geometry, plan, configuration, "case", 0)
    restored = []
    for fold in folds:
        network = IntensityThreshold(configuration.network, 2, 3).set_thresholds(FOLD_THRESHOLDS[fold])
        logits = predict_preprocessed_case(network, case.image, configuration, None, device="cpu", num_classes=3)
        restored.append(restore_probabilities(softmax(logits.numpy()), case.properties, plan, configuration))
    return restored


@pytest.mark.parametrize("folds", [(0, 1), (0,)])
def test_predictor_entropy_is_that_of_the_folds_mean_softmax(plan, model_dir, folds):  # noqa: F811
    images, _ = asymmetric_case((22, 18, 8), seed=2)
    predictor = Predictor(model_dir, folds=folds, device="cpu", cpu_bf16=False)
    prediction = predictor.predict_case_with_uncertainty(images, THICK_ROTATED, "thick", keep_probabilities=True)
    assert prediction.entropy is not None and prediction.probabilities is not None
    assert prediction.entropy.shape == (22, 18, 8) and prediction.entropy.dtype == np.float32
    assert prediction.entropy.min() >= 0 and prediction.entropy.max() <= 1

    expected = entropy(np.mean(_fold_probabilities(plan, images, THICK_ROTATED, folds), axis=0)) / math.log(3)
    assert np.abs(prediction.entropy - expected).max() < 1e-4
    # the kept probabilities are the softmax of the fold-averaged logits (stored as float16)
    of_mean_logits = entropy(prediction.probabilities.astype(np.float32)) / math.log(3)
    if len(folds) == 1:  # one fold: both are the entropy of its single softmax
        assert np.abs(prediction.entropy - of_mean_logits).max() < 5e-3
    else:  # where the folds disagree, averaging logits would hide it
        assert np.abs(prediction.entropy - of_mean_logits).max() > 0.2
    segmentation, _ = predictor.predict_case(images, THICK_ROTATED, "thick")
    assert np.array_equal(segmentation, prediction.segmentation)


def test_folder_prediction_writes_entropy_maps_and_continue_knows_them(model_dir, input_dir, tmp_path):  # noqa: F811
    plain, out = tmp_path / "plain", tmp_path / "out"
    predict_folder(model_dir, input_dir, plain, device="cpu", cpu_bf16=False, show_progress=False)
    assert not (plain / "uncertainty").exists()
    argv = ["predict", "-i", str(input_dir), "-o", str(out), "-m", str(model_dir), "--device", "cpu", "--fp32"]
    assert main(["-q", *argv, "--save-uncertainty"]) == 0
    for case_id in ("grid", "thick"):
        entropy_file = out / "uncertainty" / f"{case_id}_entropy.nii.gz"
        assert uncertainty_file(out / f"{case_id}.nii.gz") == entropy_file
        values, geometry = read_image(entropy_file)
        image, input_geometry = read_image(input_dir / f"{case_id}_0000.nii.gz")
        assert values.shape == image.shape and values.dtype == np.float32
        assert geometry.matches(input_geometry, tolerance=1e-6) == []
        assert values.min() >= 0 and values.max() <= 1 and values.max() > 0.5  # the folds disagree somewhere
        box = tuple(slice(i.min(), i.max() + 1) for i in np.nonzero(image))  # the crop box (body only)
        outside = np.ones(image.shape, bool)
        outside[box] = False
        assert outside.any() and (values[outside] == 0).all()  # background outside the crop: certain
        assert np.median(values[image == 0]) < 1e-3  # and the air inside the box nearly so (not at the body)
        assert np.array_equal(read_image(out / f"{case_id}.nii.gz")[0], read_image(plain / f"{case_id}.nii.gz")[0])
    assert sorted(p.name for p in out.iterdir()) == ["grid.nii.gz", "thick.nii.gz", "uncertainty"]
    assert not [p for p in (out / "uncertainty").iterdir() if p.name.startswith(".")]  # no temporary files

    (out / "uncertainty" / "grid_entropy.nii.gz").unlink()
    again = predict_folder(model_dir, input_dir, out, device="cpu", cpu_bf16=False, show_progress=False,
                           skip_existing=True)  # fmt: skip
    assert again == []  # the map was not asked for: the segmentations are all there
    again = predict_folder(model_dir, input_dir, out, device="cpu", cpu_bf16=False, show_progress=False,
                           skip_existing=True, save_uncertainty=True)  # fmt: skip
    assert again == [out / "grid.nii.gz"] and (out / "uncertainty" / "grid_entropy.nii.gz").is_file()


def test_an_ensemble_averages_its_members_pass_probabilities(plan, input_dir, tmp_path):  # noqa: F811
    model = write_model(tmp_path / "ensemble", plan, ("2d", "3d_fullres"), folds=(0,))
    images = np.stack([read_image(input_dir / f"thick_{c:04d}.nii.gz")[0] for c in (0, 1)]).astype(np.float32)
    geometry = read_image(input_dir / "thick_0000.nii.gz")[1]
    prediction = Predictor(model, device="cpu", cpu_bf16=False).predict_case_with_uncertainty(images, geometry)
    members = []
    for name in ("2d", "3d_fullres"):
        configuration = plan.configuration(name)
        case = preprocess_case(images, None, geometry, plan, configuration, "thick", 0)
        network = IntensityThreshold(configuration.network, 2, 3).set_thresholds(FOLD_THRESHOLDS[0])
        logits = predict_preprocessed_case(network, case.image, configuration, None, device="cpu", num_classes=3)
        members.append(restore_probabilities(softmax(logits.numpy()), case.properties, plan, configuration))
    expected = entropy((members[0] + members[1]) / 2) / math.log(3)
    assert prediction.entropy is not None and np.abs(prediction.entropy - expected).max() < 1e-4


def test_the_entropy_file_sits_in_the_uncertainty_folder_with_the_case_ending(tmp_path):
    assert uncertainty_file(tmp_path / "a.b.mha") == tmp_path / "uncertainty" / "a.b_entropy.mha"
    assert uncertainty_file(Path("out/case_7.nii.gz")) == Path("out/uncertainty/case_7_entropy.nii.gz")
