"""The plan: everything that preprocessing, training and inference need to know, as plain data.

All spacings and shapes are in the *transposed* array order (the plan's ``transpose_forward`` applied
to the (z, y, x) order of the images), so that the coarsest axis comes first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from math import prod

from autoseg.fingerprint import IntensityStats


@dataclass(frozen=True)
class NetworkPlan:
    """A U-Net topology. ``architecture`` is a name in the network registry."""

    architecture: str
    features_per_stage: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    n_conv_per_stage: tuple[int, ...]
    n_conv_per_stage_decoder: tuple[int, ...]

    def __post_init__(self) -> None:
        n = len(self.features_per_stage)
        if not (len(self.kernel_sizes) == len(self.strides) == len(self.n_conv_per_stage) == n):
            raise ValueError("features_per_stage, kernel_sizes, strides and n_conv_per_stage differ in length")
        if len(self.n_conv_per_stage_decoder) != n - 1:
            raise ValueError("n_conv_per_stage_decoder must have one entry fewer than the stages")

    @property
    def num_stages(self) -> int:
        return len(self.features_per_stage)

    @property
    def shape_must_be_divisible_by(self) -> tuple[int, ...]:
        """The product of the strides per axis: every patch edge must be a multiple of it."""
        return tuple(prod(s[d] for s in self.strides) for d in range(len(self.strides[0])))


@dataclass(frozen=True)
class ResamplingPlan:
    """How images and labels are resampled to and from the configuration's spacing."""

    image_order: int = 3  # third-order splines, as nnU-Net
    label_order: int = 1  # linear interpolation of each label's one-hot mask
    out_of_plane_order: int = 0  # nearest neighbour along the thick-slice axis
    # An axis is treated separately when the spacing ratio exceeds this (nnU-Net's ANISO_THRESHOLD).
    anisotropy_threshold: float = 3.0


@dataclass(frozen=True)
class Configuration:
    """One trainable configuration (``2d``, ``3d_fullres``, ``3d_lowres``)."""

    name: str
    data_identifier: str  # folder name under the dataset's preprocessed folder
    spacing_mm: tuple[float, ...]  # 2 entries for 2D: the in-plane spacing
    median_shape: tuple[int, ...]  # median case shape at spacing_mm
    patch_size: tuple[int, ...]
    batch_size: int
    batch_dice: bool
    normalization: tuple[str, ...]  # normalizer registry name per input channel
    use_mask_for_norm: tuple[bool, ...]
    network: NetworkPlan
    resampling: ResamplingPlan = field(default_factory=ResamplingPlan)

    @property
    def dim(self) -> int:
        return len(self.patch_size)


@dataclass(frozen=True)
class Plan:
    SCHEMA_VERSION = 1

    schema_version: int
    dataset_name: str
    planner: str
    gpu_memory_gb: float
    transpose_forward: tuple[int, ...]
    transpose_backward: tuple[int, ...]
    original_median_spacing_mm: tuple[float, ...]  # untransposed (z, y, x)
    original_median_shape: tuple[int, ...]  # after cropping, untransposed
    channel_names: tuple[str, ...]
    labels: dict[str, int]
    foreground_intensity_per_channel: tuple[IntensityStats, ...]
    configurations: dict[str, Configuration]

    @property
    def foreground_labels(self) -> list[int]:
        """The label values other than background (0), sorted."""
        return sorted(v for v in self.labels.values() if v != 0)

    def configuration(self, name: str) -> Configuration:
        from autoseg.errors import AutosegError

        if name not in self.configurations:
            raise AutosegError(
                f"plan {self.planner!r} of dataset {self.dataset_name} has no configuration {name!r};"
                f" it has: {', '.join(self.configurations)}"
            )
        return self.configurations[name]

    def renamed(self, name: str) -> Plan:
        """This plan saved under another name: ``planner`` and every configuration's data folder follow it."""
        check_plan_name(name)
        configurations = {key: replace(c, data_identifier=f"{name}_{key}") for key, c in self.configurations.items()}
        return replace(self, planner=name, configurations=configurations)


def check_plan_name(name: str) -> None:
    """A plan's name becomes part of file and folder names (``plans/<name>.json``, ``<trainer>__<name>__<config>``)."""
    from autoseg.errors import AutosegError

    if "__" in name or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise AutosegError(
            f"plan name {name!r}: use letters, digits, '_', '.', '-' and no '__' (it names folders"
            " <trainer>__<plan>__<configuration>). Fix: --plan-name"
        )


def default_plan_name(planner: str, architecture: str | None, planner_architecture: str) -> str:
    """The planner's name, or ``<planner>_<network>`` when ``--network`` replaced the planner's own network, so
    that the two plans (and the models trained from them) never share a file or folder."""
    return planner if architecture in (None, planner_architecture) else f"{planner}_{architecture}"
