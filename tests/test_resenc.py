"""The residual encoder U-Net (checked against ResidualEncoderUNet) and the ResEnc M/L/XL planners."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import autoseg.planners.resenc as resenc_planners
import pytest
import torch
from conftest import write_dataset
from test_networks import expected_output_shapes
from test_planner import make_fingerprint, random_fingerprint, uniform_fingerprint
from torch import nn

from autoseg.fingerprint import Fingerprint
from autoseg.networks import build_network, feature_map_elements
from autoseg.networks.resenc import BasicBlockD, ResEncUNet, pooled_skip_elements
from autoseg.paths import Paths
from autoseg.pipeline import plan_and_preprocess, train
from autoseg.plan import NetworkPlan
from autoseg.planning.planner import Planner, plan_dataset
from autoseg.training.checkpoint import load_checkpoint
from autoseg.training.trainer import TrainOptions

PLAN_2D = NetworkPlan(
    architecture="resenc_unet",
    features_per_stage=(4, 8, 8),
    kernel_sizes=((3, 3), (3, 3), (3, 3)),
    strides=((1, 1), (2, 2), (2, 2)),
    n_conv_per_stage=(1, 3, 2),
    n_conv_per_stage_decoder=(1, 1),
)
# Anisotropic, as nnU-Net plans thick-slice data: in-plane kernels and pooling first.
PLAN_3D = NetworkPlan(
    architecture="resenc_unet",
    features_per_stage=(4, 8, 16, 16),
    kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)),
    strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)),
    n_conv_per_stage=(1, 3, 4, 2),
    n_conv_per_stage_decoder=(1, 2, 1),
)


@pytest.mark.parametrize(("plan", "patch"), [(PLAN_2D, (16, 24)), (PLAN_3D, (8, 16, 24))])
def test_output_shapes_with_and_without_deep_supervision(plan: NetworkPlan, patch: tuple[int, ...]) -> None:
    net = build_network(plan, num_input_channels=2, num_classes=3)
    assert isinstance(net, ResEncUNet)
    x = torch.randn(2, 2, *patch)
    with torch.no_grad():
        outputs = net(x)
        assert isinstance(outputs, list)
        assert [tuple(o.shape) for o in outputs] == expected_output_shapes(plan, patch, 2, 3)
        net.deep_supervision = False
        single = net(x)
        net.deep_supervision, net.num_outputs = True, 1  # a trainer that weights only the full resolution
        first_only = net(x)
    assert isinstance(single, torch.Tensor)
    assert single.shape == (2, 3, *patch)
    torch.testing.assert_close(single, outputs[0])
    assert len(first_only) == 1
    torch.testing.assert_close(first_only[0], outputs[0])


def test_blocks_per_stage_and_their_skips() -> None:
    net = build_network(PLAN_3D, 1, 2)
    assert isinstance(net, ResEncUNet)
    assert [len(stage) for stage in net.encoder] == [1, 3, 4, 2]
    assert all(isinstance(block, BasicBlockD) for stage in net.encoder for block in stage)
    assert [len(stage) for stage in net.decoder] == [1, 2, 1]  # plain conv blocks, lowest resolution first
    # Stage 0 keeps the stem's width and resolution: identity skip. Stage 1 strides and widens: avg pool by
    # the stride, then a bias-free 1x1 conv. Stage 3 strides at the same width: the pool alone.
    skips = [[type(m).__name__ for m in stage[0].skip] for stage in net.encoder]
    assert skips == [[], ["AvgPool3d", "ConvNorm"], ["AvgPool3d", "ConvNorm"], ["AvgPool3d"]]
    first = net.encoder[1][0]
    assert first.skip[0].kernel_size == first.skip[0].stride == (1, 2, 2)
    assert first.skip[1].conv.bias is None and first.conv1.conv.bias is not None
    assert first.conv1.conv.stride == (1, 2, 2) and net.encoder[1][1].conv1.conv.stride == (1, 1, 1)
    assert all(len(block.skip) == 0 for stage in net.encoder for block in stage[1:])


def test_every_block_starts_as_its_skip() -> None:
    """nnU-Net zeroes the last norm of each block, so a fresh block computes LeakyReLU(skip(x))."""
    net = build_network(PLAN_2D, 1, 2)
    block = net.encoder[1][1]  # 8 -> 8 channels, stride 1: the skip is the identity
    x = torch.randn(2, 8, 8, 12)
    with torch.no_grad():
        torch.testing.assert_close(block(x.clone()), torch.where(x > 0, x, 0.01 * x))
    assert all(not b.conv2.norm.weight.any() and not b.conv2.norm.bias.any() for stage in net.encoder for b in stage)
    assert bool((net.stem.norm.weight == 1).all())  # other norms keep torch's ones


def test_fine_tuning_sees_the_stem_and_the_encoder() -> None:
    net = build_network(PLAN_2D, 3, 2)
    assert net.stem_weight_names == ("stem.conv.weight",)
    heads = {k: v.shape for k, v in net.state_dict().items() if k.startswith(net.head_prefixes)}
    assert heads == {
        "heads.0.weight": (2, 8, 1, 1),
        "heads.0.bias": (2,),
        "heads.1.weight": (2, 4, 1, 1),
        "heads.1.bias": (2,),
    }
    assert net.state_dict()["stem.conv.weight"].shape == (4, 3, 3, 3)
    frozen = {id(p) for p in net.encoder_parameters()}
    assert {id(p) for p in net.stem.parameters()} <= frozen
    assert {id(p) for p in net.encoder.parameters()} <= frozen
    assert not frozen & {
        id(p) for p in [*net.decoder.parameters(), *net.upsample.parameters(), *net.heads.parameters()]
    }


def test_pooled_skip_elements_by_hand() -> None:
    # Stage 1 widens 4 -> 8 (its skip is a conv, counted anyway); stage 2 keeps 8 at stride 2: 8 x 4 x 6.
    assert pooled_skip_elements(PLAN_2D, (16, 24)) == 8 * 4 * 6
    # Stage 3 keeps 16 channels at 1/4 x 1/8 x 1/8 of (8, 16, 24): 16 x 2 x 2 x 3.
    assert pooled_skip_elements(PLAN_3D, (8, 16, 24)) == 16 * 2 * 2 * 3


def dna_resenc(plan: NetworkPlan, num_input_channels: int, num_classes: int, deep_supervision: bool) -> nn.Module:
    """nnU-Net's ResidualEncoderUNet, configured as nnU-Net's ResEnc plans configure it."""
    unet = pytest.importorskip("dynamic_network_architectures.architectures.unet")
    dim = len(plan.kernel_sizes[0])
    kwargs: dict[str, Any] = {
        "conv_bias": True,
        "norm_op": nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d,
        "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "nonlin": nn.LeakyReLU,
        "nonlin_kwargs": {"inplace": True},
        "deep_supervision": deep_supervision,
    }
    return unet.ResidualEncoderUNet(
        num_input_channels, plan.num_stages, plan.features_per_stage, nn.Conv3d if dim == 3 else nn.Conv2d,
        plan.kernel_sizes, plan.strides, plan.n_conv_per_stage, num_classes, plan.n_conv_per_stage_decoder, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize(("plan", "patch"), [(PLAN_2D, (16, 24)), (PLAN_3D, (8, 16, 16))])
@pytest.mark.parametrize("deep_supervision", [True, False])
def test_same_parameters_and_outputs_as_nnunet(
    plan: NetworkPlan, patch: tuple[int, ...], deep_supervision: bool
) -> None:
    reference = dna_resenc(plan, 2, 3, deep_supervision)
    ours = build_network(plan, 2, 3, deep_supervision)
    ours_params, reference_params = list(ours.parameters()), list(reference.parameters())
    assert [p.shape for p in ours_params] == [p.shape for p in reference_params]
    assert sum(p.numel() for p in ours_params) == sum(p.numel() for p in reference_params)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mine, theirs in zip(ours_params, reference_params):  # random values: zeroed norms would hide errors
            theirs.copy_(torch.randn(theirs.shape, generator=generator))
            mine.copy_(theirs)
        x = torch.randn(2, 2, *patch, generator=generator)
        expected, actual = reference.eval()(x), ours.eval()(x)
    if not deep_supervision:
        expected, actual = [expected], [actual]
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


def nnunet_sized(dim: int, num_stages: int) -> NetworkPlan:
    cap = 320 if dim == 3 else 512
    return NetworkPlan(
        architecture="resenc_unet",
        features_per_stage=tuple(min(cap, 32 * 2**i) for i in range(num_stages)),
        kernel_sizes=((3,) * dim,) * num_stages,
        strides=((1,) * dim,) + ((2,) * dim,) * (num_stages - 1),
        n_conv_per_stage=(1, 3, 4, 6, 6, 6, 6, 6)[:num_stages],
        n_conv_per_stage_decoder=(1,) * (num_stages - 1),
    )


@pytest.mark.parametrize(("plan", "patch"), [(nnunet_sized(3, 6), (128, 128, 128)), (nnunet_sized(2, 7), (512, 512))])
def test_planner_estimate_equals_nnunet(plan: NetworkPlan, patch: tuple[int, ...]) -> None:
    for deep_supervision in (True, False):
        with torch.device("meta"):  # shapes only: nnU-Net's count needs no weights
            reference = dna_resenc(plan, 1, 3, deep_supervision)
        expected = int(reference.compute_conv_feature_map_size(patch))
        ours = feature_map_elements(plan, patch, 1, 3, deep_supervision) + pooled_skip_elements(plan, patch)
        assert ours == expected
    # nnU-Net's planners count without deep supervision; their __main__ quotes the counts with it.
    quoted = 558319104 if len(patch) == 3 else 129793792
    assert feature_map_elements(plan, patch, 1, 3, True) + pooled_skip_elements(plan, patch) == quoted
    assert resenc_planners.ResEncMPlanner().estimate_memory(plan, patch, 1, 3) == expected


# --- planners -------------------------------------------------------------------------------------------

PRESETS = [("resenc_m", 8.0), ("resenc_l", 24.0), ("resenc_xl", 40.0)]
BRAIN = make_fingerprint(  # the 1 mm brain MRI of TARGETS.md
    [(1.0, 1.0, 1.0), (1.2, 0.9, 0.9), (0.8, 1.0, 1.0)] * 4, [(182, 202, 158), (170, 210, 160), (190, 190, 150)] * 4
)
SMALL = uniform_fingerprint((1.0, 1.0, 1.0), (36, 50, 35), n=20)
# A 2D dataset whose slices must shrink for ResEnc M: nnU-Net's default rule would keep 768 x 640 at batch 7.
SLICES_2D = uniform_fingerprint((1.0, 0.5, 0.5), (1, 768, 640), n=40)
THICK_SLICES = make_fingerprint(
    [(0.7, 0.7, 5.0), (0.8, 0.8, 6.0), (0.6, 0.6, 3.0)] * 5, [(512, 512, 40), (480, 480, 30), (512, 512, 90)] * 5
)


@pytest.mark.parametrize(("name", "gpu_memory_gb"), PRESETS)
def test_presets_plan_residual_encoders_for_their_own_gpu(name: str, gpu_memory_gb: float) -> None:
    plan = plan_dataset(SMALL, name)
    assert plan.planner == name
    assert plan.gpu_memory_gb == gpu_memory_gb  # the preset's GPU unless --gpu-memory-gb says otherwise
    for config in plan.configurations.values():
        n = config.network.num_stages
        assert config.network.architecture == "resenc_unet"
        assert config.network.n_conv_per_stage == (1, 3, 4, 6, 6, 6, 6, 6)[:n]
        assert config.network.n_conv_per_stage_decoder == (1,) * (n - 1)
    assert plan_dataset(SMALL, name, gpu_memory_gb=12.0).gpu_memory_gb == 12.0


def test_batch_is_not_capped_at_five_percent_of_the_dataset() -> None:
    fullres = plan_dataset(SMALL, "resenc_m").configurations["3d_fullres"]
    assert fullres.patch_size == (40, 56, 40)  # the whole median image (36 x 50 x 35), padded to 2^3
    estimate = resenc_planners.ResEncMPlanner().estimate_memory(fullres.network, fullres.patch_size, 1, 3)
    assert round(680e6 / estimate * 2) == 58  # what the memory budget allows
    # nnU-Net's ResEnc presets cap a batch at the whole dataset: 20 images of 63000 voxels / 89600 = 14.06,
    # not at 5% of it (0.7 -> the default planner's minimum, 2).
    assert fullres.batch_size == 14
    assert Planner().plan(SMALL).configurations["3d_fullres"].batch_size == 2


def test_larger_presets_see_more_of_the_image() -> None:
    m, l_, xl = (
        plan_dataset(BRAIN, name).configurations["3d_fullres"] for name in ("resenc_m", "resenc_l", "resenc_xl")
    )
    assert m.patch_size == (128, 160, 112) and m.batch_size == 2  # nnU-Net's ResEnc M: the default's patch
    assert math.prod(l_.patch_size) > math.prod(m.patch_size)
    assert math.prod(xl.patch_size) >= math.prod(l_.patch_size)
    assert xl.batch_size > l_.batch_size >= m.batch_size  # the same whole-image patch, more memory: more samples
    assert l_.network.n_conv_per_stage == m.network.n_conv_per_stage == (1, 3, 4, 6, 6, 6)


def test_2d_patch_shrinks_until_the_reference_batch_fits() -> None:
    config = plan_dataset(SLICES_2D, "resenc_m").configurations["2d"]
    assert config.patch_size == (512, 512)
    assert config.batch_size == 12  # nnU-Net's 2D reference batch size
    planner = resenc_planners.ResEncMPlanner()
    assert planner.estimate_memory(config.network, config.patch_size, 1, 3) <= 135e6


# --- against nnU-Net's own planners ---------------------------------------------------------------------

NNUNET_PLANNERS = {
    "resenc_m": "nnUNetPlannerResEncM",
    "resenc_l": "nnUNetPlannerResEncL",
    "resenc_xl": "nnUNetPlannerResEncXL",
}


def nnunet_plans(monkeypatch: pytest.MonkeyPatch, fingerprint: Fingerprint, planner: str) -> dict[str, Any]:
    """Run nnU-Net's ResEnc planner on our fingerprint, file access stubbed out, networks on the meta device."""
    ep = pytest.importorskip("nnunetv2.experiment_planning.experiment_planners.default_experiment_planner")
    residual = pytest.importorskip(
        "nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners"
    )
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
    with torch.device("meta"):  # nnU-Net builds each candidate network only to count its feature maps
        return dict(getattr(residual, NNUNET_PLANNERS[planner])("Dataset001_Test").plan_experiment())


def assert_same_plan_as_nnunet(monkeypatch: pytest.MonkeyPatch, fingerprint: Fingerprint, planner: str) -> None:
    theirs = nnunet_plans(monkeypatch, fingerprint, planner)
    ours = plan_dataset(fingerprint, planner)
    assert set(ours.configurations) == set(theirs["configurations"]) - {"3d_cascade_fullres"}
    for name, config in ours.configurations.items():
        reference = theirs["configurations"][name]
        arch = reference["architecture"]["arch_kwargs"]
        assert reference["architecture"]["network_class_name"].endswith("ResidualEncoderUNet")
        assert config.patch_size == tuple(int(p) for p in reference["patch_size"]), name
        assert config.batch_size == reference["batch_size"], name
        assert config.batch_dice == reference["batch_dice"], name
        assert config.spacing_mm == pytest.approx(tuple(reference["spacing"]), abs=0), name
        assert config.network.strides == arch["strides"], name
        assert config.network.kernel_sizes == arch["kernel_sizes"], name
        assert config.network.features_per_stage == arch["features_per_stage"], name
        assert config.network.n_conv_per_stage == arch["n_blocks_per_stage"], name
        assert config.network.n_conv_per_stage_decoder == arch["n_conv_per_stage_decoder"], name


@pytest.mark.parametrize("planner", list(NNUNET_PLANNERS))
@pytest.mark.parametrize("fingerprint", [BRAIN, SMALL], ids=["brain", "small"])
def test_plan_matches_nnunet(monkeypatch: pytest.MonkeyPatch, fingerprint: Fingerprint, planner: str) -> None:
    assert_same_plan_as_nnunet(monkeypatch, fingerprint, planner)


def test_2d_shrinking_matches_nnunet(monkeypatch: pytest.MonkeyPatch) -> None:
    assert_same_plan_as_nnunet(monkeypatch, SLICES_2D, "resenc_m")


@pytest.mark.slow
@pytest.mark.parametrize("planner", list(NNUNET_PLANNERS))
def test_thick_slice_plan_with_lowres_matches_nnunet(monkeypatch: pytest.MonkeyPatch, planner: str) -> None:
    assert_same_plan_as_nnunet(monkeypatch, THICK_SLICES, planner)


@pytest.mark.slow
@pytest.mark.parametrize("planner", list(NNUNET_PLANNERS))
@pytest.mark.parametrize("seed", range(4))
def test_plan_matches_nnunet_on_random_datasets(monkeypatch: pytest.MonkeyPatch, seed: int, planner: str) -> None:
    assert_same_plan_as_nnunet(monkeypatch, random_fingerprint(seed), planner)


@pytest.mark.slow  # about 10 s of preprocessing and training on a loaded 2-core machine
def test_a_resenc_plan_preprocesses_and_trains(tmp_path: Path) -> None:
    """The preset end to end on CPU: plan, preprocess, one fast-dev-run fold, a checkpoint of a ResEncUNet."""
    dataset = write_dataset(tmp_path / "Dataset010_Tiny", n_cases=5, shape=(16, 20, 18))
    paths = Paths(tmp_path / "preprocessed", tmp_path / "results")
    plan_and_preprocess(dataset, paths, "resenc_m", configurations=["3d_fullres"], num_workers=1, show_progress=False)
    options = TrainOptions(
        iterations_per_epoch=2, val_iterations=1, num_workers=0, validation_mirroring=False, device="cpu",
        fast_dev_run=True, show_progress=False,
    )  # fmt: skip
    folder = train(dataset, paths, "3d_fullres", 0, planner="resenc_m", options=options)
    state, _ = load_checkpoint(folder / "checkpoint_final.pt")
    assert "stem.conv.weight" in state["network"] and "encoder.1.2.conv2.norm.weight" in state["network"]
    assert json.loads((folder / "run.json").read_text())["status"] == "finished"
