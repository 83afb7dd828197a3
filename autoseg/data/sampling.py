"""Patch sampling with foreground oversampling, as nnU-Net's data loader does it.

A batch draws its cases uniformly with replacement. Its last ``round(batch_size * oversample_foreground)``
samples are forced to contain foreground: a class present in the case is chosen, then one of its stored
voxels, and the patch is centred there. The others are placed uniformly. Patches are cut at ``sample_size``
(larger than the network's patch so that rotation and scaling do not pull in padding); the spatial
augmentation then cuts the final patch from their centre.

Where a patch leaves the case the image is padded with 0 and the label with -1 (ignored by the loss);
-1 stored in a case (outside the nonzero mask) is background and becomes 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from autoseg.data.cases import PreprocessedCases
from autoseg.errors import AutosegError

IGNORE_LABEL = -1  # padding value of labels; the loss ignores it

# where one sample comes from: (case id, slice index along the first axis for 2D or None, start per axis)
Placement = tuple[str, int | None, tuple[int, ...]]


def sampling_bounds(
    data_shape: Sequence[int], sample_size: Sequence[int], patch_size: Sequence[int]
) -> list[tuple[int, int]]:
    """Per axis the lowest and highest allowed start of a sample, as nnU-Net's ``get_bbox``.

    The sample may stick out of the case by half the enlargement (sample - patch) on each side, so that the
    final patch, cut from the sample's centre, can reach every border voxel. Where the case is smaller than
    the sample it may stick out by half the difference instead.
    """
    bounds = []
    for size, sample, patch in zip(data_shape, sample_size, patch_size):
        need_to_pad = max(sample - patch, sample - size)
        half_up = -(-need_to_pad // 2)  # ceil: an odd enlargement lets the sample stick out by one more
        bounds.append((-half_up, size + half_up - sample))
    return bounds


def _overlap(
    starts: Sequence[int], size: Sequence[int], shape: Sequence[int]
) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """Slices of the array and of the crop where a crop at ``starts`` overlaps an array of ``shape``."""
    source = []
    target = []
    for start, length, extent in zip(starts, size, shape):
        lo, hi = max(start, 0), min(start + length, extent)
        if hi <= lo:
            return None
        source.append(slice(lo, hi))
        target.append(slice(lo - start, hi - start))
    return tuple(source), tuple(target)


def crop_with_padding(
    array: np.ndarray,
    starts: Sequence[int],
    size: Sequence[int],
    fill: float,
    dtype: npt.DTypeLike | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``array[..., starts:starts+size]`` over the trailing axes, ``fill`` outside the array.

    Only the overlapping part is read, so a memory-mapped array stays on disk apart from the crop. With
    ``out`` (shape ``(*lead, *size)``) the crop is written there, without a temporary.
    """
    lead = array.ndim - len(starts)
    if out is None:
        out = np.empty((*array.shape[:lead], *size), dtype=dtype or array.dtype)
    overlap = _overlap(starts, size, array.shape[lead:])
    if overlap is None or any(s.stop - s.start != n for s, n in zip(overlap[1], size)):
        out.fill(fill)  # only where the crop leaves the array is the fill needed
    if overlap is not None:
        source: tuple[Any, ...] = (Ellipsis, *overlap[0])
        target: tuple[Any, ...] = (Ellipsis, *overlap[1])
        out[target] = array[source]
    return out


def _case_probabilities(case_ids: Sequence[str], weights: Sequence[float] | None) -> np.ndarray | None:
    """Relative sampling weights, one per case, as probabilities; None stays None (uniform)."""
    if weights is None:
        return None
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(case_ids),) or not np.all(np.isfinite(w)) or w.min() < 0 or w.sum() <= 0:
        raise ValueError(
            f"case_weights must give one finite weight >= 0 per case ({len(case_ids)}), not all 0; got {list(w)}"
        )
    return w / w.sum()


class PatchSampler:
    """Cuts training samples out of preprocessed cases; ``sample(rng)`` is a pure function of the generator."""

    def __init__(
        self,
        cases: PreprocessedCases,
        case_ids: Sequence[str],
        patch_size: Sequence[int],
        sample_size: Sequence[int],
        batch_size: int,
        oversample_foreground: float = 0.33,  # nnU-Net's oversample_foreground_percent
        foreground_labels: Sequence[int] | None = None,
        case_weights: Sequence[float] | None = None,
    ) -> None:
        if len(patch_size) not in (2, 3) or len(sample_size) != len(patch_size):
            raise ValueError(f"patch_size {tuple(patch_size)} and sample_size {tuple(sample_size)} must be 2D or 3D")
        if any(s < p for s, p in zip(sample_size, patch_size)):
            raise ValueError(f"sample_size {tuple(sample_size)} is smaller than patch_size {tuple(patch_size)}")
        if not case_ids:
            raise AutosegError(f"{cases.folder}: no cases to sample training patches from")
        if batch_size < 1 or not 0.0 <= oversample_foreground <= 1.0:
            raise ValueError(
                f"batch_size {batch_size} must be >= 1, oversample_foreground {oversample_foreground} in [0, 1]"
            )
        self.cases = cases
        self.case_ids = list(case_ids)
        self.case_probabilities = _case_probabilities(self.case_ids, case_weights)
        self.patch_size = tuple(int(s) for s in patch_size)
        self.sample_size = tuple(int(s) for s in sample_size)
        self.batch_size = batch_size
        self.oversample_foreground = oversample_foreground
        self.foreground_labels = None if foreground_labels is None else {int(v) for v in foreground_labels}
        self._shapes: dict[str, tuple[int, ...]] = {}  # spatial shape per case, filled by _shape

    @property
    def dim(self) -> int:
        return len(self.patch_size)

    def is_forced(self, sample_index: int) -> bool:
        """nnU-Net's rule: the last round(B * oversample) samples of a batch are forced foreground."""
        return not sample_index < round(self.batch_size * (1 - self.oversample_foreground))

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(image float32 (B, C, *sample_size), label int16 (B, 1, *sample_size), case ids)."""
        placements = self.place(rng)
        images, labels = self.cut(placements)
        return images, labels, [case_id for case_id, _, _ in placements]

    def place(self, rng: np.random.Generator) -> list[Placement]:
        """Where each sample of a batch comes from: (case id, slice index in 2D else None, start per axis).

        All of a batch's random draws happen here, so the batch is the same whether ``cut`` reads it from the
        stored cases or ``ResidentCases`` cuts it on the device.
        """
        if self.case_probabilities is None:  # nnU-Net: every case equally often
            picks = rng.integers(0, len(self.case_ids), self.batch_size)
        else:
            picks = rng.choice(len(self.case_ids), self.batch_size, p=self.case_probabilities)
        keys = [self.case_ids[i] for i in picks]
        return [self._place(case_id, self.is_forced(index), rng) for index, case_id in enumerate(keys)]

    def cut(self, placements: Sequence[Placement]) -> tuple[np.ndarray, np.ndarray]:
        """The samples at ``placements`` from the stored cases: image float32 (B, C, *sample_size) with 0
        outside the case, label int16 (B, 1, *sample_size) with -1 outside it."""
        images: np.ndarray | None = None
        labels = np.empty((len(placements), 1, *self.sample_size), dtype=np.int16)
        for index, (case_id, z, starts) in enumerate(placements):
            image, seg = self.cases.image(case_id), self.cases.seg(case_id)
            if z is not None:
                image, seg = image[:, z], seg[z]
            if images is None:  # each sample is cut straight into the batch: no stacking copy
                images = np.empty((len(placements), image.shape[0], *self.sample_size), dtype=np.float32)
            elif image.shape[0] != images.shape[1]:
                raise AutosegError(
                    f"{self.cases.folder}: case {case_id} has {image.shape[0]} channels, case"
                    f" {placements[0][0]} {images.shape[1]}; every case needs the same channels: run"
                    " `autoseg preprocess` again"
                )
            crop_with_padding(image, starts, self.sample_size, 0.0, out=images[index])
            label_patch = labels[index, 0]
            overlap = _overlap(starts, self.sample_size, seg.shape)
            if overlap is None or any(s.stop - s.start != n for s, n in zip(overlap[1], self.sample_size)):
                label_patch.fill(IGNORE_LABEL)
            if overlap is not None:
                # stored -1 (outside the nonzero mask) is background; only padding is ignored
                np.maximum(seg[overlap[0]], 0, out=label_patch[overlap[1]])
        assert images is not None  # batch_size >= 1
        return images, labels

    def _foreground_voxel(self, case_id: str, rng: np.random.Generator) -> np.ndarray | None:
        """A stored voxel (z, y, x) of a class chosen uniformly among those present, or None."""
        locations = self.cases.locations(case_id)
        classes = np.unique(locations[:, 0])
        if self.foreground_labels is not None:
            classes = np.array([c for c in classes if int(c) in self.foreground_labels], dtype=locations.dtype)
        if len(classes) == 0:
            return None
        chosen = locations[locations[:, 0] == classes[rng.integers(len(classes))]]
        return chosen[rng.integers(len(chosen)), 1:]

    def _shape(self, case_id: str) -> tuple[int, ...]:
        """The case's spatial shape, checked against its image once and then remembered, so that placing a
        sample opens no file (``cut`` reads the arrays)."""
        shape = self._shapes.get(case_id)
        if shape is None:
            seg, image = self.cases.seg(case_id), self.cases.image(case_id)
            if image.ndim != 4 or image.shape[1:] != seg.shape:
                raise AutosegError(
                    f"{self.cases.folder}: case {case_id} has image shape {image.shape} and label shape"
                    f" {seg.shape}; expected (C, z, y, x) and (z, y, x); run `autoseg preprocess` again"
                )
            shape = self._shapes[case_id] = tuple(int(n) for n in seg.shape)
        return shape

    def _place(self, case_id: str, force_foreground: bool, rng: np.random.Generator) -> Placement:
        shape = self._shape(case_id)
        voxel = self._foreground_voxel(case_id, rng) if force_foreground else None
        z = None
        if self.dim == 2:
            # 2D configurations train on one slice along the first (out-of-plane) axis of the stored volume
            z = int(voxel[0]) if voxel is not None else int(rng.integers(shape[0]))
            shape = shape[1:]
            voxel = None if voxel is None else voxel[1:]
        starts = []
        for axis, (lo, hi) in enumerate(sampling_bounds(shape, self.sample_size, self.patch_size)):
            if voxel is None:
                starts.append(int(rng.integers(lo, hi + 1)))
            else:  # centre on the voxel; clamping keeps it inside the sample and the padding within bounds
                starts.append(int(np.clip(int(voxel[axis]) - self.sample_size[axis] // 2, lo, hi)))
        return case_id, z, tuple(starts)
