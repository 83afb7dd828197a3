"""Cropping a case to the region where its image is nonzero, and putting a crop back.

The rules are nnU-Net's (preprocessing/cropping): the nonzero mask is "any channel nonzero" with holes
filled, the crop is its bounding box, and inside the crop the label map gets ``OUTSIDE_LABEL`` where it is
background *and* outside the mask. That marker is what masked normalization (``use_mask_for_norm``) later
reads as "not part of the body", e.g. the air around a skull-stripped brain.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_fill_holes

BoundingBox = tuple[tuple[int, int], ...]

# Written into the cropped label map where it is background outside the nonzero mask (nnU-Net's
# nonzero_label default of crop_to_nonzero).
OUTSIDE_LABEL = -1


def bounding_box(mask: np.ndarray) -> BoundingBox:
    """The smallest [start, stop) box per axis that holds every True voxel; an empty mask gives the whole array."""
    if not mask.any():
        return tuple((0, int(n)) for n in mask.shape)
    box: list[tuple[int, int]] = []
    region = mask
    for axis in range(mask.ndim):
        other_axes = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(region.any(axis=other_axes))
        start, stop = int(hits[0]), int(hits[-1]) + 1
        box.append((start, stop))
        # Each later projection only needs the slab found so far, which is usually much smaller.
        region = region[(slice(None),) * axis + (slice(start, stop),)]
    return tuple(box)


def box_slices(box: BoundingBox) -> tuple[slice, ...]:
    return tuple(slice(start, stop) for start, stop in box)


def nonzero_mask(image: np.ndarray) -> np.ndarray:
    """True where any channel of ``image`` (C, *spatial) is nonzero, with enclosed holes filled."""
    return _mask_and_box(image)[0]


def _mask_and_box(image: np.ndarray) -> tuple[np.ndarray, BoundingBox]:
    if image.ndim < 2:
        raise ValueError(f"image must be (C, *spatial), got shape {image.shape}")
    mask = image[0] != 0
    for channel in image[1:]:
        mask |= channel != 0
    # A hole lies inside the bounding box of the mask, and a background voxel inside the box reaches
    # the outside exactly when it reaches the box's faces, so filling the box alone gives the same
    # result as filling the whole volume, at the cost of the box.
    box = bounding_box(mask)
    inner = box_slices(box)
    mask[inner] = binary_fill_holes(mask[inner])
    return mask, box


def crop_to_nonzero(image: np.ndarray, label: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, BoundingBox]:
    """Crop ``image`` (C, *spatial) and ``label`` (*spatial) to the bounding box of the nonzero mask.

    Returns new arrays (the inputs are not modified) and the box. In the cropped label, background
    outside the nonzero mask becomes ``OUTSIDE_LABEL``; without a label, one of 0 (inside) and
    ``OUTSIDE_LABEL`` (outside) is made from the mask. An all-zero image keeps its whole volume.
    """
    if label is not None and label.shape != image.shape[1:]:
        raise ValueError(f"label shape {label.shape} does not match image shape {image.shape[1:]}")
    mask, box = _mask_and_box(image)
    inner = box_slices(box)
    image_cropped = image[(slice(None), *inner)].copy()
    inside = mask[inner]
    if label is None:
        label_cropped = np.where(inside, np.int8(0), np.int8(OUTSIDE_LABEL))
        return image_cropped, label_cropped, box
    # An unsigned label map cannot hold the marker; widen it to the smallest signed type that holds both.
    dtype = np.result_type(label.dtype, np.int8)
    label_cropped = label[inner].astype(dtype, copy=True)
    label_cropped[(label_cropped == 0) & ~inside] = OUTSIDE_LABEL
    return image_cropped, label_cropped, box


def uncrop(array: np.ndarray, box: BoundingBox, full_shape: tuple[int, ...], fill: float = 0) -> np.ndarray:
    """Place ``array`` (*leading, *cropped spatial) back into a ``fill``-ed array of spatial ``full_shape``.

    ``box`` and ``full_shape`` describe the trailing spatial axes; leading axes (channels) are kept.
    """
    spatial = len(box)
    if len(full_shape) != spatial:
        raise ValueError(f"full_shape {full_shape} and bounding box {box} differ in the number of axes")
    cropped_shape = tuple(stop - start for start, stop in box)
    if array.shape[array.ndim - spatial :] != cropped_shape:
        raise ValueError(f"array of shape {array.shape} does not fit bounding box {box}")
    leading = array.shape[: array.ndim - spatial]
    full = np.full((*leading, *full_shape), fill, dtype=array.dtype)
    full[(slice(None),) * len(leading) + box_slices(box)] = array
    return full
