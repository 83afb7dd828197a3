"""Training batches cut on the device from cases kept there: no worker processes, nothing across the bus.

With ``--augmentation device`` the worker processes of ``BatchLoader`` only cut the enlarged samples, and
those samples are big: at a 1 mm brain's plan two crops of 199x213x199 voxels, 50 MB a batch even as
float16 and int8, which go from the workers through shared memory and pinned memory to the GPU. On an H200
that path delivered 27 batches/s, fewer than the 29 steps/s the network takes (``benchmarks/gpu_epoch.py``).

When the fold's cases fit on the device, ``ResidentCases`` uploads them once (float16 images and int8 labels
where they fit, as ``compact_batch`` sends them) and ``ResidentLoader`` cuts each batch there with a few copy
kernels. The placements (cases, foreground voxels, starts) come from the same ``PatchSampler.place`` with the
same generator as the workers' path, so batch ``i`` of epoch ``e`` is the same function of
(seed, rank, e, i): with float32 cases the batches are equal to the workers' voxel for voxel.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from autoseg.data.cases import PreprocessedCases
from autoseg.data.loader import batch_random, compact_batch
from autoseg.data.sampling import IGNORE_LABEL, PatchSampler, Placement, _overlap

# the share of the device's free memory the cases may take when the choice is automatic: the network's
# activations, the optimiser and the augmentation's samples need the rest
AUTO_SHARE = 0.25


def resident_bytes(cases: PreprocessedCases, case_ids: Sequence[str], compact: bool) -> int:
    """What ``ResidentCases`` would hold on the device (from the stored shapes; nothing is read)."""
    total = 0
    for case_id in case_ids:
        image = cases.image(case_id)
        total += image.size * (2 if compact else 4) + image[0].size * (1 if compact else 2)
    return total


class ResidentCases:
    """The cases ``case_ids`` on ``device``: image (C, *spatial) and label (*spatial) with stored -1 (outside
    the nonzero mask) already made background, as the workers' cut makes it."""

    def __init__(self, cases: PreprocessedCases, case_ids: Sequence[str], device: torch.device, compact: bool):
        self.device = device
        self.images: dict[str, torch.Tensor] = {}
        self.labels: dict[str, torch.Tensor] = {}
        for case_id in dict.fromkeys(case_ids):
            image = np.array(cases.image(case_id), dtype=np.float32)  # read into memory, off the memory map
            label = np.maximum(np.asarray(cases.seg(case_id)), 0).astype(np.int16)
            if compact:
                image, label = compact_batch(image, label)
            self.images[case_id] = torch.from_numpy(image).to(device)
            self.labels[case_id] = torch.from_numpy(label).to(device)

    @property
    def nbytes(self) -> int:
        tensors = [*self.images.values(), *self.labels.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def cut(self, placements: Sequence[Placement], size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """image float32 (B, C, *size) with 0 outside the case, label int16 (B, *size) with -1 outside it."""
        size = tuple(size)
        channels = next(iter(self.images.values())).shape[0]
        image = torch.zeros((len(placements), channels, *size), dtype=torch.float32, device=self.device)
        label = torch.full((len(placements), *size), IGNORE_LABEL, dtype=torch.int16, device=self.device)
        for index, (case_id, z, starts) in enumerate(placements):
            case_image, case_label = self.images[case_id], self.labels[case_id]
            if z is not None:
                case_image, case_label = case_image[:, z], case_label[z]
            overlap = _overlap(starts, size, case_label.shape)
            if overlap is None:
                continue
            source: tuple[Any, ...] = overlap[0]
            target: tuple[Any, ...] = overlap[1]
            image[(index, slice(None), *target)] = case_image[(slice(None), *source)]
            label[(index, *target)] = case_label[source]
        return image, label


class ResidentLoader:
    """``BatchLoader``'s interface over resident cases, for ``DeviceBatches``: ``epoch(e, start)`` yields each
    batch's placements (drawn on the host, no device work), ``to_device`` cuts the batch on the device, on the
    stream that calls it."""

    def __init__(
        self, sampler: PatchSampler, resident: ResidentCases, iterations_per_epoch: int, seed: int, rank: int = 0
    ) -> None:
        if iterations_per_epoch < 1:
            raise ValueError(f"iterations_per_epoch must be at least 1, got {iterations_per_epoch}")
        self.sampler = sampler
        self.resident = resident
        self.iterations_per_epoch = iterations_per_epoch
        self.seed = seed
        self.rank = rank

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict[str, Any]]:
        if not 0 <= start <= self.iterations_per_epoch or epoch < 0:
            raise ValueError(f"epoch {epoch} must be >= 0 and start {start} in [0, {self.iterations_per_epoch}]")
        for iteration in range(start, self.iterations_per_epoch):
            rng, _ = batch_random(self.seed, self.rank, epoch, iteration)
            placements = self.sampler.place(rng)
            yield {"placements": placements, "keys": [case_id for case_id, _, _ in placements]}

    def to_device(self, batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.resident.cut(batch["placements"], self.sampler.sample_size)

    def close(self) -> None:
        """Nothing runs in the background; the cases go with the loader."""
