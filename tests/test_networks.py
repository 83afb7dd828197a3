"""The network registry, the plain U-Net (checked against nnU-Net's PlainConvUNet) and the memory count."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from autoseg.errors import AutosegError
from autoseg.networks import NETWORKS, PlainUNet, build_network, feature_map_elements, register_network
from autoseg.plan import NetworkPlan

PLAN_2D = NetworkPlan(
    architecture="plain_unet",
    features_per_stage=(4, 8, 16),
    kernel_sizes=((3, 3), (3, 3), (3, 3)),
    strides=((1, 1), (2, 2), (2, 2)),
    n_conv_per_stage=(2, 2, 2),
    n_conv_per_stage_decoder=(2, 2),
)
# Anisotropic, as nnU-Net plans thick-slice data: in-plane kernels and pooling first.
PLAN_3D = NetworkPlan(
    architecture="plain_unet",
    features_per_stage=(4, 8, 16, 16),
    kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)),
    strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)),
    n_conv_per_stage=(2, 2, 2, 2),
    n_conv_per_stage_decoder=(1, 2, 2),
)


def expected_output_shapes(plan: NetworkPlan, patch: tuple[int, ...], batch: int, classes: int) -> list[tuple]:
    """Full resolution first, then each decoder stage's resolution: the patch over the cumulative stride."""
    shapes = []
    divisor = [1] * len(patch)
    for stride in plan.strides[:-1]:
        divisor = [d * s for d, s in zip(divisor, stride)]
        shapes.append((batch, classes, *(p // d for p, d in zip(patch, divisor))))
    return shapes


@pytest.mark.parametrize(("plan", "patch"), [(PLAN_2D, (32, 24)), (PLAN_3D, (8, 16, 24))])
def test_output_shapes_with_and_without_deep_supervision(plan: NetworkPlan, patch: tuple[int, ...]) -> None:
    net = build_network(plan, num_input_channels=2, num_classes=3)
    assert isinstance(net, PlainUNet)
    x = torch.randn(2, 2, *patch)
    with torch.no_grad():
        outputs = net(x)
        assert isinstance(outputs, list)
        assert len(outputs) == plan.num_stages - 1
        assert [tuple(o.shape) for o in outputs] == expected_output_shapes(plan, patch, 2, 3)
        net.deep_supervision = False  # inference switches it off on the trained module
        single = net(x)
    assert isinstance(single, torch.Tensor)
    assert single.shape == (2, 3, *patch)
    torch.testing.assert_close(single, outputs[0])


def test_num_outputs_skips_the_unwanted_heads() -> None:
    net = build_network(PLAN_3D, 1, 2)
    assert isinstance(net, PlainUNet)
    called: list[int] = []
    for i, head in enumerate(net.heads):  # lowest resolution first
        head.register_forward_hook(lambda module, inputs, output, i=i: called.append(i))
    x = torch.randn(1, 1, 8, 16, 16)
    with torch.no_grad():
        everything = net(x)
        assert sorted(called) == [0, 1, 2]
        called.clear()
        net.num_outputs = 2
        first_two = net(x)
    assert sorted(called) == [1, 2]  # the lowest-resolution head was never run
    assert len(first_two) == 2
    for ours, reference in zip(first_two, everything):
        torch.testing.assert_close(ours, reference)


def test_initialisation_is_he_with_zero_biases() -> None:
    plan = NetworkPlan("plain_unet", (32, 64), ((3, 3, 3), (3, 3, 3)), ((1, 1, 1), (2, 2, 2)), (2, 2), (2,))
    torch.manual_seed(0)
    net = build_network(plan, 1, 2)
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    assert len(convs) == 4 + 1 + 2 + 1  # encoder, transposed, decoder, head
    gain = math.sqrt(2 / (1 + 0.01**2))  # kaiming_normal_ with a=1e-2, fan_in mode
    for conv in convs:
        assert conv.bias is not None and torch.all(conv.bias == 0)
        weight = conv.weight.detach()
        fan_in = weight.shape[1] * math.prod(weight.shape[2:])  # torch's fan-in, also for transposed convs
        if weight.numel() > 5000:  # enough samples for a tight estimate of the std
            assert weight.std().item() == pytest.approx(gain / math.sqrt(fan_in), rel=0.05)
            assert abs(weight.mean().item()) < 0.1 * gain / math.sqrt(fan_in)


def test_unknown_architecture_suggests_the_nearest_name() -> None:
    plan = NetworkPlan("plain_unte", (4, 8), ((3, 3), (3, 3)), ((1, 1), (2, 2)), (1, 1), (1,))
    with pytest.raises(AutosegError, match="Did you mean 'plain_unet'") as info:
        build_network(plan, 1, 2)
    assert "unknown network" in str(info.value)
    assert "plain_unet" in NETWORKS


def test_inconsistent_plan_and_input_fail_with_a_clear_message() -> None:
    mixed = NetworkPlan("plain_unet", (4, 8), ((3, 3), (3, 3, 3)), ((1, 1), (2, 2)), (1, 1), (1,))
    with pytest.raises(AutosegError, match="kernel_sizes"):
        build_network(mixed, 1, 2)
    net = build_network(PLAN_2D, 1, 2)
    with pytest.raises(AutosegError, match=r"multiples of \(4, 4\)"):
        net(torch.zeros(1, 1, 16, 18))
    with pytest.raises(AutosegError, match=r"multiples of \(4, 4\)"):
        feature_map_elements(PLAN_2D, (16, 18), 1, 2)


def test_feature_map_elements_equals_a_count_by_hand() -> None:
    patch, classes = (16, 16), 3
    encoder = 2 * 4 * 16 * 16 + 2 * 8 * 8 * 8 + 2 * 16 * 4 * 4  # two convs per stage
    to_8x8 = 8 * 8 * 8 + 2 * 8 * 8 * 8  # transposed conv, two convs
    to_16x16 = 4 * 16 * 16 + 2 * 4 * 16 * 16
    full_res_head, half_res_head = classes * 16 * 16, classes * 8 * 8
    without_ds = encoder + to_8x8 + to_16x16 + full_res_head
    assert feature_map_elements(PLAN_2D, patch, 1, classes) == without_ds
    assert feature_map_elements(PLAN_2D, patch, 5, classes) == without_ds  # the input is not counted
    assert feature_map_elements(PLAN_2D, patch, 1, classes, deep_supervision=True) == without_ds + half_res_head


def dna_unet(plan: NetworkPlan, num_input_channels: int, num_classes: int, deep_supervision: bool) -> nn.Module:
    """nnU-Net's own network, configured as nnU-Net v2's plans configure it."""
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
    return unet.PlainConvUNet(
        num_input_channels, plan.num_stages, plan.features_per_stage, nn.Conv3d if dim == 3 else nn.Conv2d,
        plan.kernel_sizes, plan.strides, plan.n_conv_per_stage, num_classes, plan.n_conv_per_stage_decoder, **kwargs,
    )  # fmt: skip


# nnU-Net-sized networks: a six-stage 3d_fullres (up to 320 features) and an eight-stage 2d (up to 512).
PLAN_3D_FULLRES = NetworkPlan(
    architecture="plain_unet",
    features_per_stage=(32, 64, 128, 256, 320, 320),
    kernel_sizes=((3, 3, 3),) * 6,
    strides=((1, 1, 1),) + ((2, 2, 2),) * 5,
    n_conv_per_stage=(2,) * 6,
    n_conv_per_stage_decoder=(2,) * 5,
)
PLAN_2D_LARGE = NetworkPlan(
    architecture="plain_unet",
    features_per_stage=(32, 64, 128, 256, 512, 512, 512, 512),
    kernel_sizes=((3, 3),) * 8,
    strides=((1, 1),) + ((2, 2),) * 7,
    n_conv_per_stage=(2,) * 8,
    n_conv_per_stage_decoder=(2,) * 7,
)
NNUNET_SIZED = [(PLAN_3D_FULLRES, (128, 160, 96)), (PLAN_2D_LARGE, (512, 512)), (PLAN_3D, (40, 224, 192))]


@pytest.mark.parametrize(("plan", "patch"), NNUNET_SIZED)
def test_feature_map_elements_equals_nnunet(plan: NetworkPlan, patch: tuple[int, ...]) -> None:
    for deep_supervision in (False, True):
        with torch.device("meta"):  # shapes only: nnU-Net's count needs no weights
            reference = dna_unet(plan, 1, 4, deep_supervision)
        expected = int(reference.compute_conv_feature_map_size(patch))
        assert feature_map_elements(plan, patch, 1, 4, deep_supervision) == expected


@pytest.mark.parametrize(("plan", "patch"), [(PLAN_2D, (16, 24)), (PLAN_3D, (8, 16, 16))])
def test_same_module_and_outputs_as_nnunet(plan: NetworkPlan, patch: tuple[int, ...]) -> None:
    reference = dna_unet(plan, 2, 3, deep_supervision=True)
    ours = build_network(plan, 2, 3, deep_supervision=True)
    ours_params, reference_params = list(ours.parameters()), list(reference.parameters())
    assert [p.shape for p in ours_params] == [p.shape for p in reference_params]
    assert sum(p.numel() for p in ours_params) == sum(p.numel() for p in reference_params)
    with torch.no_grad():
        for mine, theirs in zip(ours_params, reference_params):  # same order: a checkpoint maps by position
            mine.copy_(theirs)
        x = torch.randn(2, 2, *patch)
        expected, actual = reference.eval()(x), ours.eval()(x)
    assert len(actual) == len(expected) == plan.num_stages - 1
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)


def test_gradients_reach_every_parameter() -> None:
    net = build_network(PLAN_3D, 1, 2)
    outputs = net(torch.randn(2, 1, 8, 16, 16))
    loss = sum(o.square().mean() for o in outputs)
    assert isinstance(loss, torch.Tensor)
    loss.backward()
    for name, parameter in net.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
    first_conv = next(m for m in net.modules() if isinstance(m, nn.Conv3d))
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0


@register_network("test_single_conv")
class SingleConv(nn.Module):
    """A plug-in architecture: one conv, so its count is that conv's output."""

    def __init__(self, network: NetworkPlan, num_input_channels: int, num_classes: int, deep_supervision: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(num_input_channels, num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_a_plugin_architecture_is_built_and_counted_through_the_registry() -> None:
    plan = NetworkPlan("test_single_conv", (4, 8), ((3, 3), (3, 3)), ((1, 1), (2, 2)), (1, 1), (1,))
    assert isinstance(build_network(plan, 2, 5), SingleConv)
    assert feature_map_elements(plan, (12, 20), 2, 5) == 5 * 12 * 20
