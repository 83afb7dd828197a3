"""From the members' logits to the label map in the input's grid, on the device, one class at a time.

This is ``export_prediction``'s path (softmax, resample the probabilities to the cropped shape at the
original spacing, uncrop, transpose back, argmax; see ``autoseg.inference.export``) with two changes
that make it fast and bounded in memory, not different in result:

- it runs where the logits are (the GPU), with the CPU path's own resampling operators
  (``autoseg.inference.resample_torch``);
- it goes class by class: each class's probability is resampled (and averaged over the ensemble's
  members) at full resolution, then folded into a running argmax. A 14-class CT holds one full-resolution
  probability volume on the device, not 14. The strict ``>`` keeps the first of tied classes, as
  ``argmax`` does.

Everything outside the crop is background (probability 1 for class 0), so the argmax runs over the crop
box only and the label map is uncropped at the end. All members see the same image, so their crop boxes
agree once each is transposed back to the input's axis order.

``restore_entropy`` takes the same path for the uncertainty map: the probabilities averaged over each
member's passes (fold x mirroring, ``autoseg.inference.models.PassProbabilities``) are resampled class
by class, averaged over the members, and summed into the entropy -sum_k p_k log p_k, divided by log K
so that 0 means one class is certain and 1 means all K are equally likely. Outside the crop the
probabilities are plain background (1 for class 0), so the entropy there is exactly 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from autoseg.inference.resample_torch import ProbabilityResampler
from autoseg.plan import Configuration, Plan
from autoseg.preprocessing.case import CaseProperties
from autoseg.preprocessing.crop import box_slices


@dataclass
class MemberLogits:
    """One member's logits (K, *shape_after_resampling) of a case, with what is needed to undo preprocessing."""

    logits: torch.Tensor
    properties: CaseProperties
    plan: Plan
    configuration: Configuration
    # (K, *shape_after_resampling): the mean over passes (fold x mirroring) of each pass's softmax, when
    # the uncertainty map is asked for (``restore_entropy``); None otherwise
    pass_probabilities: torch.Tensor | None = None


def softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the class axis, in place in float32 (``export.softmax``'s arithmetic, without a copy)."""
    probabilities = logits if logits.dtype == torch.float32 else logits.float()
    probabilities -= probabilities.amax(dim=0, keepdim=True)
    probabilities.exp_()
    probabilities /= probabilities.sum(dim=0, keepdim=True)
    return probabilities


T = TypeVar("T")


def _original_order(values: Sequence[T], plan: Plan) -> tuple[T, ...]:
    """Per-axis values of the transposed arrays, put back into the input's (z, y, x) order."""
    return tuple(values[a] for a in plan.transpose_backward)


def restore_argmax(
    members: Sequence[MemberLogits],
    keep_probabilities: bool = False,
    probabilities_dtype: type[np.floating] = np.float16,
) -> tuple[torch.Tensor, np.ndarray | None]:
    """The index of the most probable class (z, y, x) of the input's grid, on the logits' device.

    Averages the members' class probabilities (equal weights). The logits are turned into probabilities
    in place. With ``keep_probabilities`` the averaged probabilities also come back, (K, z, y, x) in
    ``probabilities_dtype`` on the CPU, filled in one class at a time.
    """
    if not members:
        raise ValueError("restore_argmax needs the logits of at least one member")
    grids = _Grids.of(members)
    num_classes, full_shape, device = grids.num_classes, grids.full_shape, members[0].logits.device
    prepared = [(softmax_(member.logits), *resampling) for member, resampling in zip(members, grids.resampling)]
    index_dtype = torch.uint8 if num_classes <= 256 else torch.int16
    index = torch.zeros(grids.crop_shape, dtype=index_dtype, device=device)
    best: torch.Tensor | None = None
    kept: np.ndarray | None = None
    if keep_probabilities:
        kept = np.zeros((num_classes, *full_shape), dtype=probabilities_dtype)
        kept[0] = 1  # background outside the crop
    inner = box_slices(grids.box)
    for k in range(num_classes):
        probability = _class_probability(prepared, k)
        if best is None:
            best = probability
        else:
            index.masked_fill_(probability > best, k)
            torch.maximum(best, probability, out=best)
        if kept is not None:
            kept[k][inner] = probability.cpu().numpy()
    full = torch.zeros(full_shape, dtype=index_dtype, device=device)
    full[inner] = index
    return full, kept


def restore_entropy(members: Sequence[MemberLogits], normalize: bool = True) -> torch.Tensor:
    """The entropy (z, y, x) float32 of the members' pass-averaged probabilities, in the input's grid.

    Needs every member's ``pass_probabilities``; averages them over the members (equal weights, as
    ``restore_argmax`` does), one class at a time. ``normalize``: divided by log K, so in [0, 1]
    (clipped there: resampling and half-precision accumulation round). On the probabilities' device;
    the pass probabilities are consumed (overwritten), as ``restore_argmax`` consumes the logits.
    """
    missing = [i for i, member in enumerate(members) if member.pass_probabilities is None]
    if not members or missing:
        raise ValueError(f"restore_entropy needs the pass probabilities of every member; members {missing} lack them")
    grids = _Grids.of(members)
    prepared = [
        (member.pass_probabilities, *resampling)
        for member, resampling in zip(members, grids.resampling)
        if member.pass_probabilities is not None
    ]
    device = prepared[0][0].device
    entropy = torch.zeros(grids.crop_shape, dtype=torch.float32, device=device)
    for k in range(grids.num_classes):
        probability = _class_probability(prepared, k).clamp_(0.0, 1.0)
        entropy -= torch.special.xlogy(probability, probability)  # 0 log 0 = 0
    if normalize and grids.num_classes > 1:
        entropy /= math.log(grids.num_classes)
        entropy.clamp_(0.0, 1.0)
    else:
        entropy.clamp_(min=0.0)
    full = torch.zeros(grids.full_shape, dtype=torch.float32, device=device)  # background: certain, 0
    full[box_slices(grids.box)] = entropy
    return full


@dataclass(frozen=True)
class _Grids:
    """Where the members' volumes go back to: the input's grid, the crop box in it, one resampler each."""

    num_classes: int
    full_shape: tuple[int, ...]
    box: tuple[tuple[int, int], ...]
    resampling: list[tuple[ProbabilityResampler, tuple[int, ...]]]  # per member, with its transpose_backward

    @property
    def crop_shape(self) -> tuple[int, ...]:
        return tuple(stop - start for start, stop in self.box)

    @classmethod
    def of(cls, members: Sequence[MemberLogits]) -> _Grids:
        first = members[0]
        num_classes = first.logits.shape[0]
        box = _original_order(first.properties.bbox, first.plan)
        resampling = []
        for member in members:
            if member.logits.shape[0] != num_classes:
                raise ValueError(f"members predict {num_classes} and {member.logits.shape[0]} classes")
            if _original_order(member.properties.bbox, member.plan) != box:
                raise ValueError("members cropped the case differently; were they given different images?")
            properties = member.properties
            resampler = ProbabilityResampler(
                properties.shape_after_resampling,
                properties.shape_after_crop,
                properties.spacing_mm,
                properties.spacing_after_crop_mm,
                member.configuration.resampling,
                member.logits.device,
            )
            resampling.append((resampler, tuple(member.plan.transpose_backward)))
        full_shape = _original_order(first.properties.shape_before_crop, first.plan)
        return cls(num_classes, tuple(int(n) for n in full_shape), tuple(box), resampling)


def _class_probability(
    prepared: Sequence[tuple[torch.Tensor, ProbabilityResampler, tuple[int, ...]]], k: int
) -> torch.Tensor:
    """Class ``k``'s probability averaged over the members, in the crop box of the input's axis order."""
    total: torch.Tensor | None = None
    for probabilities, resampler, transpose_backward in prepared:
        resampled = resampler(probabilities[k]).permute(transpose_backward)
        total = resampled.contiguous() if total is None else total.add_(resampled)
    assert total is not None
    if len(prepared) > 1:
        total /= len(prepared)
    return total
