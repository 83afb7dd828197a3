"""Losses for class imbalance and thin structures: Tversky, focal (+ Dice), boundary (+ Dice + CE).

The conventions are those of ``autoseg.losses``: logits (B, K, *spatial) with K classes including the
background 0, targets (B, *spatial) integers with -1 marking voxels to ignore. Every loss works on any
spatial size, so deep supervision can apply it to each output against the resized target.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from autoseg.errors import AutosegError
from autoseg.losses import IGNORE_LABEL, DiceCELoss, SoftDiceLoss, _all_reduce_sum, _distributed, one_hot_and_valid


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits (mixed precision) in float32 for the softmax and sums; float64 stays float64."""
    return logits if logits.dtype == torch.float64 else logits.float()


class SoftTverskyLoss(nn.Module):
    """Minus the mean soft Tversky index TP / (TP + alpha FP + beta FN) over the (foreground) classes.

    Salehi, Erdogmus and Gholipour, "Tversky loss function for image segmentation using 3D fully
    convolutional deep networks", MLMI 2017: beta > alpha weighs false negatives more, trading precision
    for recall on small structures. alpha = beta = 0.5 is the soft Dice. Smoothing, background exclusion,
    ``batch_dice`` pooling and the ignore mask follow ``SoftDiceLoss``.
    """

    # Salehi et al. 2017 report their best F2 / Dice balance at alpha 0.3, beta 0.7.
    default_alpha: ClassVar[float] = 0.3
    default_beta: ClassVar[float] = 0.7
    min_denominator: ClassVar[float] = SoftDiceLoss.min_denominator

    def __init__(
        self,
        batch_dice: bool,
        alpha: float | None = None,
        beta: float | None = None,
        smooth: float = 1e-5,
        include_background: bool = False,
    ) -> None:
        super().__init__()
        self.alpha = self.default_alpha if alpha is None else alpha
        self.beta = self.default_beta if beta is None else beta
        if self.alpha < 0 or self.beta < 0 or self.alpha + self.beta == 0:
            raise AutosegError(
                f"Tversky alpha={self.alpha}, beta={self.beta}: both must be >= 0 and not both 0"
                " (alpha = beta = 0.5 is the soft Dice)"
            )
        self.batch_dice = batch_dice
        self.smooth = smooth
        self.include_background = include_background

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probabilities = torch.softmax(_at_least_float32(logits), 1)
        one_hot, valid = one_hot_and_valid(logits, target)
        if not self.include_background:
            probabilities, one_hot = probabilities[:, 1:], one_hot[:, 1:]
        axes = tuple(range(2, logits.ndim))
        tp = (probabilities * one_hot).sum(axes)
        sum_pred = (probabilities * valid).sum(axes)
        sum_gt = one_hot.sum(axes)
        if self.batch_dice:
            tp, sum_pred, sum_gt = tp.sum(0), sum_pred.sum(0), sum_gt.sum(0)
            if _distributed():
                tp, sum_pred, sum_gt = (_all_reduce_sum(t) for t in (tp, sum_pred, sum_gt))
        fp, fn = sum_pred - tp, sum_gt - tp
        denominator = (tp + self.alpha * fp + self.beta * fn + self.smooth).clamp_min(self.min_denominator)
        return -((tp + self.smooth) / denominator).mean()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Mean of -(1 - p_t)^gamma log p_t over the voxels that are not ignored (0 when all are ignored).

    Lin, Goyal, Girshick, He and Dollar, "Focal loss for dense object detection", ICCV 2017, multi-class
    form without the class weight alpha; gamma = 0 is the cross-entropy.
    """
    valid = target != IGNORE_LABEL
    labels = torch.where(valid, target, 0).long().unsqueeze(1)
    log_p_true = torch.log_softmax(_at_least_float32(logits), 1).gather(1, labels).squeeze(1)
    modulation = (1 - log_p_true.exp()).clamp_min(0) ** gamma if gamma != 0 else 1.0
    per_voxel = -modulation * log_p_true * valid
    return per_voxel.sum() / valid.sum().clamp_min(1)


class FocalDiceLoss(nn.Module):
    """``weight_dice`` * soft Dice (foreground classes) + ``weight_focal`` * focal loss (gamma 2)."""

    # Lin et al. 2017: gamma 2 worked best across their ablation (Table 1a).
    default_gamma: ClassVar[float] = 2.0

    def __init__(
        self, batch_dice: bool, gamma: float | None = None, weight_dice: float = 1.0, weight_focal: float = 1.0
    ) -> None:
        super().__init__()
        self.gamma = self.default_gamma if gamma is None else gamma
        if self.gamma < 0:
            raise AutosegError(f"focal loss gamma={self.gamma} must be >= 0 (0 is plain cross-entropy)")
        self.weight_dice = weight_dice
        self.weight_focal = weight_focal
        self.dice = SoftDiceLoss(batch_dice=batch_dice, include_background=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.weight_dice * self.dice(logits, target) + self.weight_focal * focal_loss(logits, target, self.gamma)


def signed_distance_map(mask: np.ndarray) -> np.ndarray:
    """Signed Euclidean distance (voxel units) to the boundary of a boolean ``mask``: positive outside,
    zero on the inner boundary layer, negative further inside; all zero when the mask is empty or full.

    Kervadec et al.'s reference ``one_hot2dist`` (github.com/LIVIA-ETS/boundary-loss, utils.py):
    ``edt(~mask) * ~mask - (edt(mask) - 1) * mask``.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any() or mask.all():
        return np.zeros(mask.shape, dtype=np.float32)
    outside = ndimage.distance_transform_edt(~mask) * ~mask
    inside = (ndimage.distance_transform_edt(mask) - 1) * mask
    return np.asarray(outside - inside, dtype=np.float32)


def class_distance_maps(target: torch.Tensor, classes: range) -> torch.Tensor:
    """(B, len(classes), *spatial) signed distance maps of each class of each sample, float32 on the
    target's device. Ignored voxels (-1) count as outside every class. Computed on the CPU with scipy:
    a few milliseconds per class for a training patch."""
    labels = target.detach().cpu().numpy()
    maps = np.stack([np.stack([signed_distance_map(sample == k) for k in classes]) for sample in labels])
    return torch.from_numpy(maps).to(target.device)


class BoundaryLoss(nn.Module):
    """Mean over foreground classes and non-ignored voxels of softmax probability x signed distance map.

    Kervadec, Bouchtiba, Desrosiers, Granger, Dolz and Ben Ayed, "Boundary loss for highly unbalanced
    segmentation", MIDL 2019 (Medical Image Analysis 2021). Minimal (negative) when all probability sits
    inside the reference; the maps come from the target batch, in voxel units of the output's resolution.
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probabilities = torch.softmax(_at_least_float32(logits), 1)[:, 1:]
        distances = class_distance_maps(target, range(1, logits.shape[1]))
        valid = (target != IGNORE_LABEL).unsqueeze(1).to(torch.float32)
        count = valid.sum().clamp_min(1) * probabilities.shape[1]
        return (probabilities * distances * valid).sum() / count


class BoundaryDiceCELoss(nn.Module):
    """Dice + CE + ``boundary_weight`` * boundary loss; the trainer sets ``boundary_weight`` each epoch."""

    def __init__(self, batch_dice: bool, boundary_weight: float = 0.0) -> None:
        super().__init__()
        self.dice_ce = DiceCELoss(batch_dice=batch_dice)
        self.boundary = BoundaryLoss()
        self.boundary_weight = boundary_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.dice_ce(logits, target)
        if self.boundary_weight != 0:  # the distance maps cost CPU time; skip them while the weight is 0
            loss = loss + self.boundary_weight * self.boundary(logits, target)
        return loss


def boundary_weight_at(epoch: int, step: float, maximum: float) -> float:
    """The linear ramp: ``step`` per epoch from 0 at epoch 0, capped at ``maximum``."""
    return min(step * epoch, maximum)
