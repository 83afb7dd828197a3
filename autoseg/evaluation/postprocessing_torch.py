"""Keep-the-largest-connected-component postprocessing in torch, so a label map on the GPU is cleaned there.

The twin of ``autoseg.evaluation.postprocessing`` (``keep_largest_component``, ``apply_postprocessing``),
equal to it voxel for voxel: full connectivity (26 neighbours in 3D, 8 in 2D), components tied for the
largest size all kept, removed voxels set to background 0. It runs on any device; ``autoseg predict`` uses
it on CUDA so that the label map crosses to the host once, already postprocessed (``Predictor.restore``).

Components are found by label propagation, exact in int64 (no float max-pool, whose float32 would stop
representing voxel numbers exactly beyond 2^24 voxels). Every foreground voxel starts with its own id, its
linear index + 1 (background is 0), and each sweep raises ids towards the largest id of their component:

1. along each axis, every run of consecutive foreground voxels takes its largest id (a cumulative maximum
   forwards and then backwards, restarted at each run: the run's ordinal along the line, times a number
   above every id, is added to the ids first, so no earlier run can win a later run's maximum);
2. every foreground voxel takes the largest id of its 3x3(x3) neighbourhood (a separable box maximum with
   background at 0), which crosses the diagonal links that runs along the axes miss;
3. pointer jumping: id v was voxel v - 1's own id, and that voxel is in the same component, so a voxel
   takes the id voxel v - 1 holds now, which is never smaller; chains of ids collapse by doubling.

Ids only grow and never leave their component, so the sweeps stop at the fixed point where each component
holds its largest starting id throughout. A sweep changed nothing exactly when it left the sum of the ids
as it was (every id is at least what it was; the sum of up to 3 * 10^9 ids up to 3 * 10^9 fits in int64),
and a sweep that changed nothing is at the fixed point. The sums stay on the device and are read once
every ``CONVERGENCE_CHECK_EVERY`` sweeps, so the host waits for the device rarely. Component sizes then
come from ``torch.unique`` over the foreground ids.

Memory: a handful of int64 volumes at once (ids, the run keys, cummax's values and indices, flipped
copies), about 64 bytes per voxel at the peak: 1.1 GB on a 256 x 256 x 256 label map.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch

from autoseg.errors import AutosegError
from autoseg.evaluation.best import Postprocessing

# Sweeps between two reads of the sums (each read waits for the device). Blobs reach the fixed point in
# 4-7 sweeps (measured on smoothed-noise masks of 64^3-128^3 voxels, 30-55% foreground, objects 1-6
# voxels across), so 4 costs one or two waits and at most 3 sweeps past the fixed point.
CONVERGENCE_CHECK_EVERY = 4
# Connectivity is full, as the CPU path's (cc3d with 26 / 8 neighbours): masks of these dimensions only.
SUPPORTED_DIMENSIONS = (2, 3)


def component_ids(mask: torch.Tensor) -> torch.Tensor:
    """int64, ``mask``'s shape: each foreground voxel's component id (the largest linear index + 1 in its
    component, full connectivity), 0 on the background."""
    mask = mask.bool()
    count = mask.numel()
    ids = torch.arange(1, count + 1, dtype=torch.int64, device=mask.device).reshape(mask.shape)
    ids.mul_(mask)
    sums = [ids.sum()]
    while True:
        for _ in range(CONVERGENCE_CHECK_EVERY):
            ids = _sweep(ids, mask, count + 1)
            sums.append(ids.sum())
        read = torch.stack(sums).tolist()
        if any(before == after for before, after in pairwise(read)):
            return ids
        sums = sums[-1:]


def keep_largest_component_torch(mask: torch.Tensor) -> torch.Tensor:
    """The largest connected component(s) of a boolean mask (full connectivity, ties all kept), on its device."""
    if mask.ndim not in SUPPORTED_DIMENSIONS:
        raise ValueError(f"connected components need a 2D or 3D mask, got shape {tuple(mask.shape)}")
    mask = mask.bool()
    if not bool(mask.any()):
        return mask.clone()
    ids = component_ids(mask)
    values, sizes = torch.unique(ids[mask], return_counts=True)
    return torch.isin(ids, values[sizes == sizes.max()])  # every kept id is > 0, so only foreground


def apply_postprocessing_torch(
    segmentation: torch.Tensor, rules: Postprocessing, foreground_labels: Sequence[int]
) -> torch.Tensor:
    """``apply_postprocessing`` on a tensor of label values: a copy with ``rules`` applied in order, removed
    voxels set to background 0, on the segmentation's device.

    A map of class indices works too, with the labels given as indices (``index_space_rules``), as long as
    index 0 is the background."""
    foreground = [int(v) for v in foreground_labels]
    _check_rule_labels(rules, foreground)
    result = segmentation.clone()
    if rules.largest_component_foreground:
        mask = _equal_to_any(result, foreground)
        result.masked_fill_(mask & ~keep_largest_component_torch(mask), 0)
    for label in rules.largest_component_labels:
        mask = _equal_to_any(result, [label])
        result.masked_fill_(mask & ~keep_largest_component_torch(mask), 0)
    return result


def index_space_rules(rules: Postprocessing, label_values: Sequence[int]) -> tuple[Postprocessing, list[int]]:
    """``rules`` and the foreground for a map of class indices, whose index k stands for ``label_values[k]``
    (``autoseg.inference.export.label_values``): each label value replaced by its index. Index 0 must be
    the background 0, so that removed voxels stay background in either space."""
    values = [int(v) for v in label_values]
    if not values or values[0] != 0:
        raise AutosegError(f"label values {values} do not start with the background 0; fix the labels of plan.json")
    foreground = values[1:]
    _check_rule_labels(rules, foreground)
    position = {value: k for k, value in enumerate(values)}
    in_index_space = Postprocessing(
        rules.largest_component_foreground, tuple(position[v] for v in rules.largest_component_labels)
    )
    return in_index_space, list(range(1, len(values)))


def _check_rule_labels(rules: Postprocessing, foreground: list[int]) -> None:
    unknown = sorted(set(rules.largest_component_labels) - set(foreground))
    if unknown:
        raise AutosegError(
            f"postprocessing rule for label(s) {unknown}, which are not foreground labels {foreground};"
            " fix largest_component_labels in best.json"
        )


def _equal_to_any(segmentation: torch.Tensor, values: Sequence[int]) -> torch.Tensor:
    mask = torch.zeros(segmentation.shape, dtype=torch.bool, device=segmentation.device)
    for value in values:
        mask |= segmentation == value
    return mask


def _sweep(ids: torch.Tensor, mask: torch.Tensor, above_every_id: int) -> torch.Tensor:
    """One round of the three steps of the module docstring; returns new ids (``ids`` is left alone)."""
    for dim in range(ids.ndim):
        ids = _run_maximum(ids, mask, dim, above_every_id)
    ids = _box_maximum(ids).mul_(mask)
    flat = ids.reshape(-1)
    return torch.cat([flat.new_zeros(1), flat])[ids]  # id v -> what voxel v - 1 holds now (0 stays 0)


def _run_maximum(ids: torch.Tensor, mask: torch.Tensor, dim: int, above_every_id: int) -> torch.Tensor:
    """Each run of foreground voxels along ``dim`` at its largest id; background 0."""
    forward = _prefix_run_maximum(ids, mask, dim, above_every_id)
    backward = _prefix_run_maximum(forward.flip(dim), mask.flip(dim), dim, above_every_id)
    return backward.flip(dim)


def _prefix_run_maximum(ids: torch.Tensor, mask: torch.Tensor, dim: int, above_every_id: int) -> torch.Tensor:
    """Each foreground voxel at the largest id from the start of its run along ``dim`` up to itself."""
    length = mask.shape[dim]
    starts = mask.clone()
    starts.narrow(dim, 1, length - 1).logical_and_(~mask.narrow(dim, 0, length - 1))
    # a run's ordinal along its line times a number above every id: later runs' keys exceed all earlier ones
    offset = starts.cumsum(dim).mul_(above_every_id)
    return torch.cummax(ids + offset, dim).values.sub_(offset).mul_(mask)


def _box_maximum(ids: torch.Tensor) -> torch.Tensor:
    """The maximum over each voxel's 3x3(x3) neighbourhood (outside the volume counts as 0)."""
    for dim in range(ids.ndim):
        length = ids.shape[dim]
        result = ids.clone()
        lower, upper = result.narrow(dim, 1, length - 1), result.narrow(dim, 0, length - 1)
        torch.maximum(lower, ids.narrow(dim, 0, length - 1), out=lower)
        torch.maximum(upper, ids.narrow(dim, 1, length - 1), out=upper)
        ids = result
    return ids
