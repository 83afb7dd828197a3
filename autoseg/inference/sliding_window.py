"""Sliding-window prediction with Gaussian weighting and mirror test-time augmentation.

What it computes is nnU-Net v2's ``predict_sliding_window_return_logits``: the image is padded to at least
the patch size, overlapping tiles are predicted, each tile's logits are weighted with a Gaussian that
trusts the tile centre more than its border, and the result is the weighted average of the tiles' logits.
With mirroring, each tile's logits are first averaged over all flips of the mirror axes (flipped back).

How: tiles (and their mirrored copies) travel to the network's device in batches of ``tile_batch_size``,
so the input volume may stay on the CPU and device memory is bounded by one batch plus the accumulators.
A 2D network on a (C, z, y, x) volume sees each z slice as a 2D image; slices and tiles share batches.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from math import ceil

import numpy as np
import torch
from torch import nn

# nnU-Net v2 defaults (nnUNetPredictor / compute_gaussian).
GAUSSIAN_SIGMA_SCALE = 1.0 / 8  # sigma = patch edge / 8 per axis
GAUSSIAN_VALUE_SCALING = 10.0  # peak weight; keeps half-precision accumulation away from underflow
DEFAULT_STEP_SIZE = 0.5  # tiles overlap by half a patch
# Network inputs per forward pass (tiles times mirrored copies). nnU-Net predicts one at a time; a few
# at once keep a GPU busier, and inference stores no activations for backward, so this stays small.
DEFAULT_TILE_BATCH_SIZE = 4


def gaussian_importance_map(
    patch_size: Sequence[int],
    sigma_scale: float = GAUSSIAN_SIGMA_SCALE,
    value_scaling_factor: float = GAUSSIAN_VALUE_SCALING,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """nnU-Net's tile weights: a delta at ``patch // 2`` blurred with sigma = ``patch * sigma_scale``.

    Computed analytically as a product of 1D Gaussians. scipy's ``gaussian_filter`` (nnU-Net) samples the
    same kernel and truncates it at 4 sigma = patch / 2, beyond every voxel of the patch, so both agree to
    rounding. Scaled to a maximum of ``value_scaling_factor``; entries that are zero in ``dtype`` (corners
    in half precision) become the smallest nonzero one, so that no voxel ends up with zero total weight.
    """
    weights = _gaussian_numpy(tuple(int(p) for p in patch_size), float(sigma_scale), float(value_scaling_factor))
    result = torch.tensor(weights, device=device, dtype=dtype)
    zero = result == 0
    if zero.any():
        result[zero] = result[~zero].min()
    return result


@lru_cache(maxsize=4)
def _gaussian_numpy(patch_size: tuple[int, ...], sigma_scale: float, value_scaling_factor: float) -> np.ndarray:
    weights = np.ones((), dtype=np.float64)
    for edge in patch_size:
        offsets = np.arange(edge, dtype=np.float64) - edge // 2
        sigma = edge * sigma_scale
        line = np.exp(-0.5 * (offsets / sigma) ** 2) if sigma > 0 else (offsets == 0).astype(np.float64)
        weights = np.multiply.outer(weights, line)
    weights *= value_scaling_factor / weights.max()
    weights.flags.writeable = False
    return weights


def tile_starts(
    image_shape: Sequence[int], patch_size: Sequence[int], step_size: float = DEFAULT_STEP_SIZE
) -> list[list[int]]:
    """Start of every tile per axis, as nnU-Net's ``compute_steps_for_sliding_window``.

    Per axis: ``ceil((size - patch) / (patch * step_size)) + 1`` tiles, spread evenly from 0 to
    ``size - patch`` (rounded), so that the first and last tiles touch the image border.
    """
    if len(image_shape) != len(patch_size):
        raise ValueError(f"image shape {tuple(image_shape)} and patch size {tuple(patch_size)} differ in length")
    if not 0 < step_size <= 1:
        raise ValueError(f"step_size must be in (0, 1], got {step_size}")
    starts = []
    for size, patch in zip(image_shape, patch_size):
        if size < patch:
            raise ValueError(f"image shape {tuple(image_shape)} is smaller than the patch {tuple(patch_size)}")
        count = ceil((size - patch) / (patch * step_size)) + 1
        stride = (size - patch) / (count - 1) if count > 1 else 0.0
        # np.round (half to even), not Python's round, to hit nnU-Net's tiles exactly
        starts.append([int(np.round(stride * i)) for i in range(count)])
    return starts


@dataclass(frozen=True)
class _Layout:
    """How the network's patches sit in the (padded) image.

    ``tile_shape`` has one entry per spatial axis of the image; for a 2D network on a volume it is
    ``(1, *patch_size)``, and the network sees the tile with that leading axis squeezed out.
    """

    patch_size: tuple[int, ...]
    slice_axes: int  # leading spatial axes predicted one index at a time (1 for 2D-on-3D, else 0)

    @property
    def tile_shape(self) -> tuple[int, ...]:
        return (1,) * self.slice_axes + self.patch_size

    def tiles(self, shape: Sequence[int], step_size: float) -> list[tuple[slice, ...]]:
        per_axis = [[(i, 1) for i in range(n)] for n in shape[: self.slice_axes]]
        per_axis += [
            [(s, p) for s in starts]
            for starts, p in zip(tile_starts(shape[self.slice_axes :], self.patch_size, step_size), self.patch_size)
        ]
        return [tuple(slice(s, s + n) for s, n in corner) for corner in itertools.product(*per_axis)]


def _layout(image: torch.Tensor, patch_size: Sequence[int]) -> _Layout:
    patch = tuple(int(p) for p in patch_size)
    spatial = image.ndim - 1
    if spatial == len(patch):
        return _Layout(patch, 0)
    if spatial == len(patch) + 1:
        return _Layout(patch, 1)
    raise ValueError(
        f"image of shape {tuple(image.shape)} (channels first) does not fit a {len(patch)}D patch {patch}: "
        f"expected {len(patch)} or {len(patch) + 1} spatial axes"
    )


def _pad_to_patch(image: torch.Tensor, tile_shape: Sequence[int]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Pad with zeros, evenly on both sides (as nnU-Net's pad_nd_image), to at least ``tile_shape``.

    Returns the padded image and the slices that cut the original region back out.
    """
    spatial = image.shape[1:]
    before = [max(0, t - s) // 2 for s, t in zip(spatial, tile_shape)]
    after = [max(0, t - s) - b for s, t, b in zip(spatial, tile_shape, before)]
    crop = tuple(slice(b, b + s) for b, s in zip(before, spatial))
    if not any(before) and not any(after):
        return image, crop
    # F.pad takes (last axis before, after, second to last ...)
    pads = [n for pair in zip(reversed(before), reversed(after)) for n in pair]
    return torch.nn.functional.pad(image, pads, mode="constant", value=0.0), crop


def _mirror_flips(mirror_axes: Sequence[int] | None, network_dim: int) -> list[tuple[int, ...]]:
    """All subsets of ``mirror_axes`` as tensor dims of a (B, C, *patch) batch, the identity first."""
    axes = sorted({int(a) for a in (mirror_axes or ())})
    if len(axes) != len(tuple(mirror_axes or ())) or any(not 0 <= a < network_dim for a in axes):
        raise ValueError(
            f"mirror_axes {tuple(mirror_axes or ())} must be distinct spatial axes of a {network_dim}D network "
            f"(0 .. {network_dim - 1})"
        )
    return [tuple(a + 2 for a in subset) for n in range(len(axes) + 1) for subset in itertools.combinations(axes, n)]


def _network_device(network: nn.Module) -> torch.device:
    parameter = next(itertools.chain(network.parameters(), network.buffers()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@dataclass(frozen=True)
class _Forward:
    """How a batch of tiles goes through the network: where, with which flips, in chunks of what size."""

    network: nn.Module
    num_classes: int
    flips: list[tuple[int, ...]]
    tile_batch_size: int
    device: torch.device
    use_amp: bool  # autocast: fp16 on CUDA, bf16 on a CPU

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        # Only the forward pass runs in inference mode: its outputs are consumed right here, while the
        # accumulators and the result stay ordinary tensors that a caller may still modify in place.
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=self.use_amp):
            output = self.network(batch)
            if isinstance(output, (list, tuple)):  # deep supervision: the full-resolution output comes first
                output = output[0]
            output = output.float()
        expected = (batch.shape[0], self.num_classes, *batch.shape[2:])
        if tuple(output.shape) != expected:
            raise ValueError(
                f"the network returned shape {tuple(output.shape)} for input {tuple(batch.shape)}; "
                f"expected logits of shape {expected} (num_classes={self.num_classes})"
            )
        return output

    def predict_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        """Logits (T, K, *patch) of ``tiles`` (T, C, *patch), averaged over the flips (each flipped back).

        All flipped copies are stacked and fed in chunks of ``tile_batch_size``; a chunk may span two flips.
        """
        count = tiles.shape[0]
        inputs = torch.cat([tiles.flip(dims) if dims else tiles for dims in self.flips])
        summed = torch.zeros((count, self.num_classes, *tiles.shape[2:]), device=tiles.device, dtype=torch.float32)
        for first in range(0, inputs.shape[0], self.tile_batch_size):
            last = min(first + self.tile_batch_size, inputs.shape[0])
            output = self(inputs[first:last])
            for flip_index in range(first // count, (last - 1) // count + 1):
                lo, hi = max(first, flip_index * count), min(last, (flip_index + 1) * count)
                part = output[lo - first : hi - first]
                dims = self.flips[flip_index]
                summed[lo - flip_index * count : hi - flip_index * count] += part.flip(dims) if dims else part
        return summed / len(self.flips)


def _batches(items: list[tuple[slice, ...]], size: int) -> Iterator[list[tuple[slice, ...]]]:
    for first in range(0, len(items), size):
        yield items[first : first + size]


def sliding_window_predict(
    network: nn.Module,
    image: torch.Tensor | np.ndarray,
    patch_size: Sequence[int],
    num_classes: int,
    mirror_axes: Sequence[int] | None = None,
    step_size: float = DEFAULT_STEP_SIZE,
    use_gaussian: bool = True,
    tile_batch_size: int = DEFAULT_TILE_BATCH_SIZE,
    device: torch.device | str | None = None,
    accumulate_dtype: torch.dtype | None = None,
    progress: bool = False,
    use_amp: bool = True,
    cpu_bf16: bool = False,
) -> torch.Tensor:
    """Logits (num_classes, *spatial) as float32 for ``image`` (C, *spatial), predicted tile by tile.

    - ``patch_size`` has the network's dimension. A 2D patch on a (C, z, y, x) image predicts every z
      slice as a 2D image and returns (K, z, y, x).
    - ``mirror_axes``: spatial axes of the network's input (0 = first spatial axis; for 2D 0, 1 = y, x).
      Every subset of them is one more pass (2**n in all, the identity included), flipped back and averaged.
    - ``tile_batch_size``: network inputs per forward pass, mirrored copies included.
    - The network runs where its parameters are, in eval mode (its mode is restored afterwards) under
      ``torch.inference_mode``, with autocast on CUDA when ``use_amp`` (and bf16 autocast on a CPU when
      ``cpu_bf16``: see ``autoseg.inference.precision``). Tiles move there one batch at a
      time, so ``image`` may stay on the CPU. The result is an ordinary tensor (not an inference tensor).
    - ``device``: where the logits are accumulated and returned (default: the network's device);
      ``accumulate_dtype``: float32 by default; ``torch.float16`` halves the accumulator on a GPU (the
      result is float32 either way).
    - An image smaller than the patch is padded with zeros (evenly on both sides) and the result cropped.
    """
    if tile_batch_size < 1:
        raise ValueError(f"tile_batch_size must be at least 1, got {tile_batch_size}")
    if isinstance(image, np.ndarray):
        array = np.asarray(image, dtype=np.float32)
        image = torch.from_numpy(array if array.flags.writeable else array.copy())
    layout = _layout(image, patch_size)
    compute_device = _network_device(network)
    forward = _Forward(
        network=network,
        num_classes=num_classes,
        flips=_mirror_flips(mirror_axes, len(layout.patch_size)),
        tile_batch_size=tile_batch_size,
        device=compute_device,
        use_amp=(use_amp and compute_device.type == "cuda") or (cpu_bf16 and compute_device.type == "cpu"),
    )
    target_device = torch.device(device) if device is not None else compute_device
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            padded, crop = _pad_to_patch(image, layout.tile_shape)
            mean = _accumulate(
                forward, padded, layout, step_size, use_gaussian, target_device,
                accumulate_dtype or torch.float32, progress,
            )  # fmt: skip
            return mean[(slice(None), *crop)].float().contiguous()
    finally:
        network.train(was_training)


def _accumulate(
    forward: _Forward,
    image: torch.Tensor,
    layout: _Layout,
    step_size: float,
    use_gaussian: bool,
    target_device: torch.device,
    dtype: torch.dtype,
    progress: bool,
) -> torch.Tensor:
    """The weighted mean of the tiles' logits (K, *spatial) in ``dtype`` on ``target_device``.

    nnU-Net sums weight * logits and the weights, and divides at the end. Here the accumulator holds the
    running weighted mean instead (mean += w / W * (logits - mean), W the weights so far, in float32):
    the same average, but the accumulator stays at the scale of the logits. That matters in half
    precision, where a 3D Gaussian's corner weights (4e-10 of its peak) times the logits flush to zero and
    a voxel seen only by tile corners would come out as 0 / W = 0.
    """
    spatial = tuple(image.shape[1:])
    tiles = layout.tiles(spatial, step_size)
    if use_gaussian:
        weights = gaussian_importance_map(layout.patch_size, device=target_device, dtype=torch.float32)
    else:
        weights = torch.ones(layout.patch_size, device=target_device, dtype=torch.float32)
    weights = weights.reshape(layout.tile_shape)
    mean = torch.zeros((forward.num_classes, *spatial), device=target_device, dtype=dtype)
    weight_sum = torch.zeros(spatial, device=target_device, dtype=torch.float32)  # no class axis: cheap
    # Tiles of one forward pass: whole groups of mirrored copies where the batch allows it.
    tiles_per_batch = max(1, forward.tile_batch_size // len(forward.flips))
    batches = _batches(tiles, tiles_per_batch)
    if progress:
        from tqdm import tqdm

        batches = iter(tqdm(batches, total=ceil(len(tiles) / tiles_per_batch), desc="sliding window", unit="batch"))
    for batch in batches:
        stacked = torch.stack([image[(slice(None), *tile)] for tile in batch])
        network_input = stacked.reshape(len(batch), image.shape[0], *layout.patch_size)
        predicted = forward.predict_tiles(network_input.to(forward.device, torch.float32))
        predicted = predicted.to(target_device).reshape(len(batch), forward.num_classes, *layout.tile_shape)
        for tile, tile_logits in zip(batch, predicted):
            weight_sum[tile] += weights
            region = mean[(slice(None), *tile)]  # a view: updating it updates ``mean``
            region += ((tile_logits - region.float()) * (weights / weight_sum[tile])).to(dtype)
    return mean
