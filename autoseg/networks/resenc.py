"""nnU-Net v2's residual encoder U-Net (dynamic_network_architectures' ResidualEncoderUNet), 2D and 3D.

The network of nnU-Net's ResEnc M/L/XL presets (Isensee et al., "nnU-Net Revisited", MICCAI 2024). Only
the encoder differs from the plain U-Net: a stem (one conv -> norm -> LeakyReLU to ``features[0]``), then
per stage ``n_conv_per_stage[i]`` residual blocks (nnU-Net plans 1, 3, 4, 6, 6, 6, ...). Each block is a
ResNet-D ``BasicBlockD``: conv -> norm -> LeakyReLU -> conv -> norm, plus the skip, then LeakyReLU. The
first block of a stage carries the stride; its skip is average-pooled by the stride (ResNet-D's trick, not
a strided 1x1 conv) and projected by a 1x1 conv (no bias) -> norm when the width changes. The decoder,
the segmentation heads and ``forward`` (deep supervision, ``num_outputs``) are the plain U-Net's, inherited
from ``PlainUNet``.

Modules are registered in ResidualEncoderUNet's parameter order (stem, encoder stages, decoder convs,
transposed convs, heads), so nnU-Net weights copy across by position. Initialisation is nnU-Net's: He
for every conv, and the last norm of every residual block zeroed (``init_last_bn_before_add_to_0``) so
that each block starts as its skip.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

import torch
from torch import nn

from autoseg.networks.registry import register_network
from autoseg.networks.unet import (
    ConvNorm,
    ConvNormAct,
    PlainUNet,
    check_plan,
    init_he,
    plain_decoder,
)
from autoseg.plan import NetworkPlan

_AVG_POOL: dict[int, type[nn.Module]] = {2: nn.AvgPool2d, 3: nn.AvgPool3d}


class BasicBlockD(nn.Module):
    """ResNet-D basic block: two convs on the main path, an avg-pooled (and projected) skip, LeakyReLU last."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: Sequence[int], stride: Sequence[int] = ()
    ) -> None:
        super().__init__()
        dim = len(kernel_size)
        stride = tuple(stride) or (1,) * dim
        self.conv1 = ConvNormAct(in_channels, out_channels, kernel_size, stride)
        self.conv2 = ConvNorm(out_channels, out_channels, kernel_size)
        self.act = nn.LeakyReLU(ConvNormAct.negative_slope, inplace=True)
        skip: list[nn.Module] = []
        if any(s != 1 for s in stride):
            skip.append(_AVG_POOL[dim](stride, stride))
        if in_channels != out_channels:
            # nnU-Net's projection has no conv bias, whatever the plan's conv_bias says.
            skip.append(ConvNorm(in_channels, out_channels, (1,) * dim, bias=False))
        self.skip = nn.Sequential(*skip)  # empty: the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.skip(x)
        out = self.conv2(self.conv1(x))
        out += residual
        return self.act(out)


def residual_stage(
    n_blocks: int, in_channels: int, out_channels: int, kernel_size: Sequence[int], stride: Sequence[int]
) -> nn.Sequential:
    """``n_blocks`` BasicBlockD; only the first changes the width and carries the stride."""
    blocks = [BasicBlockD(in_channels, out_channels, kernel_size, stride)]
    blocks += [BasicBlockD(out_channels, out_channels, kernel_size) for _ in range(n_blocks - 1)]
    return nn.Sequential(*blocks)


def zero_last_norm(module: nn.Module) -> None:
    """nnU-Net's init_last_bn_before_add_to_0: a residual block starts as its skip connection."""
    if isinstance(module, BasicBlockD):
        for parameter in module.conv2.norm.parameters():  # weight and bias
            if not parameter.is_meta:  # the planner's count builds on the meta device: no values
                nn.init.zeros_(parameter)


def pooled_skip_elements(network: NetworkPlan, patch_size: Sequence[int]) -> int:
    """Elements of the skips that are only average-pooled (a strided block that keeps its width).

    nnU-Net's BasicBlockD.compute_conv_feature_map_size counts a block's skip output whenever the block
    strides or changes width, also when no conv computes it; ``feature_map_elements`` counts conv
    outputs only. This is the difference, so that a planner can reproduce nnU-Net's estimate exactly.
    """
    total = 0
    size = [int(p) for p in patch_size]
    in_channels = network.features_per_stage[0]  # the stem's width
    for out_channels, stride in zip(network.features_per_stage, network.strides):
        size = [s // t for s, t in zip(size, stride)]
        if in_channels == out_channels and any(t != 1 for t in stride):
            total += out_channels * prod(size)
        in_channels = out_channels
    return total


@register_network("resenc_unet")
class ResEncUNet(PlainUNet):
    """nnU-Net v2's residual encoder U-Net (ResidualEncoderUNet): BasicBlockD stages, the plain decoder.

    ``network.n_conv_per_stage`` counts residual blocks per encoder stage (two convs each);
    ``n_conv_per_stage_decoder`` counts plain conv blocks per decoder stage. ``forward``, ``deep_supervision``
    and ``num_outputs`` behave as in ``PlainUNet``.
    """

    def __init__(
        self, network: NetworkPlan, num_input_channels: int, num_classes: int, deep_supervision: bool = True
    ) -> None:
        # PlainUNet.__init__ is not called: it would build a plain encoder only to replace it. The layers
        # are registered here in ResidualEncoderUNet's order; everything after the encoder is PlainUNet's.
        nn.Module.__init__(self)
        check_plan(network)
        features, kernels, strides = network.features_per_stage, network.kernel_sizes, network.strides
        self.deep_supervision = deep_supervision
        self.num_outputs: int | None = None  # None: every decoder stage's output
        self.shape_must_be_divisible_by = network.shape_must_be_divisible_by
        self.stem = ConvNormAct(num_input_channels, features[0], kernels[0])
        in_channels = features[0]
        encoder = []
        for n_blocks, out_channels, kernel, stride in zip(network.n_conv_per_stage, features, kernels, strides):
            encoder.append(residual_stage(n_blocks, in_channels, out_channels, kernel, stride))
            in_channels = out_channels
        self.encoder = nn.ModuleList(encoder)
        self.decoder, self.upsample, self.heads = plain_decoder(network, num_classes)
        self.apply(lambda m: init_he(m, self.negative_slope))
        self.apply(zero_last_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        # The stem keeps the spatial shape, so PlainUNet's divisibility check still sees the input's.
        return super().forward(self.stem(x))
