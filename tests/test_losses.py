"""Losses against hand computations on tiny tensors, and against nnU-Net v2 where it is installed."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from autoseg.losses import (
    DeepSupervisionLoss,
    DiceCELoss,
    SoftDiceLoss,
    deep_supervision_weights,
    downsample_target,
    tp_fp_fn,
)

SMOOTH = 1e-5


def _probability_of_class1(logits: np.ndarray) -> np.ndarray:
    """Two-class softmax written out: p1 = 1 / (1 + exp(l0 - l1))."""
    return 1.0 / (1.0 + np.exp(logits[:, 0] - logits[:, 1]))


def _hand_dice(p1: np.ndarray, y1: np.ndarray) -> float:
    intersect = float((p1 * y1).sum())
    return (2 * intersect + SMOOTH) / (float(y1.sum()) + float(p1.sum()) + SMOOTH)


# one sample, two classes, a 2x2 image
LOGITS = np.array([[[[0.0, 1.0], [2.0, -1.0]], [[1.0, 0.0], [-0.5, 2.0]]]])
TARGET = np.array([[[1, 0], [0, 1]]])


def test_soft_dice_matches_hand_computation() -> None:
    p1 = _probability_of_class1(LOGITS)
    expected = -_hand_dice(p1, TARGET == 1)
    loss = SoftDiceLoss(batch_dice=False)(torch.tensor(LOGITS), torch.tensor(TARGET))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_dice_ce_matches_hand_computation() -> None:
    p1 = _probability_of_class1(LOGITS)
    p_true = np.where(TARGET == 1, p1, 1 - p1)
    expected = -_hand_dice(p1, TARGET == 1) + float(np.mean(-np.log(p_true)))
    loss = DiceCELoss(batch_dice=False)(torch.tensor(LOGITS), torch.tensor(TARGET))
    assert loss.item() == pytest.approx(expected, rel=1e-6)

    weighted = DiceCELoss(batch_dice=False, weight_dice=0.5, weight_ce=2.0)(torch.tensor(LOGITS), torch.tensor(TARGET))
    expected_weighted = -0.5 * _hand_dice(p1, TARGET == 1) + 2.0 * float(np.mean(-np.log(p_true)))
    assert weighted.item() == pytest.approx(expected_weighted, rel=1e-6)


def test_ignored_voxels_are_left_out_of_dice_and_ce() -> None:
    target = TARGET.copy()
    target[0, 1, 1] = -1
    keep = target != -1
    p1 = _probability_of_class1(LOGITS)
    p_true = np.where(target == 1, p1, 1 - p1)
    expected = -_hand_dice(p1[keep], (target == 1)[keep]) + float(np.mean(-np.log(p_true[keep])))

    logits = torch.tensor(LOGITS, requires_grad=True)
    loss = DiceCELoss(batch_dice=False)(logits, torch.tensor(target))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert logits.grad is not None
    assert torch.all(logits.grad[0, :, 1, 1] == 0)
    assert torch.all(logits.grad[0, :, 0, 0] != 0)

    changed = LOGITS.copy()
    changed[0, :, 1, 1] = [7.0, -3.0]
    assert DiceCELoss(batch_dice=False)(torch.tensor(changed), torch.tensor(target)).item() == pytest.approx(
        loss.item(), rel=1e-9
    )


def test_everything_ignored_gives_finite_loss() -> None:
    target = torch.full((1, 2, 2), -1)
    loss = DiceCELoss(batch_dice=True)(torch.tensor(LOGITS), target)
    # no voxels: the CE contributes 0 and the smoothed Dice is smooth / smooth = 1
    assert loss.item() == pytest.approx(-1.0)


def test_batch_dice_pools_samples_and_per_sample_dice_averages_them() -> None:
    logits = np.stack([LOGITS[0], -LOGITS[0]])
    target = np.stack([TARGET[0], np.array([[1, 1], [1, 0]])])
    p1 = _probability_of_class1(logits)
    y1 = target == 1
    per_sample = -(_hand_dice(p1[0], y1[0]) + _hand_dice(p1[1], y1[1])) / 2
    pooled = -_hand_dice(p1, y1)

    got_per_sample = SoftDiceLoss(batch_dice=False)(torch.tensor(logits), torch.tensor(target)).item()
    got_pooled = SoftDiceLoss(batch_dice=True)(torch.tensor(logits), torch.tensor(target)).item()
    assert got_per_sample == pytest.approx(per_sample, rel=1e-6)
    assert got_pooled == pytest.approx(pooled, rel=1e-6)
    assert abs(per_sample - pooled) > 1e-3


def test_include_background_averages_all_classes() -> None:
    p1 = _probability_of_class1(LOGITS)
    expected = -(_hand_dice(1 - p1, TARGET == 0) + _hand_dice(p1, TARGET == 1)) / 2
    loss = SoftDiceLoss(batch_dice=False, include_background=True)(torch.tensor(LOGITS), torch.tensor(TARGET))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("batch_dice", [False, True])
def test_dice_ce_equals_nnunet(batch_dice: bool) -> None:
    compound = pytest.importorskip("nnunetv2.training.loss.compound_losses")
    dice_module = pytest.importorskip("nnunetv2.training.loss.dice")
    reference = compound.DC_and_CE_loss(
        {"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False},
        {},
        weight_ce=1,
        weight_dice=1,
        ignore_label=None,
        dice_class=dice_module.MemoryEfficientSoftDiceLoss,
    )
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, 7, 5, generator=generator) * 3
    target = torch.randint(0, 3, (2, 6, 7, 5), generator=generator)
    expected = reference(logits, target[:, None]).item()
    assert DiceCELoss(batch_dice=batch_dice)(logits, target).item() == pytest.approx(expected, rel=1e-5)


def test_deep_supervision_weights_follow_nnunet_rule() -> None:
    assert deep_supervision_weights(4) == pytest.approx([8 / 14, 4 / 14, 2 / 14, 0.0])
    assert deep_supervision_weights(3) == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert deep_supervision_weights(2) == pytest.approx([1.0, 0.0])
    assert deep_supervision_weights(1) == [1.0]
    with pytest.raises(ValueError):
        deep_supervision_weights(0)


def test_downsample_target_takes_voxel_centres_and_keeps_ignore() -> None:
    target = torch.tensor([[[0, 1, 2, 2], [1, -1, 2, 0], [0, 0, 1, 1], [2, 2, 1, -1]]], dtype=torch.int64)  # (1, 4, 4)
    small = downsample_target(target, (2, 2))
    # halving with 'nearest-exact' samples the voxel centres (i + 0.5) * 2 -> the odd indices
    assert small.dtype == target.dtype
    assert torch.equal(small, target[:, 1::2, 1::2])
    assert (small == -1).sum().item() == 2
    assert downsample_target(target, (4, 4)) is target

    volume = torch.randint(-1, 3, (2, 8, 6, 4))
    assert torch.equal(downsample_target(volume, (4, 3, 2)), volume[:, 1::2, 1::2, 1::2])
    assert torch.equal(downsample_target(volume, (4, 6, 4)), volume[:, 1::2])


class _RecordingLoss(torch.nn.Module):
    """Mean of the logits plus the target's sum, remembering every call's shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls.append((tuple(logits.shape), tuple(target.shape)))
        return logits.mean() + target.sum()


def test_deep_supervision_loss_weights_resizes_and_skips_zero_weights() -> None:
    target = torch.randint(0, 2, (1, 8, 8))
    outputs = [torch.randn(1, 2, 8 // 2**i, 8 // 2**i, requires_grad=True) for i in range(3)]
    inner = _RecordingLoss()
    loss = DeepSupervisionLoss(inner, deep_supervision_weights(3))(outputs, target)

    expected = 2 / 3 * (outputs[0].mean() + target.sum()) + 1 / 3 * (outputs[1].mean() + target[:, 1::2, 1::2].sum())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert inner.calls == [((1, 2, 8, 8), (1, 8, 8)), ((1, 2, 4, 4), (1, 4, 4))]
    loss.backward()
    assert outputs[0].grad is not None and outputs[1].grad is not None
    assert outputs[2].grad is None

    # the network may leave out the zero-weighted output
    shorter = DeepSupervisionLoss(_RecordingLoss(), deep_supervision_weights(3))(outputs[:2], target)
    assert shorter.item() == pytest.approx(loss.item())
    with pytest.raises(ValueError, match="outputs"):
        DeepSupervisionLoss(_RecordingLoss(), deep_supervision_weights(3))(outputs[:1], target)
    with pytest.raises(ValueError):
        DeepSupervisionLoss(_RecordingLoss(), [0.0, 0.0])


def test_deep_supervision_loss_accepts_a_single_tensor() -> None:
    logits = torch.randn(2, 3, 4, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4, 4))
    wrapped = DeepSupervisionLoss(DiceCELoss(batch_dice=True), [0.7, 0.3])
    assert wrapped(logits, target).item() == pytest.approx(DiceCELoss(batch_dice=True)(logits, target).item())


def test_dice_ce_has_gradients_through_deep_supervision() -> None:
    generator = torch.Generator().manual_seed(1)
    outputs = [torch.randn(2, 3, 8 // 2**i, 8 // 2**i, 8 // 2**i, generator=generator) for i in range(3)]
    for output in outputs:
        output.requires_grad_(True)
    target = torch.randint(-1, 3, (2, 8, 8, 8), generator=generator)
    loss = DeepSupervisionLoss(DiceCELoss(batch_dice=False), deep_supervision_weights(3))(outputs, target)
    loss.backward()
    for output in outputs[:2]:
        assert output.grad is not None
        assert torch.isfinite(output.grad).all() and output.grad.abs().sum() > 0


def test_tp_fp_fn_counts_per_class_and_ignores() -> None:
    predicted = torch.tensor([[[0, 1], [1, 2]]])
    target = torch.tensor([[[0, 1], [2, -1]]])
    tp, fp, fn = tp_fp_fn(predicted, target, num_classes=3)
    # voxel (1, 1) is ignored, so its prediction 2 is no false positive
    assert tp.tolist() == [1, 1, 0]
    assert fp.tolist() == [0, 1, 0]
    assert fn.tolist() == [0, 0, 1]

    generator = torch.Generator().manual_seed(2)
    predicted = torch.randint(0, 4, (2, 5, 6, 7), generator=generator)
    target = torch.randint(-1, 4, (2, 5, 6, 7), generator=generator)
    tp, fp, fn = tp_fp_fn(predicted, target, num_classes=4)
    p, t = predicted.numpy(), target.numpy()
    for k in range(4):
        assert tp[k].item() == int(np.sum((p == k) & (t == k)))
        assert fp[k].item() == int(np.sum((p == k) & (t != k) & (t != -1)))
        assert fn[k].item() == int(np.sum((p != k) & (t == k)))


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        logits, target = _ddp_batch()
        share = slice(rank * 2, rank * 2 + 2)
        local = logits[share].clone().requires_grad_(True)
        loss = SoftDiceLoss(batch_dice=True)(local, target[share])
        loss.backward()
        assert local.grad is not None
        torch.save({"loss": loss.detach(), "grad": local.grad}, Path(out_dir) / f"rank{rank}.pt")
        # Both ranks leave together: a rank that tore gloo down while the other still had its all-reduce in
        # flight aborted now and then ("terminate called without an active exception", SIGABRT).
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def _ddp_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 3, 5, 5, 5, generator=generator)
    target = torch.randint(-1, 3, (4, 5, 5, 5), generator=generator)
    return logits, target


def test_batch_dice_under_ddp_equals_single_process_batch_dice(tmp_path: Path) -> None:
    if not torch.distributed.is_available():
        pytest.skip("torch built without torch.distributed")
    world_size = 2
    mp.spawn(_ddp_worker, args=(world_size, str(tmp_path / "init"), str(tmp_path)), nprocs=world_size, join=True)

    logits, target = _ddp_batch()
    logits.requires_grad_(True)
    single = SoftDiceLoss(batch_dice=True)(logits, target)
    single.backward()
    assert logits.grad is not None
    for rank in range(world_size):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["loss"].item() == pytest.approx(single.item(), rel=1e-6)
        # DDP averages gradients over ranks, so each rank holds world_size times its share of the full gradient
        expected_grad = world_size * logits.grad[rank * 2 : rank * 2 + 2]
        assert torch.allclose(result["grad"], expected_grad, rtol=1e-5, atol=1e-7)
    assert not math.isnan(single.item())
