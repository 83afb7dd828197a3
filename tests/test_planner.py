"""The planner reproduces nnU-Net v2's plans; its hooks can be overridden by a registered variant."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from autoseg import serialization
from autoseg.errors import AutosegError
from autoseg.fingerprint import CaseFingerprint, Fingerprint, IntensityStats
from autoseg.networks import feature_map_elements
from autoseg.plan import Plan
from autoseg.planning import topology
from autoseg.planning.planner import PLANNERS, Planner, plan_dataset, register_planner

LABELS = {"background": 0, "left": 1, "right": 2}


@register_planner("test_planner_base")
class BasePlanner(Planner):
    """The base rules under a name of their own, so these tests do not depend on the installed plug-ins."""


@register_planner("test_planner_fixed_spacing")
class FixedSpacingPlanner(Planner):
    """A plug-in that overrides one hook."""

    def target_spacing(self, fingerprint: Fingerprint) -> tuple[float, ...]:
        return (2.0, 2.0, 2.0)


def make_case(i: int, spacing: tuple[float, ...], shape: tuple[int, ...], relative: float) -> CaseFingerprint:
    return CaseFingerprint(
        case_id=f"case_{i:03d}",
        spacing_mm=spacing,
        shape_before_crop=shape,
        shape_after_crop=shape,
        bbox=tuple((0, s) for s in shape),
        relative_size_after_crop=relative,
        class_voxel_counts={"background": math.prod(shape)},
        class_component_counts={"background": 1},
    )


def make_fingerprint(
    spacings: list[tuple[float, ...]],
    shapes: list[tuple[int, ...]],
    channel_names: tuple[str, ...] = ("T1",),
    labels: dict[str, int] = LABELS,
    relative_size: float = 1.0,
) -> Fingerprint:
    stats = IntensityStats(mean=1.0, median=1.0, std=0.5, min=0.0, max=3.0, percentile_00_5=0.1, percentile_99_5=2.9)
    cases = tuple(make_case(i, sp, sh, relative_size) for i, (sp, sh) in enumerate(zip(spacings, shapes)))
    return Fingerprint(
        schema_version=Fingerprint.SCHEMA_VERSION,
        dataset_name="Dataset001_Test",
        seed=0,
        foreground_samples_total=1000,
        channel_names=channel_names,
        labels=dict(labels),
        cases=cases,
        foreground_intensity_per_channel=(stats,) * len(channel_names),
    )


def uniform_fingerprint(spacing: tuple[float, ...], shape: tuple[int, ...], n: int = 10, **kw: Any) -> Fingerprint:
    return make_fingerprint([spacing] * n, [shape] * n, **kw)


# nnU-Net v2.8.1's own 3d_fullres results (8 GB, one input channel).
NNUNET_3D = [
    # spacing, median shape, cases, patch, batch, stages, strides[1], kernel_sizes[0]
    ((0.6, 0.347, 0.347), (512, 512, 706), 1000, (128, 112, 160), 2, 6, None, None),
    ((3.69, 1.88, 1.88), (103, 296, 296), 1000, (64, 192, 192), 2, 6, (2, 2, 2), None),
    ((1.37, 1.25, 1.25), (115, 320, 232), 1000, (80, 192, 160), 2, 6, None, None),
    ((1.0, 1.0, 1.0), (36, 50, 35), 260, (40, 56, 40), 9, 4, None, None),
    ((3.0, 0.78, 0.78), (100, 512, 512), 1000, (40, 224, 224), 2, None, (1, 2, 2), (1, 3, 3)),
    ((1.0, 1.0, 1.0), (400, 400, 400), 1000, (128, 128, 128), 2, 6, None, None),
    # the 1 mm brain MRI of TARGETS.md
    ((1.0, 1.0, 1.0), (182, 202, 158), 30, (128, 160, 112), 2, 6, None, None),
]


@pytest.mark.parametrize(("spacing", "shape", "cases", "patch", "batch", "stages", "stride1", "kernel0"), NNUNET_3D)
def test_3d_configuration_matches_nnunet(
    spacing: tuple[float, ...],
    shape: tuple[int, ...],
    cases: int,
    patch: tuple[int, ...],
    batch: int,
    stages: int | None,
    stride1: tuple[int, ...] | None,
    kernel0: tuple[int, ...] | None,
) -> None:
    fingerprint = uniform_fingerprint(spacing, shape)
    n_voxels = float(math.prod(shape) * cases)
    config = BasePlanner().configuration_for("3d_fullres", spacing, shape, n_voxels, fingerprint)
    assert config.patch_size == patch
    assert config.batch_size == batch
    if stages is not None:
        assert config.network.num_stages == stages
    if stride1 is not None:
        assert config.network.strides[1] == stride1
    if kernel0 is not None:
        assert config.network.kernel_sizes[0] == kernel0
    assert config.network.strides[0] == (1, 1, 1)
    assert all(p % d == 0 for p, d in zip(config.patch_size, config.network.shape_must_be_divisible_by))


@pytest.mark.parametrize("labels", [{"background": 0, "a": 1}, LABELS])
def test_number_of_classes_barely_matters(labels: dict[str, int]) -> None:
    fingerprint = uniform_fingerprint((1.0, 1.0, 1.0), (400, 400, 400), labels=labels)
    config = BasePlanner().configuration_for("3d_fullres", (1.0, 1.0, 1.0), (400, 400, 400), 64e9, fingerprint)
    assert config.patch_size == (128, 128, 128)


def test_more_gpu_memory_gives_a_larger_patch() -> None:
    fingerprint = uniform_fingerprint((1.0, 1.0, 1.0), (400, 400, 400))
    small = BasePlanner(8).configuration_for("3d_fullres", (1.0,) * 3, (400,) * 3, 64e9, fingerprint)
    large = BasePlanner(40).configuration_for("3d_fullres", (1.0,) * 3, (400,) * 3, 64e9, fingerprint)
    assert math.prod(large.patch_size) > math.prod(small.patch_size)


def test_topology_of_anisotropic_patch() -> None:
    topo = topology.pool_and_kernel_topology((3.0, 0.78, 0.78), (40, 224, 224))
    # z is pooled from the second downsampling on: 3.0 mm is then within 2x of 2 * 0.78 mm.
    assert topo.strides[:3] == ((1, 1, 1), (1, 2, 2), (2, 2, 2))
    assert topo.kernel_sizes[0] == (1, 3, 3)
    assert topo.kernel_sizes[-1] == (3, 3, 3)
    assert topo.patch_size == (40, 224, 224)
    # 100 pools four times (to 7), 37 three (to 5): padded to multiples of 16 and 8.
    assert topology.pool_and_kernel_topology((1.0, 1.0), (100, 37)).patch_size == (112, 40)


def test_target_spacing_is_the_median_for_isotropic_data() -> None:
    spacings = [(1.0, 1.0, 1.0), (1.2, 0.9, 0.9), (0.8, 1.1, 1.1)]
    assert topology.target_spacing(spacings, [(100, 100, 100)] * 3) == (1.0, 1.0, 1.0)


def test_thick_slice_axis_takes_the_10th_percentile() -> None:
    spacings = [(z, 0.5, 0.5) for z in (3.0, 4.0, 5.0, 5.0, 5.0, 5.0, 6.0, 6.0, 6.0, 6.0)]
    shapes = [(30, 512, 512)] * 10
    expected_z = float(np.percentile([s[0] for s in spacings], 10))
    assert topology.target_spacing(spacings, shapes) == (expected_z, 0.5, 0.5)
    assert expected_z < 5.0  # the median would have been 5
    # Thick slices but as many voxels along z as in-plane: not anisotropic, the median stays.
    assert topology.target_spacing(spacings, [(400, 512, 512)] * 10)[0] == 5.0
    # A 10th percentile finer than the in-plane spacing is raised just above it.
    low = [(0.4, 1.0, 1.0)] * 2 + [(5.0, 1.0, 1.0)] * 8
    assert topology.target_spacing(low, shapes)[0] == pytest.approx(1.0 + 1e-5)


def test_transpose_puts_the_coarsest_axis_first() -> None:
    assert topology.coarsest_axis_first((0.8, 0.8, 4.0)) == ((2, 0, 1), (1, 2, 0))
    assert topology.coarsest_axis_first((1.0, 1.0, 1.0)) == ((0, 1, 2), (0, 1, 2))
    fingerprint = uniform_fingerprint((0.8, 0.8, 4.0), (300, 300, 40))
    plan = BasePlanner().plan(fingerprint)
    assert plan.transpose_forward == (2, 0, 1)
    assert plan.configuration("3d_fullres").spacing_mm == (4.0, 0.8, 0.8)
    assert plan.configuration("2d").spacing_mm == (0.8, 0.8)
    assert plan.configuration("2d").median_shape == (300, 300)
    assert plan.original_median_spacing_mm == (0.8, 0.8, 4.0)


def test_small_images_get_2d_and_3d_fullres_only() -> None:
    plan = BasePlanner().plan(uniform_fingerprint((1.0, 1.0, 1.0), (64, 80, 72), n=30))
    assert set(plan.configurations) == {"2d", "3d_fullres"}
    assert plan.planner == "test_planner_base"
    assert plan.configuration("3d_fullres").data_identifier == "test_planner_base_3d_fullres"
    assert plan.configuration("3d_fullres").batch_dice is False
    assert plan.configuration("2d").batch_dice is True
    assert plan.configuration("2d").network.features_per_stage[-1] <= Planner.max_features_2d


def test_large_images_get_a_lowres_configuration() -> None:
    plan = BasePlanner().plan(uniform_fingerprint((1.0, 1.0, 1.0), (512, 512, 512), n=20))
    assert set(plan.configurations) == {"2d", "3d_fullres", "3d_lowres"}
    fullres, lowres = plan.configuration("3d_fullres"), plan.configuration("3d_lowres")
    assert fullres.batch_dice is True and lowres.batch_dice is False
    assert all(lo > hi for lo, hi in zip(lowres.spacing_mm, fullres.spacing_mm))
    assert math.prod(lowres.patch_size) >= Planner.lowres_threshold * math.prod(lowres.median_shape) * 0.99
    assert math.prod(lowres.median_shape) * 2 <= math.prod(fullres.median_shape)


def test_a_2d_dataset_has_no_3d_configuration() -> None:
    plan = BasePlanner().plan(uniform_fingerprint((999.0, 0.5, 0.5), (1, 640, 480)))
    assert set(plan.configurations) == {"2d"}
    assert plan.configuration("2d").dim == 2


def test_plan_round_trips_through_json() -> None:
    plan = BasePlanner().plan(uniform_fingerprint((1.0, 1.0, 1.0), (512, 512, 512), n=20))
    assert serialization.from_jsonable(Plan, serialization.to_jsonable(plan)) == plan


@pytest.mark.parametrize(
    ("channel", "scheme"),
    [
        ("CT", "ct"),
        ("ct", "ct"),
        ("noNorm", "none"),
        ("rescale_to_0_1", "rescale_to_0_1"),
        ("zscore", "zscore"),
        ("T1", "zscore"),
        ("FLAIR", "zscore"),
    ],
)
def test_normalization_from_channel_name(channel: str, scheme: str) -> None:
    assert Planner().normalization_for_channel(channel) == scheme


def test_mask_for_norm_only_for_zscore_after_heavy_cropping() -> None:
    cropped = uniform_fingerprint((1.0,) * 3, (64,) * 3, channel_names=("T1", "CT"), relative_size=0.5)
    config = BasePlanner().plan(cropped).configuration("3d_fullres")
    assert config.normalization == ("zscore", "ct")
    assert config.use_mask_for_norm == (True, False)
    uncropped = uniform_fingerprint((1.0,) * 3, (64,) * 3, channel_names=("T1", "CT"), relative_size=0.9)
    assert BasePlanner().plan(uncropped).configuration("3d_fullres").use_mask_for_norm == (False, False)


def test_a_plugin_overriding_one_hook_changes_the_plan() -> None:
    fingerprint = uniform_fingerprint((1.0, 1.0, 1.0), (128, 128, 128))
    assert BasePlanner().plan(fingerprint).configuration("3d_fullres").median_shape == (128, 128, 128)
    plan = plan_dataset(fingerprint, "test_planner_fixed_spacing")
    assert plan.planner == "test_planner_fixed_spacing"
    assert plan.configuration("3d_fullres").spacing_mm == (2.0, 2.0, 2.0)
    assert plan.configuration("3d_fullres").median_shape == (64, 64, 64)


def test_an_unregistered_planner_says_how_to_register() -> None:
    class Unregistered(Planner):
        pass

    with pytest.raises(AutosegError, match="register_planner"):
        Unregistered().plan(uniform_fingerprint((1.0,) * 3, (64,) * 3))


def test_default_planner_is_found_through_its_plugin_module() -> None:
    import autoseg.planners.default  # noqa: F401  (fails until the package is installed: pip install -e .)

    assert PLANNERS.get("default") is Planner


def test_feature_map_elements_match_dynamic_network_architectures() -> None:
    unet = pytest.importorskip("dynamic_network_architectures.architectures.unet")
    import torch

    for spacing, patch in [((1.0, 1.0, 1.0), (128, 160, 112)), ((3.0, 0.78, 0.78), (40, 224, 224))]:
        planner = Planner()
        topo = planner.network_topology(spacing, patch)
        network = planner.network_for(topo, 3)
        for deep_supervision in (False, True):
            net = unet.PlainConvUNet(
                1, network.num_stages, network.features_per_stage, torch.nn.Conv3d, network.kernel_sizes,
                network.strides, network.n_conv_per_stage, 3, network.n_conv_per_stage_decoder,
                deep_supervision=deep_supervision,
            )  # fmt: skip
            expected = int(net.compute_conv_feature_map_size(topo.patch_size))
            assert feature_map_elements(network, topo.patch_size, 1, 3, deep_supervision) == expected


def test_topology_matches_nnunet_on_random_inputs() -> None:
    reference = pytest.importorskip("nnunetv2.experiment_planning.experiment_planners.network_topology")
    rng = np.random.default_rng(0)
    for _ in range(200):
        dim = int(rng.integers(2, 4))
        spacing = [float(s) for s in rng.choice([0.3, 0.5, 0.78, 1.0, 1.5, 2.5, 3.0, 5.0], size=dim)]
        patch = [int(p) for p in rng.integers(1, 400, size=dim)]
        pools, strides, kernels, padded, _ = reference.get_pool_and_conv_props(spacing, patch, 4, 999999)
        ours = topology.pool_and_kernel_topology(spacing, patch)
        assert (ours.pools_per_axis, ours.strides, ours.kernel_sizes) == (tuple(pools), strides, kernels)
        assert ours.patch_size == tuple(int(p) for p in padded)


def nnunet_plans(monkeypatch: pytest.MonkeyPatch, fingerprint: Fingerprint) -> dict[str, Any]:
    """Run nnU-Net's own ExperimentPlanner on our fingerprint, with its file reads and writes stubbed out."""
    ep = pytest.importorskip("nnunetv2.experiment_planning.experiment_planners.default_experiment_planner")
    dataset_json = {
        "channel_names": dict(enumerate(fingerprint.channel_names)),
        "labels": fingerprint.labels,
        "numTraining": len(fingerprint.cases),
    }
    nnunet_fingerprint = {
        "spacings": [list(s) for s in fingerprint.spacings],
        "shapes_after_crop": [list(s) for s in fingerprint.shapes_after_crop],
        "median_relative_size_after_cropping": fingerprint.median_relative_size_after_crop,
        "foreground_intensity_properties_per_channel": {},
    }
    monkeypatch.setattr(ep, "nnUNet_raw", "/nonexistent")
    monkeypatch.setattr(ep, "nnUNet_preprocessed", "/nonexistent")
    monkeypatch.setattr(ep, "maybe_convert_to_dataset_name", lambda name: name)
    monkeypatch.setattr(ep, "isfile", lambda path: path.endswith("dataset_fingerprint.json"))
    monkeypatch.setattr(ep, "load_json", lambda path: dataset_json if "dataset.json" in path else nnunet_fingerprint)
    monkeypatch.setattr(ep, "get_filenames_of_train_images_and_targets", lambda *args: {})
    monkeypatch.setattr(ep, "shutil", SimpleNamespace(copy=lambda *args: None))
    monkeypatch.setattr(ep.ExperimentPlanner, "determine_reader_writer", lambda self: SimpleNamespace(__name__="io"))
    monkeypatch.setattr(ep.ExperimentPlanner, "save_plans", lambda self, plans: None)
    return dict(ep.ExperimentPlanner("Dataset001_Test").plan_experiment())


def random_fingerprint(seed: int) -> Fingerprint:
    """Datasets of every kind: isotropic or thick-slice, small or large, few or many cases and classes."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 60))
    base_spacing = rng.choice([0.4, 0.7, 1.0, 1.5, 2.0], size=3)
    if rng.random() < 0.4:  # thick slices on a random axis
        base_spacing[rng.integers(3)] *= rng.choice([3.0, 4.5, 7.0])
    base_shape = rng.integers(24, 400, size=3)
    spacings = [tuple(float(s) for s in base_spacing * rng.uniform(0.8, 1.25, 3)) for _ in range(n)]
    shapes = [tuple(int(s) for s in base_shape * rng.uniform(0.7, 1.3, 3)) for _ in range(n)]
    labels = {"background": 0, **{f"c{k}": k for k in range(1, int(rng.integers(2, 6)))}}
    channels = ("T1", "T2")[: int(rng.integers(1, 3))]
    return make_fingerprint(spacings, shapes, channel_names=channels, labels=labels)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(8))
def test_whole_plan_matches_nnunet_on_random_datasets(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    assert_same_plan_as_nnunet(monkeypatch, random_fingerprint(seed))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("spacings", "shapes"),
    [
        (
            [(1.0, 1.0, 1.0), (1.2, 0.9, 0.9), (0.8, 1.0, 1.0)] * 4,
            [(182, 202, 158), (170, 210, 160), (190, 190, 150)] * 4,
        ),
        ([(0.7, 0.7, 5.0), (0.8, 0.8, 6.0), (0.6, 0.6, 3.0)] * 5, [(512, 512, 40), (480, 480, 30), (512, 512, 90)] * 5),
        ([(1.0, 0.8, 0.8)] * 8, [(400, 512, 512)] * 8),
    ],
)
def test_whole_plan_matches_nnunet(
    monkeypatch: pytest.MonkeyPatch, spacings: list[tuple[float, ...]], shapes: list[tuple[int, ...]]
) -> None:
    assert_same_plan_as_nnunet(monkeypatch, make_fingerprint(spacings, shapes))


def assert_same_plan_as_nnunet(monkeypatch: pytest.MonkeyPatch, fingerprint: Fingerprint) -> None:
    theirs = nnunet_plans(monkeypatch, fingerprint)
    ours = BasePlanner().plan(fingerprint)
    assert list(ours.transpose_forward) == theirs["transpose_forward"]
    assert set(ours.configurations) == set(theirs["configurations"]) - {"3d_cascade_fullres"}
    for name, config in ours.configurations.items():
        reference = theirs["configurations"][name]
        arch = reference["architecture"]["arch_kwargs"]
        assert config.patch_size == tuple(int(p) for p in reference["patch_size"]), name
        assert config.batch_size == reference["batch_size"], name
        assert config.batch_dice == reference["batch_dice"], name
        assert config.spacing_mm == pytest.approx(tuple(reference["spacing"]), abs=0), name
        assert config.network.strides == arch["strides"], name
        assert config.network.kernel_sizes == arch["kernel_sizes"], name
        assert config.network.features_per_stage == arch["features_per_stage"], name
