"""Pure geometry of a plan: target spacing, resampled shapes, pooling/kernel topology.

The rules reproduce nnU-Net v2 (``default_experiment_planner.py``, ``network_topology.py``) to the last
voxel, so that a plan made here matches the one nnU-Net makes for the same fingerprint. Where nnU-Net
works in floating point (percentiles, 1/spacing scaling) the same numpy operations are used in the same
order, because a one-ulp difference can flip a rounding and change a patch edge. The memory estimate is
not here: ``autoseg.networks.feature_map_elements`` counts it on the network itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Topology:
    """The pooling and kernel layout of a U-Net for one patch size (nnU-Net's get_pool_and_conv_props)."""

    pools_per_axis: tuple[int, ...]
    strides: tuple[tuple[int, ...], ...]  # one per stage; the first stage never downsamples
    kernel_sizes: tuple[tuple[int, ...], ...]  # one per stage; the last is the bottleneck's
    patch_size: tuple[int, ...]  # the requested patch padded up to a multiple of the divisor

    @property
    def num_stages(self) -> int:
        return len(self.strides)

    @property
    def shape_must_be_divisible_by(self) -> tuple[int, ...]:
        return tuple(2**n for n in self.pools_per_axis)


def pad_to_multiple(shape: Sequence[float], divisors: Sequence[int]) -> tuple[int, ...]:
    """Round every edge up to a multiple of its divisor (an edge already a multiple is kept)."""
    return tuple(int(s) if s % d == 0 else int(s - s % d + d) for s, d in zip(shape, divisors))


def pool_and_kernel_topology(
    spacing: Sequence[float],
    patch_size: Sequence[float],
    min_feature_map_edge: int = 4,
    max_pools_per_axis: int = 999999,
    min_edges_to_pool: int = 2,
    min_edges_to_pool_alone: int = 3,
    max_spacing_ratio: float = 2.0,
) -> Topology:
    """Pool every axis that is large enough and not much coarser than the finest poolable axis.

    Defaults are nnU-Net's: an axis is pooled while its feature map holds at least two bottleneck edges
    (three if it is the only axis left, so a lone axis is not squeezed to a sliver), and only while its
    spacing is within ``max_spacing_ratio`` of the finest poolable axis, which makes anisotropic data pool
    in-plane first until the voxels are roughly isotropic. A kernel is 1 along an axis until that axis'
    spacing comes within ``max_spacing_ratio`` of the finest, then 3 for good: no 3D context is mixed
    across thick slices.
    """
    dim = len(spacing)
    current_spacing = [float(s) for s in spacing]
    current_size = list(patch_size)
    pools_per_axis = [0] * dim
    kernel = [1] * dim
    strides: list[tuple[int, ...]] = [(1,) * dim]
    kernel_sizes: list[tuple[int, ...]] = []
    while True:
        large_enough = [d for d in range(dim) if current_size[d] >= min_edges_to_pool * min_feature_map_edge]
        if not large_enough:
            break
        finest = min(current_spacing[d] for d in large_enough)
        poolable = [
            d
            for d in large_enough
            if current_spacing[d] / finest < max_spacing_ratio and pools_per_axis[d] < max_pools_per_axis
        ]
        if len(poolable) == 1 and current_size[poolable[0]] < min_edges_to_pool_alone * min_feature_map_edge:
            break
        if not poolable:
            break
        finest_overall = min(current_spacing)
        for d in range(dim):
            if current_spacing[d] / finest_overall < max_spacing_ratio:
                kernel[d] = 3
        stride = tuple(2 if d in poolable else 1 for d in range(dim))
        for d in poolable:
            pools_per_axis[d] += 1
            current_spacing[d] *= 2
            current_size[d] = math.ceil(current_size[d] / 2)
        strides.append(stride)
        kernel_sizes.append(tuple(kernel))
    kernel_sizes.append((3,) * dim)  # the bottleneck always sees full 3x3(x3) context
    divisors = [2**n for n in pools_per_axis]
    return Topology(tuple(pools_per_axis), tuple(strides), tuple(kernel_sizes), pad_to_multiple(patch_size, divisors))


def target_spacing(
    spacings: Sequence[Sequence[float]],
    shapes: Sequence[Sequence[int]],
    anisotropy_threshold: float = 3.0,
    anisotropic_percentile: float = 10.0,
    anisotropic_margin: float = 1e-5,
) -> tuple[float, ...]:
    """The per-axis median spacing, except along a thick-slice axis.

    An axis is thick-slice when its median spacing exceeds ``anisotropy_threshold`` times every other
    axis' and it also has that many times fewer voxels. Resampling such data to its median slice
    thickness would smear the finer cases, so that axis takes a low percentile of its spacings instead
    (nnU-Net: the 10th), kept just above the other axes' spacing so it stays the coarsest.
    """
    spacing_array = np.vstack(spacings).astype(np.float64)
    target = np.percentile(spacing_array, 50, axis=0)
    median_size = np.percentile(np.vstack(shapes), 50, axis=0)
    worst = int(np.argmax(target))
    others = [d for d in range(len(target)) if d != worst]
    if not others:
        return tuple(float(t) for t in target)
    max_other_spacing = max(target[d] for d in others)
    aniso_spacing = target[worst] > anisotropy_threshold * max_other_spacing
    aniso_voxels = median_size[worst] * anisotropy_threshold < min(median_size[d] for d in others)
    if aniso_spacing and aniso_voxels:
        thick = np.percentile(spacing_array[:, worst], anisotropic_percentile)
        if thick < max_other_spacing:
            thick = max(max_other_spacing, thick) + anisotropic_margin
        target[worst] = thick
    return tuple(float(t) for t in target)


def coarsest_axis_first(spacing: Sequence[float]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(transpose_forward, transpose_backward)`` moving the coarsest axis (first of ties) to the front."""
    coarsest = int(np.argmax(spacing))
    forward = (coarsest, *(d for d in range(len(spacing)) if d != coarsest))
    backward = tuple(forward.index(d) for d in range(len(spacing)))
    return forward, backward
