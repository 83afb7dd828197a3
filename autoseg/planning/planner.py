"""The planner: a fingerprint in, a plan out, with no I/O, built from small hooks a variant overrides.

The base class follows nnU-Net v2's default ExperimentPlanner (v2.8.1) rule for rule, so that the same
fingerprint gives the same patch sizes, batch sizes and topologies. A variant registers itself with
``@register_planner("name")`` and overrides class attributes or one hook.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from autoseg.errors import AutosegError
from autoseg.fingerprint import Fingerprint
from autoseg.plan import Configuration, NetworkPlan, Plan, ResamplingPlan
from autoseg.planning import topology
from autoseg.planning.topology import Topology
from autoseg.preprocessing.resample import compute_new_shape
from autoseg.registry import Registry


class Planner:
    """nnU-Net v2's default plan: 2d, 3d_fullres and (for large images) 3d_lowres plain U-Nets."""

    # Name in the network registry; an instance may override it (``--network``), so no ClassVar.
    architecture: str = "plain_unet"
    # Widths: nnU-Net's UNet_base_num_features and UNet_max_features_2d/_3d.
    base_features: ClassVar[int] = 32
    max_features_3d: ClassVar[int] = 320
    max_features_2d: ClassVar[int] = 512
    # The bottleneck's feature maps keep at least this edge (nnU-Net's UNet_featuremap_min_edge_length).
    min_feature_map_edge: ClassVar[int] = 4
    n_conv_per_stage_encoder: ClassVar[int] = 2  # nnU-Net's UNet_blocks_per_stage_encoder
    n_conv_per_stage_decoder: ClassVar[int] = 2  # nnU-Net's UNet_blocks_per_stage_decoder
    # Memory budget, in conv output elements at batch 1 (see autoseg.networks.feature_map_elements): nnU-Net
    # set these so that v2 reproduces v1's configurations, which fit 8 GB at these batch sizes.
    reference_elements_3d: ClassVar[float] = 560e6
    reference_elements_2d: ClassVar[float] = 85e6
    reference_batch_size_3d: ClassVar[int] = 2
    reference_batch_size_2d: ClassVar[int] = 12
    reference_gpu_memory_gb: ClassVar[float] = 8.0
    # The GPU size planned for when none is given (nnU-Net: 8 GB; its ResEnc L and XL presets: 24, 40).
    default_gpu_memory_gb: ClassVar[float] = 8.0
    min_batch_size: ClassVar[int] = 2  # nnU-Net: instance norm and batch dice need more than one sample
    # One batch may show at most 5% of the dataset's voxels: nnU-Net's guard against overfitting.
    max_dataset_coverage: ClassVar[float] = 0.05
    anisotropy_threshold: ClassVar[float] = 3.0  # nnU-Net's ANISO_THRESHOLD
    # A 3d_lowres configuration is made when the fullres patch sees less than this share of the median
    # image; its spacing grows by this factor per step (nnU-Net 2.8.1: 1.03, once 1.01).
    lowres_threshold: ClassVar[float] = 0.25
    lowres_spacing_factor: ClassVar[float] = 1.03
    # ... and it is dropped unless it has at most 1/this of the fullres median voxels (nnU-Net 2.8.1).
    lowres_min_voxel_ratio: ClassVar[float] = 2.0
    # Patch search starts from this volume, certainly too large for the budget (nnU-Net's values).
    initial_patch_edge_3d: ClassVar[int] = 256
    initial_patch_edge_2d: ClassVar[int] = 2048
    # Channel name (case-insensitive) -> normalizer registry name; other names get default_normalization.
    normalization_by_channel_name: ClassVar[dict[str, str]] = {
        "ct": "ct",
        "nonorm": "none",
        "rescale_to_0_1": "rescale_to_0_1",
        "zscore": "zscore",
    }
    default_normalization: ClassVar[str] = "zscore"
    # Normalizing inside the nonzero mask only pays off when cropping removed a lot of background, and
    # only for schemes that leave the outside at zero (nnU-Net: z-score, below 3/4 relative size).
    normalizations_using_mask: ClassVar[frozenset[str]] = frozenset({"zscore"})
    mask_for_norm_max_relative_size: ClassVar[float] = 0.75

    def __init__(self, gpu_memory_gb: float | None = None, architecture: str | None = None) -> None:
        self.gpu_memory_gb = self.default_gpu_memory_gb if gpu_memory_gb is None else gpu_memory_gb
        if architecture is not None:  # this planner's rules, another network's memory estimate and topology
            from autoseg.networks import NETWORKS  # torch: only when a network is named

            NETWORKS.get(architecture)  # an unknown name fails now, with the registered names
            self.architecture = architecture

    @property
    def name(self) -> str:
        """The registry name this class is registered under: it names the plan file and data folders."""
        names = [name for name, cls in PLANNERS.items() if cls is type(self)]
        if not names:
            raise AutosegError(
                f"planner class {type(self).__name__} is not registered; decorate it with"
                " @register_planner('your_name') so that its plan and data folders can be named"
            )
        return names[0]

    def plan(self, fingerprint: Fingerprint) -> Plan:
        if not fingerprint.cases:
            raise AutosegError(f"dataset {fingerprint.dataset_name}: the fingerprint has no cases to plan from")
        target = self.target_spacing(fingerprint)
        forward, backward = self.transpose(target)
        new_shapes = [compute_new_shape(c.shape_after_crop, c.spacing_mm, target) for c in fingerprint.cases]
        median = np.median(np.array(new_shapes), axis=0)  # may end in .5: kept, as nnU-Net keeps it
        spacing = tuple(target[d] for d in forward)
        median_shape = tuple(float(median[d]) for d in forward)
        n_voxels_dataset = float(np.prod(median_shape, dtype=np.float64) * len(fingerprint.cases))
        three_d: dict[str, Configuration] = {}
        if median_shape[0] != 1:  # a stack of 2D images has no third dimension to plan for
            fullres = self.configuration_for("3d_fullres", spacing, median_shape, n_voxels_dataset, fingerprint)
            lowres = self.lowres_configuration(fullres, spacing, median_shape, fingerprint)
            if lowres is not None:
                three_d["3d_lowres"] = lowres
            # Batch dice for fullres only when a cascade exists: nnU-Net 2.8.1's choice.
            three_d["3d_fullres"] = dataclasses.replace(fullres, batch_dice=lowres is not None)
        two_d = self.configuration_for("2d", spacing[1:], median_shape[1:], n_voxels_dataset, fingerprint)
        return Plan(
            schema_version=Plan.SCHEMA_VERSION,
            dataset_name=fingerprint.dataset_name,
            planner=self.name,
            gpu_memory_gb=self.gpu_memory_gb,
            transpose_forward=forward,
            transpose_backward=backward,
            original_median_spacing_mm=tuple(float(s) for s in np.median(fingerprint.spacings, axis=0)),
            original_median_shape=tuple(round(s) for s in np.median(fingerprint.shapes_after_crop, axis=0)),
            channel_names=fingerprint.channel_names,
            labels=dict(fingerprint.labels),
            foreground_intensity_per_channel=fingerprint.foreground_intensity_per_channel,
            configurations={"2d": dataclasses.replace(two_d, batch_dice=True), **three_d},
        )

    # --- spacing and orientation -------------------------------------------------------------------

    def target_spacing(self, fingerprint: Fingerprint) -> tuple[float, ...]:
        """The 3d_fullres spacing, in the images' (z, y, x) order."""
        return topology.target_spacing(fingerprint.spacings, fingerprint.shapes_after_crop, self.anisotropy_threshold)

    def transpose(self, spacing: tuple[float, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Put the coarsest axis first, so the 2D configuration slices across it."""
        return topology.coarsest_axis_first(spacing)

    # --- one configuration -------------------------------------------------------------------------

    def configuration_for(
        self,
        name: str,
        spacing: Sequence[float],
        median_shape: Sequence[float],
        n_voxels_dataset: float,
        fingerprint: Fingerprint,
    ) -> Configuration:
        """The largest patch whose network fits the memory budget, and the batch size that fills it."""
        dim = len(spacing)
        n_in, n_classes = len(fingerprint.channel_names), len(fingerprint.labels)
        try:
            topo, network, estimate = self.fit_patch(spacing, median_shape, n_in, n_classes)
        except AutosegError as exc:  # a network that cannot run on the patches this planner's topology gives
            raise AutosegError(
                f"configuration {name!r} of planner {self.name!r} with network {self.architecture!r}: {exc}."
                " Fix: plan with another --network (or none: the planner's own), or another --planner"
            ) from exc
        normalization = tuple(self.normalization_for_channel(c) for c in fingerprint.channel_names)
        return Configuration(
            name=name,
            data_identifier=f"{self.name}_{name}",
            spacing_mm=tuple(float(s) for s in spacing),
            median_shape=tuple(round(s) for s in median_shape),
            patch_size=topo.patch_size,
            batch_size=self.batch_size(estimate, topo.patch_size, n_voxels_dataset, dim),
            batch_dice=False,
            normalization=normalization,
            use_mask_for_norm=tuple(self.use_mask_for_norm(n, fingerprint) for n in normalization),
            network=network,
            resampling=ResamplingPlan(anisotropy_threshold=self.anisotropy_threshold),
        )

    def initial_patch_size(self, spacing: Sequence[float], median_shape: Sequence[float]) -> list[float]:
        """A patch shaped like 1/spacing (isotropic in mm) of a fixed volume, clipped to the median image."""
        edge = self.initial_patch_edge_3d if len(spacing) == 3 else self.initial_patch_edge_2d
        inverse = 1 / np.array(spacing, dtype=np.float64)
        scaled = inverse * (edge ** len(spacing) / np.prod(inverse)) ** (1 / len(spacing))
        return [min(round(p), m) for p, m in zip(scaled, median_shape)]

    def network_topology(self, spacing: Sequence[float], patch_size: Sequence[float]) -> Topology:
        return topology.pool_and_kernel_topology(spacing, patch_size, self.min_feature_map_edge)

    def fit_patch(
        self, spacing: Sequence[float], median_shape: Sequence[float], n_in: int, n_classes: int
    ) -> tuple[Topology, NetworkPlan, int]:
        """Shrink the patch until the estimate fits; returns the topology, network and estimate."""
        dim = len(spacing)
        topo = self.network_topology(spacing, self.initial_patch_size(spacing, median_shape))
        network = self.network_for(topo, dim)
        estimate = self.estimate_memory(network, topo.patch_size, n_in, n_classes)
        while not self.fits_memory(estimate, dim):
            ratios = [p / m for p, m in zip(topo.patch_size, median_shape)]
            axis = max(range(dim), key=lambda d: (ratios[d], d))  # largest relative to the image; last of ties
            # Step down by the divisor the smaller patch will have, not the current one, so that no valid
            # edge is skipped (in a 256^3 patch 256 pools six times, 192 five: the step is 32, not 64).
            trial = list(topo.patch_size)
            trial[axis] -= topo.shape_must_be_divisible_by[axis]
            step = self.network_topology(spacing, trial).shape_must_be_divisible_by[axis]
            smaller = list(topo.patch_size)
            smaller[axis] -= step
            topo = self.network_topology(spacing, smaller)
            network = self.network_for(topo, dim)
            estimate = self.estimate_memory(network, topo.patch_size, n_in, n_classes)
        return topo, network, estimate

    def features_per_stage(self, num_stages: int, dim: int) -> tuple[int, ...]:
        """Double the width at every stage, up to the cap."""
        cap = self.max_features_3d if dim == 3 else self.max_features_2d
        return tuple(min(cap, self.base_features * 2**i) for i in range(num_stages))

    def network_for(self, topo: Topology, dim: int) -> NetworkPlan:
        n = topo.num_stages
        return NetworkPlan(
            architecture=self.architecture,
            features_per_stage=self.features_per_stage(n, dim),
            kernel_sizes=topo.kernel_sizes,
            strides=topo.strides,
            n_conv_per_stage=(self.n_conv_per_stage_encoder,) * n,
            n_conv_per_stage_decoder=(self.n_conv_per_stage_decoder,) * (n - 1),
        )

    def estimate_memory(self, network: NetworkPlan, patch_size: Sequence[int], n_in: int, n_classes: int) -> int:
        """Conv output elements of the network ``build_network`` makes from this plan, at batch 1."""
        # Imported here: it brings in torch, which commands that only list or read plans do not need.
        from autoseg.networks import feature_map_elements

        return feature_map_elements(network, patch_size, n_in, n_classes)

    def fits_memory(self, estimate: int, dim: int) -> bool:
        """Whether a network of this estimate leaves room for min_batch_size samples on the GPU."""
        reference, reference_batch = self.memory_reference(dim)
        # The reference was measured at reference_batch; the plan needs room for min_batch_size.
        return estimate / reference_batch * self.min_batch_size <= reference

    def memory_reference(self, dim: int) -> tuple[float, int]:
        """(elements that fit this GPU at the reference batch size, that batch size)."""
        scale = self.gpu_memory_gb / self.reference_gpu_memory_gb
        if dim == 3:
            return self.reference_elements_3d * scale, self.reference_batch_size_3d
        return self.reference_elements_2d * scale, self.reference_batch_size_2d

    def batch_size(self, estimate: int, patch_size: Sequence[int], n_voxels_dataset: float, dim: int) -> int:
        """Fill the memory budget, but show no more than max_dataset_coverage of the data per batch."""
        reference, reference_batch = self.memory_reference(dim)
        by_memory = round(reference / estimate * reference_batch)
        by_coverage = round(n_voxels_dataset * self.max_dataset_coverage / np.prod(patch_size, dtype=np.float64))
        return int(max(min(by_memory, by_coverage), self.min_batch_size))

    # --- 3d_lowres ---------------------------------------------------------------------------------

    def lowres_configuration(
        self,
        fullres: Configuration,
        spacing: Sequence[float],
        median_shape: Sequence[float],
        fingerprint: Fingerprint,
    ) -> Configuration | None:
        """A coarser 3D configuration whose patch sees at least lowres_threshold of the median image."""
        fullres_spacing = np.array(spacing, dtype=np.float64)
        shape = np.array(median_shape, dtype=np.float64)
        fullres_voxels = float(np.prod(shape, dtype=np.float64))
        median_voxels = fullres_voxels
        patch_voxels = float(np.prod(fullres.patch_size, dtype=np.float64))
        lowres_spacing = fullres_spacing.copy()
        lowres: Configuration | None = None
        while patch_voxels / median_voxels < self.lowres_threshold:
            lowres_spacing = self.coarser_lowres_spacing(lowres_spacing)
            lowres_shape = fullres_spacing / lowres_spacing * shape
            median_voxels = float(np.prod(lowres_shape, dtype=np.float64))
            lowres = self.configuration_for(
                "3d_lowres",
                tuple(float(s) for s in lowres_spacing),
                [round(s) for s in lowres_shape],
                median_voxels * len(fingerprint.cases),
                fingerprint,
            )
            patch_voxels = float(np.prod(lowres.patch_size, dtype=np.float64))
        if fullres_voxels / median_voxels < self.lowres_min_voxel_ratio:
            return None  # too close to fullres to be worth a second network
        return lowres

    def coarser_lowres_spacing(self, spacing: np.ndarray) -> np.ndarray:
        """One step coarser: only the fine axes while some axis is over 2x coarser, else all axes."""
        spacing = spacing.copy()
        fine = spacing.max() / spacing > 2
        if fine.any():
            spacing[fine] *= self.lowres_spacing_factor
        else:
            spacing *= self.lowres_spacing_factor
        return spacing

    # --- normalization -----------------------------------------------------------------------------

    def normalization_for_channel(self, channel_name: str) -> str:
        return self.normalization_by_channel_name.get(channel_name.casefold(), self.default_normalization)

    def use_mask_for_norm(self, normalization: str, fingerprint: Fingerprint) -> bool:
        return (
            normalization in self.normalizations_using_mask
            and fingerprint.median_relative_size_after_crop < self.mask_for_norm_max_relative_size
        )


PLANNERS: Registry[type[Planner]] = Registry("planner")
register_planner = PLANNERS.register


def plan_dataset(
    fingerprint: Fingerprint,
    planner: str = "default",
    gpu_memory_gb: float | None = None,
    architecture: str | None = None,
) -> Plan:
    """Plan with the planner registered as ``planner``; ``architecture`` replaces the planner's network."""
    return PLANNERS.get(planner)(gpu_memory_gb, architecture).plan(fingerprint)
