"""The Swin U-Net (``swin_unet``): shapes, shifted-window masks, gradients, its memory estimate, planning with it."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import write_dataset
from torch import nn

from autoseg import serialization
from autoseg.cli import main
from autoseg.errors import AutosegError
from autoseg.fingerprint import CaseFingerprint, Fingerprint, IntensityStats
from autoseg.networks import build_network, feature_map_elements, register_network
from autoseg.networks.swin import (
    SwinBlock,
    SwinUNet,
    WindowAttention,
    shift_size,
    shifted_window_mask,
    window_partition,
    window_reverse,
    window_size,
)
from autoseg.paths import Paths
from autoseg.plan import NetworkPlan, Plan
from autoseg.plan_and_train import plan_and_train
from autoseg.planning.planner import plan_dataset
from autoseg.training.trainer import TrainOptions

PLAN_2D = NetworkPlan("swin_unet", (8, 16, 16), ((3, 3),) * 3, ((1, 1), (2, 2), (2, 2)), (2,) * 3, (2,) * 2)
PLAN_3D = NetworkPlan(
    "swin_unet", (8, 16, 16, 16), ((3, 3, 3),) * 4, ((1, 1, 1),) + ((2, 2, 2),) * 3, (2,) * 4, (2,) * 3
)
# Thick slices: the first merges are in-plane only, as nnU-Net plans anisotropic data.
PLAN_ANISO = NetworkPlan(
    "swin_unet",
    (8, 16, 16, 16),
    ((1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3)),
    ((1, 1, 1), (1, 2, 2), (1, 2, 2), (2, 2, 2)),
    (2,) * 4,
    (2,) * 3,
)


def stage_shapes(plan: NetworkPlan, patch: tuple[int, ...], batch: int, classes: int) -> list[tuple[int, ...]]:
    """Full resolution first, then each decoder stage: the patch over the cumulative stride (as PlainUNet)."""
    shapes, divisor = [], [1] * len(patch)
    for stride in plan.strides[:-1]:
        divisor = [d * s for d, s in zip(divisor, stride)]
        shapes.append((batch, classes, *(p // d for p, d in zip(patch, divisor))))
    return shapes


@pytest.mark.parametrize(("plan", "patch"), [(PLAN_2D, (64, 64)), (PLAN_3D, (32, 32, 32)), (PLAN_ANISO, (6, 32, 40))])
def test_output_shapes_with_and_without_deep_supervision(plan: NetworkPlan, patch: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    net = build_network(plan, num_input_channels=2, num_classes=3)
    assert isinstance(net, SwinUNet)
    assert net.max_outputs == plan.num_stages - 1  # what the training loop counts for its loss weights
    x = torch.randn(1, 2, *patch)
    with torch.no_grad():
        outputs = net(x)
        assert isinstance(outputs, list)
        assert [tuple(o.shape) for o in outputs] == stage_shapes(plan, patch, 1, 3)
        net.num_outputs = 1  # the lowest-resolution heads are skipped, the others unchanged
        assert len(net(x)) == 1
        net.deep_supervision = False
        single = net(x)
    assert isinstance(single, torch.Tensor)
    torch.testing.assert_close(single, outputs[0])


def test_window_sizes_divide_the_map_and_shift_only_what_has_several_windows() -> None:
    assert window_size((5, 20, 64), 7) == (5, 5, 4)  # whole edge; largest divisors up to 7
    assert window_size((7, 14, 28), 7) == (7, 7, 7)
    assert shift_size((5, 20, 64), (5, 5, 4)) == (0, 2, 2)


def test_window_partition_round_trip() -> None:
    x = torch.arange(2 * 4 * 6 * 3, dtype=torch.float32).view(2, 4, 6, 3)
    windows = window_partition(x, (2, 3))
    assert windows.shape == (2, 4, 6, 3)
    # The second window (row-major) is rows 0-1, columns 3-5.
    torch.testing.assert_close(windows[0, 1], x[0, 0:2, 3:6].reshape(6, 3))
    torch.testing.assert_close(window_reverse(windows, (2, 3), (4, 6)), x)


def test_shifted_window_mask_by_hand() -> None:
    # Four tokens in a row, windows of 2, shifted by 1: after the roll the windows hold tokens (1, 2) and
    # (3, 0); tokens 3 and 0 met only across the cyclic border, so they must not see each other.
    mask = shifted_window_mask((1, 4), (1, 2), (0, 1))
    assert mask.tolist() == [[[True, True], [True, True]], [[True, False], [False, True]]]
    # 4x4 map, 2x2 windows, shifted by 1 both ways: 16 pairs in the inner window, 2 x 4 in the two border
    # windows (two regions of 2 tokens each), 4 in the corner window (every token alone): 36 allowed pairs.
    mask = shifted_window_mask((4, 4), (2, 2), (1, 1))
    assert [int(m.sum()) for m in mask] == [16, 8, 8, 4]
    assert torch.equal(mask[3], torch.eye(4, dtype=torch.bool))
    assert shifted_window_mask((4, 4), (2, 2), (0, 0)).all()  # no shift: no mask


@torch.no_grad()
def test_shifted_block_keeps_tokens_apart_across_the_cyclic_border() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 1, 4, 8)
    changed = x.clone()
    changed[0, 0, 0] += torch.randn(8)  # not a constant: LayerNorm would remove it
    for shifted, expected in ((False, [0, 1]), (True, [0])):
        block = SwinBlock(8, 2, dim=2, max_window=2, shifted=shifted).eval()
        nn.init.normal_(block.attention.relative_bias)
        difference = (block(changed) - block(x)).abs().sum(-1)[0, 0]
        # Plain windows are (0, 1), (2, 3); shifted ones (1, 2), (3, 0) with 3 and 0 masked apart.
        assert [i for i in range(4) if difference[i] > 1e-6] == expected


def test_window_attention_equals_explicit_softmax() -> None:
    torch.manual_seed(0)
    attention = WindowAttention(8, 2, dim=2, max_window=2)
    nn.init.normal_(attention.relative_bias)
    windows = torch.randn(3, 2, 2, 8)  # a batch of 3, two windows of 1x2 tokens each
    q, k, v = attention.qkv(windows).view(3, 2, 2, 3, 2, 4).permute(3, 0, 1, 4, 2, 5)
    # Relative offsets -1, 0, 1 along the second axis: rows 3, 4, 5 of the 3x3 bias table (offset 0, x).
    bias = attention.relative_bias[torch.tensor([[4, 3], [5, 4]])].permute(2, 0, 1)
    scores = q @ k.transpose(-1, -2) / 2.0 + bias  # head channels 4: scale 1/2
    for mask in (None, shifted_window_mask((1, 4), (1, 2), (0, 1))):
        masked = scores if mask is None else scores.masked_fill(~mask[:, None], float("-inf"))
        expected = attention.proj((masked.softmax(-1) @ v).transpose(-3, -2).reshape(3, 2, 2, 8))
        torch.testing.assert_close(attention(windows, (1, 2), mask), expected)


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    net = build_network(PLAN_ANISO, 1, 2)
    outputs = net(torch.randn(2, 1, 6, 32, 32))
    torch.stack([o.square().mean() for o in outputs]).sum().backward()
    for name, parameter in net.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def counted_on_a_real_forward(net: nn.Module, patch: tuple[int, ...]) -> int:
    """Conv, transposed-conv and linear outputs plus attention matrices, counted by hooks at batch 1."""
    total = 0

    def outputs(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel()

    def matrices(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        _, n_windows, n, _ = inputs[0].shape
        assert isinstance(module, WindowAttention)
        total += n_windows * module.heads * n * n

    for m in net.modules():
        if isinstance(m, nn.Conv2d | nn.Conv3d | nn.ConvTranspose2d | nn.ConvTranspose3d | nn.Linear):
            m.register_forward_hook(outputs)
        if isinstance(m, WindowAttention):
            m.register_forward_hook(matrices)
    with torch.no_grad():
        net(torch.randn(1, 1, *patch))
    return total


@pytest.mark.parametrize(("plan", "patch"), [(PLAN_2D, (64, 48)), (PLAN_ANISO, (6, 32, 40))])
def test_memory_estimate_counts_what_the_network_computes(plan: NetworkPlan, patch: tuple[int, ...]) -> None:
    for deep_supervision in (False, True):
        net = build_network(plan, 1, 3, deep_supervision)
        assert isinstance(net, SwinUNet)
        expected = counted_on_a_real_forward(net, patch)
        assert net.feature_map_elements(patch) == expected
        # The planner's path builds the network on the meta device and asks it.
        assert feature_map_elements(plan, patch, 1, 3, deep_supervision) == expected


def test_memory_estimate_grows_with_the_patch_faster_than_the_voxels() -> None:
    small, large = feature_map_elements(PLAN_3D, (32, 32, 32), 1, 2), feature_map_elements(PLAN_3D, (48, 48, 48), 1, 2)
    # Windows grow from 4^3 tokens (stage edges 16, 8, 4) to 6^3 (24, 12, 6), so the attention matrices grow
    # faster than the 3.375x voxels: the estimate is not a conv count in disguise.
    assert large > (48 / 32) ** 3 * small


def test_patch_the_strides_do_not_divide_names_patch_and_divisor() -> None:
    net = build_network(PLAN_ANISO, 1, 2)
    with pytest.raises(AutosegError, match=r"patch \(6, 32, 36\).*multiple of \(2, 8, 8\)"):
        net(torch.zeros(1, 1, 6, 32, 36))
    with pytest.raises(AutosegError, match=r"patch \(1, 8, 8\).*multiple of \(2, 8, 8\)"):
        feature_map_elements(PLAN_ANISO, (1, 8, 8), 1, 2)


def fingerprint(spacing: tuple[float, ...], shape: tuple[int, ...], n: int = 20) -> Fingerprint:
    stats = IntensityStats(mean=1.0, median=1.0, std=0.5, min=0.0, max=3.0, percentile_00_5=0.1, percentile_99_5=2.9)
    case = CaseFingerprint(
        case_id="case",
        spacing_mm=spacing,
        shape_before_crop=shape,
        shape_after_crop=shape,
        bbox=tuple((0, s) for s in shape),
        relative_size_after_crop=1.0,
        class_voxel_counts={"background": math.prod(shape)},
        class_component_counts={"background": 1},
    )
    return Fingerprint(
        schema_version=Fingerprint.SCHEMA_VERSION,
        dataset_name="Dataset001_Test",
        seed=0,
        foreground_samples_total=1000,
        channel_names=("T1",),
        labels={"background": 0, "left": 1, "right": 2},
        cases=(case,) * n,
        foreground_intensity_per_channel=(stats,),
    )


def test_planning_for_swin_unet_uses_its_estimate() -> None:
    fp = fingerprint((3.0, 1.0, 1.0), (40, 192, 160))
    plain, swin = plan_dataset(fp), plan_dataset(fp, "default", architecture="swin_unet")
    assert set(swin.configurations) == set(plain.configurations)
    for name, conf in swin.configurations.items():
        assert conf.network.architecture == "swin_unet"
        assert plain.configurations[name].network.architecture == "plain_unet"
        # Attention costs more than convs, so the same budget buys no more voxels per batch.
        plain_conf = plain.configurations[name]
        assert conf.batch_size * math.prod(conf.patch_size) <= plain_conf.batch_size * math.prod(plain_conf.patch_size)
        with torch.device("meta"):  # shapes only: the network runs on the planned patch
            net = build_network(conf.network, 1, 3)
            outputs = net(torch.empty(1, 1, *conf.patch_size))
        assert tuple(outputs[0].shape) == (1, 3, *conf.patch_size)
    assert swin.configurations["3d_fullres"].patch_size != plain.configurations["3d_fullres"].patch_size
    with pytest.raises(AutosegError, match="Did you mean 'swin_unet'"):
        plan_dataset(fp, "default", architecture="swin_unte")


class Refuses(nn.Module):
    """A network whose own estimate refuses every patch."""

    def feature_map_elements(self, patch_size: tuple[int, ...]) -> int:
        raise AutosegError(f"patch {patch_size} is not for me")


@register_network("test_swin_refuses")
def refuses(network: NetworkPlan, num_input_channels: int, num_classes: int, deep_supervision: bool) -> nn.Module:
    return Refuses()


def test_a_network_that_cannot_run_on_the_patch_names_configuration_and_fix() -> None:
    with pytest.raises(AutosegError, match=r"configuration '3d_fullres' of planner 'default' with network") as info:
        plan_dataset(fingerprint((1.0, 1.0, 1.0), (64, 64, 64)), "default", architecture="test_swin_refuses")
    assert "is not for me" in str(info.value) and "Fix: plan with another --network" in str(info.value)


def run_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(["-q", *argv])
    return code, out.getvalue()


def test_plan_and_train_with_network_then_plan_from_the_command_line(tmp_path: Path) -> None:
    dataset = write_dataset(tmp_path / "Dataset030_Swin", n_cases=5, shape=(16, 20, 18))
    pre, results = tmp_path / "pre", tmp_path / "results"
    quick = TrainOptions(
        fast_dev_run=True, num_workers=0, device="cpu", validation_mirroring=False, show_progress=False
    )
    result = plan_and_train(
        dataset, Paths(pre, results), configurations=["3d_fullres"], folds=[0], options=quick, num_workers=1,
        announce=lambda line: None, network="swin_unet",
    )  # fmt: skip
    assert not result.failed and result.best is not None
    # Planned under its own name, so the planner's own plan and models are never overwritten.
    plans = pre / "Dataset030_Swin" / "plans"
    plan = serialization.load(Plan, plans / "default_swin_unet.json")
    assert {c.network.architecture for c in plan.configurations.values()} == {"swin_unet"}
    assert plan.planner == "default_swin_unet"
    assert plan.configurations["3d_fullres"].data_identifier == "default_swin_unet_3d_fullres"
    fold = results / "Dataset030_Swin" / "default__default_swin_unet__3d_fullres" / "fold_0"
    assert json.loads((fold / "run.json").read_text())["status"] == "finished"
    assert (fold / "checkpoint_final.pt").is_file()

    # `autoseg plan` with the planner's own network writes the planner's plan; --network another name; a
    # plan-and-train whose plan name holds a plan for another network is refused.
    where = ("--preprocessed", str(pre))
    code, out = run_cli("plan", str(dataset), *where, "--network", "plain_unet")
    assert code == 0, out
    assert serialization.load(Plan, plans / "default.json").configurations["3d_fullres"].network.architecture == (
        "plain_unet"
    )
    assert serialization.load(Plan, plans / "default_swin_unet.json").planner == "default_swin_unet"  # untouched
    code, out = run_cli("plan", str(dataset), *where, "--network", "swin_unet", "--plan-name", "bad__name")
    assert code == 2 and "no '__'" in out
    code, out = run_cli(
        "plan-and-train", str(dataset), *where, "--results", str(results), "--network", "swin_unet",
        "--plan-name", "default",
    )  # fmt: skip
    assert code == 2
    assert "planned for network plain_unet, not --network swin_unet" in out and "delete the plan" in out
