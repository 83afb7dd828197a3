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
"""

from __future__ import annotations

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
    first = members[0]
    device = first.logits.device
    num_classes = first.logits.shape[0]
    full_shape = _original_order(first.properties.shape_before_crop, first.plan)
    box = _original_order(first.properties.bbox, first.plan)
    crop_shape = tuple(stop - start for start, stop in box)
    prepared = []
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
            device,
        )
        prepared.append((softmax_(member.logits), resampler, tuple(member.plan.transpose_backward)))

    index_dtype = torch.uint8 if num_classes <= 256 else torch.int16
    index = torch.zeros(crop_shape, dtype=index_dtype, device=device)
    best: torch.Tensor | None = None
    kept: np.ndarray | None = None
    if keep_probabilities:
        kept = np.zeros((num_classes, *full_shape), dtype=probabilities_dtype)
        kept[0] = 1  # background outside the crop
    inner = box_slices(box)
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
