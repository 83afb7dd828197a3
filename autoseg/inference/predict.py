"""Predicting a preprocessed case with a trained network: the configuration decides patch and dimension."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from autoseg.inference.sliding_window import DEFAULT_TILE_BATCH_SIZE, sliding_window_predict
from autoseg.plan import Configuration


def predict_preprocessed_case(
    network: nn.Module,
    image: np.ndarray | torch.Tensor,
    configuration: Configuration,
    mirror_axes: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    step_size: float = 0.5,
    use_mirroring: bool = True,
    *,
    num_classes: int,
    tile_batch_size: int | None = None,
    use_amp: bool = True,
    accumulate_dtype: torch.dtype | None = None,
    progress: bool = False,
    cpu_bf16: bool = False,
) -> torch.Tensor:
    """Logits (num_classes, *shape) of a preprocessed image (C, *shape), float32 on ``device``.

    ``sliding_window_predict`` with the configuration's patch size (a 2D configuration predicts slice by
    slice). ``mirror_axes`` are the network's spatial axes used for mirroring (the trainer's choice);
    ``use_mirroring=False`` switches mirroring off. ``device`` is where the logits are accumulated (in
    ``accumulate_dtype``); the network runs where its parameters are, with autocast on CUDA when ``use_amp``
    and in bf16 on a CPU when ``cpu_bf16``.
    """
    return sliding_window_predict(
        network,
        image,
        configuration.patch_size,
        num_classes,
        mirror_axes=mirror_axes if use_mirroring else None,
        step_size=step_size,
        tile_batch_size=tile_batch_size or DEFAULT_TILE_BATCH_SIZE,
        device=device,
        accumulate_dtype=accumulate_dtype,
        progress=progress,
        use_amp=use_amp,
        cpu_bf16=cpu_bf16,
    )
