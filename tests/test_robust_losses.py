"""Tversky, focal, boundary and Dice-only: losses against hand computations on tiny tensors, the boundary
weight ramp, and a fast-dev-run fold of each trainer."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import autoseg.trainers.boundary
import autoseg.trainers.dice_only
import autoseg.trainers.focal
import autoseg.trainers.tversky  # noqa: F401  (registers the trainer)
import numpy as np
import pytest
import torch
from conftest import write_dataset

from autoseg.errors import AutosegError
from autoseg.losses import DeepSupervisionLoss, DiceCELoss, SoftDiceLoss, cross_entropy
from autoseg.losses_robust import (
    BoundaryDiceCELoss,
    BoundaryLoss,
    FocalDiceLoss,
    SoftTverskyLoss,
    focal_loss,
    signed_distance_map,
)
from autoseg.paths import Paths
from autoseg.pipeline import plan_and_preprocess, train
from autoseg.training.trainer import TRAINERS, TrainOptions

SMOOTH = 1e-5


def logits_for(p1: list[list[float]] | list[float]) -> torch.Tensor:
    """Two-class logits (1, 2, *spatial) whose softmax gives class 1 the probability ``p1``: l1 - l0 = logit(p1)."""
    p = torch.tensor(p1, dtype=torch.float64)
    return torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))])[None]


# a 2x2 image: class-1 probabilities and the reference
P1 = [[0.75, 0.5], [0.25, 0.75]]
TARGET = torch.tensor([[[1, 0], [0, 1]]])


def random_case(seed: int, shape: tuple[int, ...] = (6, 5), classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn((2, classes, *shape), generator=g, dtype=torch.float64)
    target = torch.randint(0, classes, (2, *shape), generator=g)
    return logits, target


# -- Tversky ------------------------------------------------------------------------------------------------
def test_tversky_matches_hand_computation() -> None:
    # TP = 0.75 + 0.75, FP = 0.5 + 0.25 (predicted 1 where the reference is 0), FN = 0.25 + 0.25
    tp, fp, fn = 1.5, 0.75, 0.5
    expected = -(tp + SMOOTH) / (tp + 0.3 * fp + 0.7 * fn + SMOOTH)  # = -1.5 / 2.075
    assert SoftTverskyLoss(batch_dice=False)(logits_for(P1), TARGET).item() == pytest.approx(expected, rel=1e-9)
    swapped = -(tp + SMOOTH) / (tp + 0.7 * fp + 0.3 * fn + SMOOTH)
    assert SoftTverskyLoss(False, alpha=0.7, beta=0.3)(logits_for(P1), TARGET).item() == pytest.approx(swapped)


@pytest.mark.parametrize("batch_dice", [False, True])
def test_tversky_with_equal_halves_is_soft_dice(batch_dice: bool) -> None:
    logits, target = random_case(1)
    target[0, 0, :3] = -1
    # TP / (TP + (FP + FN) / 2) = 2 TP / (sum_pred + sum_gt): exactly the Dice without smoothing
    tversky = SoftTverskyLoss(batch_dice, alpha=0.5, beta=0.5, smooth=0.0)(logits, target)
    dice = SoftDiceLoss(batch_dice, smooth=0.0)(logits, target)
    assert tversky.item() == pytest.approx(dice.item(), rel=1e-6)  # SoftDiceLoss sums in float32
    assert SoftTverskyLoss(batch_dice)(logits, target).item() != pytest.approx(dice.item(), rel=1e-3)


def test_tversky_rejects_zero_weights() -> None:
    with pytest.raises(AutosegError, match="alpha"):
        SoftTverskyLoss(False, alpha=0.0, beta=0.0)


# -- focal --------------------------------------------------------------------------------------------------
def test_focal_matches_hand_computation() -> None:
    # p_t is 0.75, 0.5, 0.75, 0.75: each voxel contributes -(1 - p_t)^2 log p_t
    expected = (3 * 0.25**2 * -math.log(0.75) + 0.5**2 * -math.log(0.5)) / 4
    assert focal_loss(logits_for(P1), TARGET).item() == pytest.approx(expected, rel=1e-9)
    cubed = (3 * 0.25**3 * -math.log(0.75) + 0.5**3 * -math.log(0.5)) / 4
    assert focal_loss(logits_for(P1), TARGET, gamma=3.0).item() == pytest.approx(cubed, rel=1e-9)


def test_focal_with_gamma_zero_is_cross_entropy() -> None:
    logits, target = random_case(2)
    target[1, 2] = -1
    assert focal_loss(logits, target, gamma=0.0).item() == pytest.approx(cross_entropy(logits, target).item())
    assert focal_loss(logits, target).item() < cross_entropy(logits, target).item()


def test_focal_dice_is_the_sum() -> None:
    logits, target = random_case(3)
    expected = SoftDiceLoss(batch_dice=True)(logits, target) + focal_loss(logits, target)
    assert FocalDiceLoss(batch_dice=True)(logits, target).item() == pytest.approx(expected.item(), rel=1e-12)
    with pytest.raises(AutosegError, match="gamma"):
        FocalDiceLoss(batch_dice=True, gamma=-1.0)


# -- boundary -----------------------------------------------------------------------------------------------
def test_signed_distance_map_1d() -> None:
    mask = np.array([0, 0, 1, 1, 1, 0], bool)
    np.testing.assert_allclose(signed_distance_map(mask), [2, 1, 0, -1, 0, 1])


def test_signed_distance_map_2d() -> None:
    mask = np.zeros((5, 5), bool)
    mask[1:4, 1:4] = True
    r2 = math.sqrt(2)
    expected = [
        [r2, 1, 1, 1, r2],
        [1, 0, 0, 0, 1],
        [1, 0, -1, 0, 1],
        [1, 0, 0, 0, 1],
        [r2, 1, 1, 1, r2],
    ]
    np.testing.assert_allclose(signed_distance_map(mask), expected, rtol=1e-6)
    assert not signed_distance_map(np.zeros((3, 3), bool)).any()
    assert not signed_distance_map(np.ones((3, 3), bool)).any()


def test_boundary_loss_matches_hand_computation() -> None:
    p1 = [0.25, 0.5, 0.75, 0.75, 0.75, 0.5]
    target = torch.tensor([[0, 0, 1, 1, 1, 0]])
    # distance map 2, 1, 0, -1, 0, 1 (test above): sum of p1 * d over 6 voxels
    expected = (0.25 * 2 + 0.5 * 1 - 0.75 * 1 + 0.5 * 1) / 6
    assert BoundaryLoss()(logits_for(p1), target).item() == pytest.approx(expected, rel=1e-6)

    # the last voxel ignored: it still counts as outside the class for the map, but leaves the mean
    ignored = torch.tensor([[0, 0, 1, 1, 1, -1]])
    expected_ignored = (0.25 * 2 + 0.5 * 1 - 0.75 * 1) / 5
    assert BoundaryLoss()(logits_for(p1), ignored).item() == pytest.approx(expected_ignored, rel=1e-6)


def test_boundary_loss_averages_foreground_classes() -> None:
    logits, target = random_case(4)
    probabilities = torch.softmax(logits, 1).numpy()
    total = 0.0
    for b in range(2):
        for k in (1, 2):
            total += float((probabilities[b, k] * signed_distance_map(target[b].numpy() == k)).sum())
    expected = total / (2 * 2 * target[0].numel())
    assert BoundaryLoss()(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_boundary_dice_ce_adds_the_weighted_boundary_term() -> None:
    logits, target = random_case(5)
    loss = BoundaryDiceCELoss(batch_dice=False)
    dice_ce = DiceCELoss(batch_dice=False)(logits, target).item()
    assert loss(logits, target).item() == pytest.approx(dice_ce, rel=1e-12)
    loss.boundary_weight = 0.3
    expected = dice_ce + 0.3 * BoundaryLoss()(logits, target).item()
    assert loss(logits, target).item() == pytest.approx(expected, rel=1e-9)


def stub_trainer(cls: type) -> Any:
    """A trainer whose setup holds just what build_loss reads."""
    return cls(SimpleNamespace(configuration=SimpleNamespace(batch_dice=True)))


def test_boundary_weight_ramps_per_epoch_and_resumes_alike() -> None:
    trainer = stub_trainer(TRAINERS.get("boundary"))
    loss = trainer.build_loss()
    for epoch, weight in [(0, 0.0), (1, 0.01), (37, 0.37), (100, 1.0), (999, 1.0)]:
        trainer.on_epoch_start(epoch)
        assert loss.boundary_weight == pytest.approx(weight)
    resumed = stub_trainer(TRAINERS.get("boundary"))
    resumed_loss = resumed.build_loss()
    resumed.on_epoch_start(37)  # a resume at epoch 37 sets what an uninterrupted run has there
    trainer.on_epoch_start(37)
    assert resumed_loss.boundary_weight == loss.boundary_weight


# -- every loss: ignored voxels, gradients, any resolution --------------------------------------------------
def boundary_on() -> BoundaryDiceCELoss:
    return BoundaryDiceCELoss(batch_dice=False, boundary_weight=0.5)


LOSSES = {
    "tversky": lambda: SoftTverskyLoss(batch_dice=False),
    "tversky_batch": lambda: SoftTverskyLoss(batch_dice=True),
    "focal_dice": lambda: FocalDiceLoss(batch_dice=False),
    "boundary": BoundaryLoss,
    "boundary_dice_ce": boundary_on,
}


@pytest.mark.parametrize("name", LOSSES)
def test_ignored_voxels_change_nothing(name: str) -> None:
    logits, target = random_case(6)
    target[0, 1, 1] = -1
    loss_fn = LOSSES[name]()
    logits.requires_grad_(True)
    loss = loss_fn(logits, target)
    loss.backward()
    assert logits.grad is not None
    assert torch.all(logits.grad[0, :, 1, 1] == 0)
    assert logits.grad[0].abs().sum() > 0
    changed = logits.detach().clone()
    changed[0, :, 1, 1] = torch.tensor([9.0, -4.0, 2.0])
    assert loss_fn(changed, target).item() == pytest.approx(loss.item(), rel=1e-12)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("case", ["3d", "empty_foreground", "all_ignored"])
def test_gradients_are_finite(name: str, case: str) -> None:
    logits, target = random_case(7, shape=(4, 5, 3))
    if case == "empty_foreground":
        target.zero_()
    if case == "all_ignored":
        target.fill_(-1)
    logits = logits.float().requires_grad_(True)
    loss = LOSSES[name]()(logits, target)
    loss.backward()
    assert torch.isfinite(loss)
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", LOSSES)
def test_deep_supervision_applies_each_loss_at_every_resolution(name: str) -> None:
    full, target = random_case(8, shape=(8, 8))
    half = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    loss = DeepSupervisionLoss(LOSSES[name](), [2 / 3, 1 / 3])([full, half], target)
    assert torch.isfinite(loss)


# -- every trainer trains a fast-dev-run fold ---------------------------------------------------------------
CONFIG = "3d_fullres"
QUICK = {"iterations_per_epoch": 3, "val_iterations": 1, "num_workers": 0, "validation_mirroring": False}


def test_trainers_are_registered_with_a_docstring() -> None:
    for name in ("tversky", "focal", "boundary", "dice_only"):
        doc = TRAINERS.get(name).__doc__
        assert doc and len(doc.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("robust")
    dataset = write_dataset(root / "Dataset011_Robust", n_cases=5, shape=(16, 20, 18))
    pre = root / "preprocessed"
    plan_and_preprocess(dataset, Paths(pre), configurations=[CONFIG], num_workers=1, show_progress=False)
    return dataset, pre


# The other three are trained by tests/test_training.py's smoke test of every registered trainer; boundary
# also here, because its second epoch is the first with a boundary weight above 0.
@pytest.mark.parametrize("trainer", ["boundary"])
def test_trainer_runs_a_fast_dev_fold(prepared: tuple[Path, Path], tmp_path: Path, trainer: str) -> None:
    options = TrainOptions(fast_dev_run=True, device="cpu", show_progress=False, **QUICK)  # type: ignore[arg-type]
    folder = train(prepared[0], Paths(prepared[1], tmp_path / "results"), CONFIG, 0, trainer=trainer, options=options)
    run = json.loads((folder / "run.json").read_text())
    assert run["status"] == "finished"
    losses = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["train_loss"]) for r in losses if "train_loss" in r)
