"""Segmentation losses: soft Dice, Dice + cross-entropy, deep supervision, and the training pseudo Dice counts.

Conventions: logits are (B, K, *spatial) floats, K classes including the background 0; targets are
(B, *spatial) integers where -1 marks a voxel to ignore (padding outside the image). The formulas are
nnU-Net v2's (training/loss/dice.py, compound_losses.py, deep_supervision.py), so a variant can be checked
against it number for number.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_LABEL = -1


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks; its backward sums the gradients too, so each rank's gradient is world_size times its
    share of the global loss's gradient, which DDP's gradient averaging turns back into exactly that share."""
    import torch.distributed.nn.functional as dist_nn

    return dist_nn.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)


def one_hot_and_valid(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-hot target (zero at ignored voxels) shaped like ``logits``, and the (B, 1, *spatial) mask
    of voxels that are not ignored; float32, no gradient."""
    with torch.no_grad():
        valid = (target != IGNORE_LABEL).unsqueeze(1).to(torch.float32)
        labels = torch.where(target == IGNORE_LABEL, 0, target).long().unsqueeze(1)
        one_hot = torch.zeros(logits.shape, device=logits.device, dtype=torch.float32)
        one_hot.scatter_(1, labels, 1)
        one_hot *= valid
    return one_hot, valid


class SoftDiceLoss(nn.Module):
    """Minus the mean soft Dice of the softmax over the (foreground) classes; nnU-Net's MemoryEfficientSoftDiceLoss.

    ``batch_dice`` pools the sums over the whole batch (over all ranks under DDP) before taking the ratio;
    otherwise every sample gets its own Dice and the loss averages samples and classes alike.
    """

    # Floor of the denominator, guarding against 0 / 0 when smooth is set to 0 (nnU-Net's value).
    min_denominator: ClassVar[float] = 1e-8

    def __init__(self, batch_dice: bool, smooth: float = 1e-5, include_background: bool = False) -> None:
        super().__init__()
        self.batch_dice = batch_dice
        self.smooth = smooth
        self.include_background = include_background

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probabilities = torch.softmax(logits, 1)
        axes = tuple(range(2, logits.ndim))
        # the one-hot target is zero at ignored voxels, which masks them out of sum_gt and the intersection
        one_hot, valid = one_hot_and_valid(logits, target)
        with torch.no_grad():
            if not self.include_background:
                one_hot = one_hot[:, 1:]
            sum_gt = one_hot.sum(axes, dtype=torch.float32)
        if not self.include_background:
            probabilities = probabilities[:, 1:]
        intersect = (probabilities * one_hot).sum(axes, dtype=torch.float32)
        sum_pred = (probabilities * valid).sum(axes, dtype=torch.float32)
        if self.batch_dice:
            intersect, sum_pred, sum_gt = intersect.sum(0), sum_pred.sum(0), sum_gt.sum(0)
            if _distributed():
                intersect, sum_pred, sum_gt = (_all_reduce_sum(t) for t in (intersect, sum_pred, sum_gt))
        dice = (2 * intersect + self.smooth) / (sum_gt + sum_pred + self.smooth).clamp_min(self.min_denominator)
        return -dice.mean()


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the voxels that are not ignored; 0 (not NaN) when every voxel is ignored."""
    total = F.cross_entropy(logits, target.long(), ignore_index=IGNORE_LABEL, reduction="sum")
    # a tensor clamp rather than a Python max keeps the count on the device (no synchronisation)
    count = (target != IGNORE_LABEL).sum().clamp_min(1)
    return total / count


class DiceCELoss(nn.Module):
    """``weight_dice`` * soft Dice (foreground classes) + ``weight_ce`` * cross-entropy; nnU-Net's DC_and_CE_loss."""

    def __init__(
        self, batch_dice: bool, weight_dice: float = 1.0, weight_ce: float = 1.0, smooth: float = 1e-5
    ) -> None:
        super().__init__()
        self.weight_dice = weight_dice
        self.weight_ce = weight_ce
        self.dice = SoftDiceLoss(batch_dice=batch_dice, smooth=smooth, include_background=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.weight_dice != 0:
            loss = loss + self.weight_dice * self.dice(logits, target)
        if self.weight_ce != 0:
            loss = loss + self.weight_ce * cross_entropy(logits, target)
        return loss


def deep_supervision_weights(num_outputs: int) -> list[float]:
    """1, 1/2, 1/4, ... from full resolution down, the lowest resolution set to 0, normalised to sum 1.

    nnU-Net v2 (nnUNetTrainer._build_loss) drops the lowest-resolution output: it is too coarse to help.
    With a single output there is nothing to drop, and its weight is 1.
    """
    if num_outputs < 1:
        raise ValueError(f"deep supervision needs at least one output, got {num_outputs}")
    if num_outputs == 1:
        return [1.0]
    weights = [0.5**i for i in range(num_outputs)]
    weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


def downsample_target(target: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of a (B, *spatial) label map to ``shape``; labels (and -1) stay labels.

    'nearest-exact' samples voxel centres, as nnU-Net v2's DownsampleSegForDSTransform does.
    """
    shape = tuple(int(s) for s in shape)
    if tuple(target.shape[1:]) == shape:
        return target
    # float32 holds every integer label exactly (up to 2**24)
    resized = F.interpolate(target.unsqueeze(1).to(torch.float32), size=shape, mode="nearest-exact")
    return resized.squeeze(1).to(target.dtype)


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of ``loss`` over the network's outputs (full resolution first), each against the target
    resized to its shape. Outputs whose weight is 0 are never computed, so a network may leave them out:
    ``outputs`` may be shorter than ``weights``. A single tensor is the no-deep-supervision case."""

    def __init__(self, loss: nn.Module, weights: Sequence[float]) -> None:
        super().__init__()
        if not weights or all(w == 0 for w in weights):
            raise ValueError(f"deep supervision needs at least one non-zero weight, got {list(weights)}")
        self.loss = loss
        self.weights = tuple(float(w) for w in weights)

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target)
        used = [i for i, w in enumerate(self.weights) if w != 0]
        if len(outputs) > len(self.weights) or len(outputs) <= used[-1]:
            raise ValueError(
                f"deep supervision got {len(outputs)} outputs for weights {list(self.weights)}: it needs every"
                f" output up to index {used[-1]} (non-zero weight) and at most {len(self.weights)}"
            )
        terms = [self.weights[i] * self.loss(outputs[i], downsample_target(target, outputs[i].shape[2:])) for i in used]
        return sum(terms[1:], terms[0])


def tp_fp_fn(
    predicted_labels: torch.Tensor, target: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class true positive, false positive and false negative voxel counts (int64, length ``num_classes``,
    background included), summed over the batch; voxels whose target is -1 count nowhere.

    Stays on the device and never synchronises, so the trainer can sum it over batches cheaply. Comparisons
    instead of ``bincount``, which has no deterministic CUDA kernel.
    """
    classes = torch.arange(num_classes, device=target.device).view(num_classes, *([1] * target.ndim))
    valid = target != IGNORE_LABEL
    predicted = (predicted_labels.unsqueeze(0) == classes) & valid
    reference = target.unsqueeze(0) == classes
    tp = (predicted & reference).flatten(1).sum(1)
    fp = (predicted & ~reference).flatten(1).sum(1)
    fn = (~predicted & reference).flatten(1).sum(1)
    return tp, fp, fn
