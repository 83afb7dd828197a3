"""nnU-Net v2's residual encoder presets ResEnc M, L and XL (nnUNetPlannerResEncM/L/XL, nnU-Net 2.8.1).

Isensee et al., "nnU-Net Revisited: A Call for Rigorous Validation in 3D Medical Image Segmentation"
(MICCAI 2024): the default planner's rules with a ``resenc_unet`` (1, 3, 4, 6, 6, 6, ... residual blocks
per encoder stage, one conv per decoder stage) and a memory budget per preset. Each preset's reference
(conv output elements that fit, at batch 2 in 3D and 12 in 2D) was tuned by nnU-Net for its own GPU
size, 8, 24 or 40 GB; ``--gpu-memory-gb`` scales it linearly from there, as nnU-Net does. Two rules
differ from the default planner, as in nnU-Net: the patch shrinks until the network fits the reference
batch size (not just two samples), and a batch may cover the whole dataset (no 5% cap).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

from autoseg.plan import NetworkPlan
from autoseg.planning.planner import Planner, register_planner
from autoseg.planning.topology import Topology


class ResEncPlanner(Planner):
    """The rules the three presets share (nnU-Net's ResEncUNetPlanner); registered only through them."""

    architecture: ClassVar[str] = "resenc_unet"
    # nnU-Net's UNet_blocks_per_stage_encoder; stages past the end keep the last count.
    blocks_per_stage_encoder: ClassVar[tuple[int, ...]] = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)
    n_conv_per_stage_decoder: ClassVar[int] = 1  # nnU-Net's UNet_blocks_per_stage_decoder
    # nnU-Net's ResEnc presets set max_dataset_covered = 1: a batch may hold the whole dataset.
    max_dataset_coverage: ClassVar[float] = 1.0

    def network_for(self, topo: Topology, dim: int) -> NetworkPlan:
        network = super().network_for(topo, dim)
        counts = self.blocks_per_stage_encoder
        blocks = tuple(counts[min(i, len(counts) - 1)] for i in range(topo.num_stages))
        return dataclasses.replace(network, n_conv_per_stage=blocks)

    def estimate_memory(self, network: NetworkPlan, patch_size: Sequence[int], n_in: int, n_classes: int) -> int:
        """The conv outputs, plus the average-pooled skips that nnU-Net's count includes (see resenc.py)."""
        from autoseg.networks.resenc import pooled_skip_elements

        estimate = super().estimate_memory(network, patch_size, n_in, n_classes)
        if network.architecture == ResEncPlanner.architecture:  # not for a network named by --network
            estimate += pooled_skip_elements(network, patch_size)
        return estimate

    def fits_memory(self, estimate: int, dim: int) -> bool:
        """nnU-Net's ResEnc planners shrink the patch until the reference batch size fits."""
        reference, _ = self.memory_reference(dim)
        return estimate <= reference


@register_planner("resenc_m")
class ResEncMPlanner(ResEncPlanner):
    """nnU-Net's ResEnc M preset: a residual encoder U-Net for a 9-11 GB GPU (RTX 2080 Ti, older Titans)."""

    # nnUNetPlannerResEncM: about the default planner's memory use at 8 GB.
    reference_elements_3d: ClassVar[float] = 680e6
    reference_elements_2d: ClassVar[float] = 135e6
    reference_gpu_memory_gb: ClassVar[float] = 8.0
    default_gpu_memory_gb: ClassVar[float] = 8.0


@register_planner("resenc_l")
class ResEncLPlanner(ResEncPlanner):
    """nnU-Net's ResEnc L preset: a residual encoder U-Net for a 24 GB GPU (RTX 4090, Titan RTX, Quadro 6000)."""

    # nnUNetPlannerResEncL (its comments: once 1.84e9 and 352666667).
    reference_elements_3d: ClassVar[float] = 2.1e9
    reference_elements_2d: ClassVar[float] = 380e6
    reference_gpu_memory_gb: ClassVar[float] = 24.0
    default_gpu_memory_gb: ClassVar[float] = 24.0


@register_planner("resenc_xl")
class ResEncXLPlanner(ResEncPlanner):
    """nnU-Net's ResEnc XL preset: a residual encoder U-Net for a 40 GB GPU (A100 40 GB, RTX 6000 Ada)."""

    # nnUNetPlannerResEncXL.
    reference_elements_3d: ClassVar[float] = 3.6e9
    reference_elements_2d: ClassVar[float] = 560e6
    reference_gpu_memory_gb: ClassVar[float] = 40.0
    default_gpu_memory_gb: ClassVar[float] = 40.0
