"""Voxel locations per class, sampled once at preprocessing, for foreground oversampling in training.

The sample size rule is nnU-Net's (DefaultPreprocessor._sample_foreground_locations): every voxel of a
small class, else ``MIN_SAMPLES``, and never less than ``MIN_COVERAGE`` of the class, so that a large
structure is covered evenly. The draw is different (our own generator), the rule is the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# nnU-Net's min_num_samples and min_percent_coverage.
MIN_SAMPLES = 10_000
MIN_COVERAGE = 0.01


def sample_size(voxels: int) -> int:
    """How many of a class's ``voxels`` to keep."""
    # The float product (not integer division) is nnU-Net's; it decides the rare off-by-one the same way.
    return max(min(MIN_SAMPLES, voxels), math.ceil(voxels * MIN_COVERAGE))


def sample_class_locations(label: np.ndarray, classes: Sequence[int], seed: int) -> dict[int, np.ndarray]:
    """Per class, ``sample_size(n)`` coordinates (N, ndim) int32 of its voxels, drawn without replacement.

    A class that does not occur gets an empty (0, ndim) array. The same label map, classes and seed give
    the same locations; classes are drawn in the given order from one generator.
    """
    rng = np.random.default_rng(seed)
    locations: dict[int, np.ndarray] = {}
    for value in classes:
        flat = _sample_flat_indices(label == value, rng)
        locations[int(value)] = np.stack(np.unravel_index(flat, label.shape), axis=1).astype(np.int32)
    return locations


def _sample_flat_indices(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flat indices of ``sample_size`` True voxels of ``mask``, in raster order.

    Ranks are drawn first and found slab by slab along the first axis, so a class that fills much of a
    large volume never needs the index array of all its voxels (8 bytes each) at once.
    """
    if mask.ndim == 0 or mask.size == 0:
        return np.zeros(0, dtype=np.intp)
    slabs = mask.reshape(mask.shape[0], -1)
    per_slab = np.count_nonzero(slabs, axis=1)
    voxels = int(per_slab.sum())
    wanted = sample_size(voxels)
    if wanted >= voxels:
        return np.flatnonzero(mask)
    ranks = np.sort(rng.choice(voxels, size=wanted, replace=False))
    slab_end = np.cumsum(per_slab)
    slab_of_rank = np.searchsorted(slab_end, ranks, side="right")
    picked = np.empty(wanted, dtype=np.intp)
    bounds = np.searchsorted(slab_of_rank, np.arange(len(per_slab) + 1))
    for slab in np.flatnonzero(bounds[1:] > bounds[:-1]):
        first, last = bounds[slab], bounds[slab + 1]
        slab_start = slab_end[slab] - per_slab[slab]
        in_slab = np.flatnonzero(slabs[slab])
        picked[first:last] = in_slab[ranks[first:last] - slab_start] + slab * slabs.shape[1]
    return picked
