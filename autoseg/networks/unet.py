"""nnU-Net v2's plain U-Net (dynamic_network_architectures' PlainConvUNet), 2D and 3D from one code path.

Encoder: per stage ``n_conv_per_stage[i]`` blocks of conv -> InstanceNorm -> LeakyReLU; the stage's first
conv carries its stride (strided convs, no pooling). Decoder, from the bottleneck up: a transposed conv
(kernel = stride = the stride of the stage it returns to), concatenation with that stage's skip,
``n_conv_per_stage_decoder`` blocks and a 1x1 segmentation head. Modules are laid out in the same
parameter order as PlainConvUNet (encoder, decoder convs, transposed convs, heads), so weights can be
copied across by position.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import ClassVar

import torch
from torch import nn

from autoseg.errors import AutosegError
from autoseg.networks.registry import register_network
from autoseg.plan import NetworkPlan

_CONV: dict[int, type[nn.Module]] = {2: nn.Conv2d, 3: nn.Conv3d}
_TRANSPOSED_CONV: dict[int, type[nn.Module]] = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_INSTANCE_NORM: dict[int, type[nn.Module]] = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_INITIALIZED = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class ConvNorm(nn.Sequential):
    """conv -> InstanceNorm with 'same' padding and no activation: ConvDropoutNormReLU with nonlin=None."""

    norm_eps: ClassVar[float] = 1e-5  # nnU-Net's plans: InstanceNorm eps 1e-5, affine
    norm: nn.Module  # declared so that zero_last_norm may ask for its parameters

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int],
        stride: Sequence[int] = (),
        bias: bool = True,
    ) -> None:
        dim = len(kernel_size)
        stride = tuple(stride) or (1,) * dim
        padding = tuple((k - 1) // 2 for k in kernel_size)
        super().__init__()
        self.conv = _CONV[dim](in_channels, out_channels, tuple(kernel_size), stride, padding, bias=bias)
        self.norm = _INSTANCE_NORM[dim](out_channels, eps=self.norm_eps, affine=True)


class ConvNormAct(ConvNorm):
    """conv -> InstanceNorm -> LeakyReLU, with 'same' padding: nnU-Net's ConvDropoutNormReLU without dropout."""

    negative_slope: ClassVar[float] = 1e-2  # nnU-Net's LeakyReLU (torch's default slope)

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: Sequence[int], stride: Sequence[int] = ()
    ) -> None:
        # nnU-Net's plans set conv_bias=True although InstanceNorm cancels it; kept so weights line up.
        super().__init__(in_channels, out_channels, kernel_size, stride, bias=True)
        self.act = nn.LeakyReLU(self.negative_slope, inplace=True)


def conv_stack(
    n_convs: int, in_channels: int, out_channels: int, kernel_size: Sequence[int], stride: Sequence[int] = ()
) -> nn.Sequential:
    """``n_convs`` ConvNormAct blocks; only the first changes the channel count and carries the stride."""
    blocks = [ConvNormAct(in_channels, out_channels, kernel_size, stride)]
    blocks += [ConvNormAct(out_channels, out_channels, kernel_size) for _ in range(n_convs - 1)]
    return nn.Sequential(*blocks)


def init_he(module: nn.Module, negative_slope: float = 1e-2) -> None:
    """nnU-Net's InitWeights_He(1e-2): kaiming-normal conv weights for a LeakyReLU(1e-2), zero biases."""
    # On the meta device (the planner's memory count) there are no values to initialize, and init
    # kernels there cost more than building the module.
    if isinstance(module, _INITIALIZED) and not module.weight.is_meta:
        nn.init.kaiming_normal_(module.weight, a=negative_slope)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def check_plan(network: NetworkPlan) -> int:
    """The plan's spatial dimensionality; an inconsistent plan raises naming the field to fix."""
    if network.num_stages < 2:
        raise AutosegError(
            f"network plan features_per_stage {network.features_per_stage}: a U-Net needs at least two stages"
            " (a larger patch size gives the planner room for more)"
        )
    dim = len(network.kernel_sizes[0])
    if dim not in _CONV:
        raise AutosegError(
            f"network plan kernel_sizes {network.kernel_sizes}: {dim}-D kernels; a U-Net is 2D or 3D"
            " (edit the configuration's network in the plan file)"
        )
    for field_name in ("kernel_sizes", "strides"):
        values = getattr(network, field_name)
        if any(len(v) != dim for v in values):
            raise AutosegError(
                f"network plan {field_name} {values}: every entry must have {dim} values, as kernel_sizes[0]"
                " (edit the configuration's network in the plan file)"
            )
    if min(network.n_conv_per_stage) < 1 or min(network.n_conv_per_stage_decoder) < 1:
        raise AutosegError(
            f"network plan n_conv_per_stage {network.n_conv_per_stage} / n_conv_per_stage_decoder"
            f" {network.n_conv_per_stage_decoder}: every stage needs at least one conv"
        )
    return dim


def plain_decoder(network: NetworkPlan, num_classes: int) -> tuple[nn.ModuleList, nn.ModuleList, nn.ModuleList]:
    """PlainConvUNet's decoder, lowest resolution first: (conv stacks, transposed convs, 1x1 heads)."""
    dim = len(network.kernel_sizes[0])
    features, kernels, strides = network.features_per_stage, network.kernel_sizes, network.strides
    decoder, upsample, heads = [], [], []
    for i, n_conv in enumerate(network.n_conv_per_stage_decoder):
        skip = network.num_stages - 2 - i
        stride = strides[skip + 1]
        upsample.append(_TRANSPOSED_CONV[dim](features[skip + 1], features[skip], stride, stride, bias=True))
        decoder.append(conv_stack(n_conv, 2 * features[skip], features[skip], kernels[skip]))
        heads.append(_CONV[dim](features[skip], num_classes, 1, 1, 0, bias=True))
    return nn.ModuleList(decoder), nn.ModuleList(upsample), nn.ModuleList(heads)


class DeepSupervisionOutputs:
    """How many outputs a U-Net computes: one per decoder stage with deep supervision, else the last only;
    ``num_outputs`` (set by the training loop) skips the lowest-resolution heads whose loss weight is zero."""

    heads: nn.ModuleList
    deep_supervision: bool
    num_outputs: int | None

    @property
    def max_outputs(self) -> int:
        """Outputs with deep supervision on: one per decoder stage."""
        return len(self.heads)

    def wanted_outputs(self) -> int:
        if not self.deep_supervision:
            return 1
        return self.max_outputs if self.num_outputs is None else max(1, min(self.num_outputs, self.max_outputs))


@register_network("plain_unet")
class PlainUNet(DeepSupervisionOutputs, nn.Module):
    """nnU-Net v2's plain convolutional U-Net (PlainConvUNet), 2D or 3D from the plan's kernel sizes.

    ``forward`` returns, with ``deep_supervision`` on, a list of logits with the full resolution first
    (one per decoder stage), else the full-resolution logits alone. Both attributes may be changed after
    construction: inference turns ``deep_supervision`` off, and a trainer whose lowest-resolution loss
    weight is 0 sets ``num_outputs`` so that head is never computed.
    """

    negative_slope: ClassVar[float] = 1e-2  # He init for LeakyReLU(1e-2): nnU-Net's InitWeights_He(1e-2)
    # For --pretrained (autoseg.training.pretrained): the segmentation heads, re-initialised when the labels
    # differ. ``stem_weight_names`` and ``encoder_parameters`` below complete what it asks of a network.
    head_prefixes: ClassVar[tuple[str, ...]] = ("heads.",)
    decoder_prefixes: ClassVar[tuple[str, ...]] = ("decoder.", "upsample.", "heads.")

    def __init__(
        self, network: NetworkPlan, num_input_channels: int, num_classes: int, deep_supervision: bool = True
    ) -> None:
        super().__init__()
        check_plan(network)
        features, kernels, strides = network.features_per_stage, network.kernel_sizes, network.strides
        self.deep_supervision = deep_supervision
        self.num_outputs: int | None = None  # None: every decoder stage's output
        self.shape_must_be_divisible_by = network.shape_must_be_divisible_by
        in_channels = num_input_channels
        encoder = []
        for n_conv, out_channels, kernel, stride in zip(network.n_conv_per_stage, features, kernels, strides):
            encoder.append(conv_stack(n_conv, in_channels, out_channels, kernel, stride))
            in_channels = out_channels
        self.encoder = nn.ModuleList(encoder)
        self.decoder, self.upsample, self.heads = plain_decoder(network, num_classes)
        self.apply(lambda m: init_he(m, self.negative_slope))

    @property
    def stem_weight_names(self) -> tuple[str, ...]:
        """The weight that sees the input channels: the first conv registered (also a subclass's stem)."""
        return (next(name for name, m in self.named_modules() if isinstance(m, tuple(_CONV.values()))) + ".weight",)

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """What a fine-tuning trainer freezes: every parameter outside the decoder (a subclass's stem too)."""
        return (p for name, p in self.named_parameters() if not name.startswith(self.decoder_prefixes))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        spatial = tuple(x.shape[2:])
        if any(s % d for s, d in zip(spatial, self.shape_must_be_divisible_by)):
            raise AutosegError(
                f"input of spatial shape {spatial} to a U-Net whose strides need multiples of"
                f" {self.shape_must_be_divisible_by}: pad the input or choose such a patch size"
            )
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        n_decoder = len(self.decoder)
        first_head = n_decoder - self.wanted_outputs()  # decoder stages below this one have no wanted output
        outputs = []
        for i, (up, stage, head) in enumerate(zip(self.upsample, self.decoder, self.heads)):
            x = stage(torch.cat((up(x), skips[-(i + 2)]), dim=1))
            if i >= first_head:
                outputs.append(head(x))
        outputs.reverse()  # full resolution first
        return outputs if self.deep_supervision else outputs[0]
