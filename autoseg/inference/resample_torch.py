"""The device twin of ``resample_probabilities``: the same operators, applied with torch on the GPU (or CPU).

``autoseg.preprocessing.resample`` writes a grid-mode zoom as one banded (n_out, n_in) matrix per axis
(``_interpolation_operator``), an order-0 zoom as an index table (``_nearest_indices``), and treats a
strongly anisotropic volume's thick axis apart (``thick_axis``): in-plane first, clipped to the input's
range, then the thick axis with ``out_of_plane_order``. Here the very same matrices and tables are moved to
the device once per case (``ProbabilityResampler``) and applied to one class channel at a time with
``torch.matmul`` / ``index_select``, so a 14-class CT needs one full-resolution channel on the device at a
time, not fourteen. The results equal the CPU path's to float32 rounding (tests/test_predict.py).
The resampler takes any ``order``: ``autoseg.inference.preprocess_torch`` resamples the image itself with
it (``plan.image_order``), as ``resample_image`` does on the CPU.

On CUDA, matmuls follow ``torch.backends.cuda.matmul.allow_tf32``; with TF32 on (not torch's default) the
interpolation weights lose precision to ~1e-3, which moves only near-tied argmaxes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from autoseg.plan import ResamplingPlan
from autoseg.preprocessing.resample import (
    _OPERATOR_BLOCK_ROWS,
    PROBABILITY_ORDER,
    _interpolation_operator,
    _nearest_indices,
    _span,
    thick_axis,
)


@dataclass(frozen=True)
class _AxisStep:
    """One axis of a resampling: a banded matrix product or a gather (``indices``), on the device.

    The operator is kept as blocks of ``_OPERATOR_BLOCK_ROWS`` output rows, each with only the input columns
    it touches (``_banded_product``'s idea): linear interpolation touches two inputs per output, so a dense
    product would do about n_in / 2 times the work (a 512-voxel CT axis: 256 times).
    """

    axis: int
    n_out: int
    blocks: tuple[tuple[slice, slice, torch.Tensor], ...] = ()  # (output rows, input columns, operator block)
    indices: torch.Tensor | None = None  # (n_out,) int64

    def apply(self, volume: torch.Tensor) -> torch.Tensor:
        if self.indices is not None:
            return volume.index_select(self.axis, self.indices)
        shape = volume.shape
        new_shape = (*shape[: self.axis], self.n_out, *shape[self.axis + 1 :])
        if self.axis == volume.ndim - 1:
            # the last axis: every line is a row, so one GEMM (lines, columns) @ (columns, rows) per block
            lines = volume.reshape(-1, shape[-1])
            result = torch.empty((lines.shape[0], self.n_out), dtype=volume.dtype, device=volume.device)
            for rows, columns, block in self.blocks:
                result[:, rows] = lines[:, columns] @ block.T
            return result.reshape(new_shape)
        before = int(np.prod(shape[: self.axis], dtype=np.int64))
        stacked = volume.reshape(before, shape[self.axis], -1)  # (before, n_in, after)
        result = torch.empty((before, self.n_out, stacked.shape[2]), dtype=volume.dtype, device=volume.device)
        for rows, columns, block in self.blocks:
            # (rows, columns) @ (before, columns, after): one GEMM when the axis is the first, else batched
            result[:, rows] = torch.matmul(block, stacked[:, columns])
        return result.reshape(new_shape)


def _step(axis: int, n_in: int, n_out: int, order: int, device: torch.device) -> _AxisStep:
    if order == 0:
        indices = torch.from_numpy(_nearest_indices(n_in, n_out).astype(np.int64)).to(device)
        return _AxisStep(axis, n_out, indices=indices)
    operator = _interpolation_operator(n_in, n_out, order)  # float32, negligible weights dropped, as on the CPU
    blocks = []
    for start in range(0, n_out, _OPERATOR_BLOCK_ROWS):
        rows = slice(start, min(start + _OPERATOR_BLOCK_ROWS, n_out))
        columns = _span(np.any(operator[rows], axis=0))
        if columns.stop > columns.start:
            blocks.append((rows, columns, torch.from_numpy(operator[rows, columns].copy()).to(device)))
        else:  # a block of all-zero rows (cannot happen for a zoom, whose rows sum to 1): zeros, not garbage
            blocks.append((rows, slice(0, 1), torch.zeros((rows.stop - rows.start, 1), device=device)))
    return _AxisStep(axis, n_out, tuple(blocks))


class ProbabilityResampler:
    """Resamples single channels (*spatial) from ``old_shape`` to ``new_shape`` as ``resample_probabilities``.

    Built once per case: the operators of every changed axis go to ``device`` here, and each call then
    resamples one channel. ``is_identity`` when no axis changes (the channel is returned as is).
    """

    def __init__(
        self,
        old_shape: Sequence[int],
        new_shape: Sequence[int],
        old_spacing: Sequence[float],
        new_spacing: Sequence[float],
        plan: ResamplingPlan,
        device: torch.device | str,
        order: int = PROBABILITY_ORDER,
    ) -> None:
        self.old_shape = tuple(int(n) for n in old_shape)
        self.new_shape = tuple(int(n) for n in new_shape)
        if len(self.old_shape) != len(self.new_shape):
            raise ValueError(f"shapes {self.old_shape} and {self.new_shape} differ in the number of axes")
        device = torch.device(device)
        axis = thick_axis(old_spacing, new_spacing, plan.anisotropy_threshold)
        in_plane = [a for a in range(len(self.old_shape)) if a != axis]
        self.in_plane: list[_AxisStep] = [
            _step(a, self.old_shape[a], self.new_shape[a], order, device)
            for a in in_plane
            if self.old_shape[a] != self.new_shape[a]
        ]
        # skimage's clip=True after the in-plane pass: over the whole volume, or per slice of the thick axis
        self.clip_axes = tuple(in_plane)
        self.clip_per_slice = axis is not None
        self.out_of_plane: list[_AxisStep] = []
        if axis is not None and self.old_shape[axis] != self.new_shape[axis]:
            self.out_of_plane.append(
                _step(axis, self.old_shape[axis], self.new_shape[axis], plan.out_of_plane_order, device)
            )
        self.is_identity = self.old_shape == self.new_shape

    def __call__(self, channel: torch.Tensor) -> torch.Tensor:
        """``channel`` (*old_shape) resampled to ``new_shape`` in float32 on the channel's device."""
        if tuple(channel.shape) != self.old_shape:
            raise ValueError(f"channel of shape {tuple(channel.shape)}; this resampler takes {self.old_shape}")
        volume = channel.float()
        if self.is_identity:
            return volume
        result = volume
        for step in self.in_plane:
            result = step.apply(result)
        if self.in_plane:
            if self.clip_per_slice:
                low = volume.amin(dim=self.clip_axes, keepdim=True)
                high = volume.amax(dim=self.clip_axes, keepdim=True)
            else:
                low, high = volume.min(), volume.max()
            result = torch.clamp(result, low, high)
        for step in self.out_of_plane:  # along the thick axis nnU-Net uses map_coordinates, which does not clip
            result = step.apply(result)
        return result


def resample_probabilities_torch(
    probabilities: torch.Tensor,
    new_shape: Sequence[int],
    old_spacing: Sequence[float],
    new_spacing: Sequence[float],
    plan: ResamplingPlan,
    order: int = PROBABILITY_ORDER,
) -> torch.Tensor:
    """``resample_probabilities`` on ``probabilities``' device: (K, *spatial) -> (K, *new_shape) float32.

    Holds all K resampled channels; a caller that only needs the argmax should use ``ProbabilityResampler``
    one channel at a time instead.
    """
    if probabilities.ndim != len(new_shape) + 1:
        raise ValueError(
            f"probabilities must be (K, *spatial) with {len(new_shape)} spatial axes, got {tuple(probabilities.shape)}"
        )
    resampler = ProbabilityResampler(
        probabilities.shape[1:], new_shape, old_spacing, new_spacing, plan, probabilities.device, order
    )
    result = torch.empty((probabilities.shape[0], *resampler.new_shape), device=probabilities.device)
    for k in range(probabilities.shape[0]):
        result[k] = resampler(probabilities[k])
    return result
