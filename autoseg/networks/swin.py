"""A Swin-transformer U-Net (``swin_unet``) in the spirit of SwinUNETR (Hatamizadeh et al. 2022), 2D and 3D.

Geometry comes from the plan, as for the plain U-Net, so any planner's plan can be trained with it: stage
``i`` works at the patch over the cumulative stride ``strides[0] * ... * strides[i]`` with
``features_per_stage[i]`` channels, and the decoder gives one output per decoder stage at the same
resolutions as ``PlainUNet`` (full resolution first), so deep supervision and inference treat both alike.

Encoder. Stage 0 is a residual conv block on the raw input (SwinUNETR's ``encoder1``). Stage 1 embeds the
raw input in patches (a conv with kernel = stride = ``strides[0] * strides[1]``); each later stage first
merges patches (Swin's PatchMerging, generalised to the plan's stride per axis: the ``prod(stride)``
neighbours are concatenated, normalised and projected, so a stride of (1, 2, 2) merges in-plane only).
Every transformer stage runs ``blocks_per_stage`` Swin blocks (LayerNorm -> window attention -> residual,
LayerNorm -> MLP -> residual), alternating plain windows (W-MSA) and windows shifted by half a window
(SW-MSA: a cyclic roll plus a mask that keeps tokens rolled across the border apart). Attention uses
``scaled_dot_product_attention`` with a learned relative position bias (Swin, Liu et al. 2021).

Windows. A window must tile the feature map, whose edges are the patch over a stride: per axis the window
is the whole edge when it is at most ``max_window`` long, else the largest divisor of the edge that is at
most ``max_window``, so no padding is ever needed (nnU-Net-style topologies leave bottleneck edges of 4-7,
and every stage's edge is such a number times a power of two, so windows are 4-7 long). An axis that fits
in one window is not shifted, as in MONAI's SwinUNETR.

Decoder. Each transformer stage's output (LayerNorm) passes a residual conv block (SwinUNETR's
``encoder2..4`` and ``encoder10``); from the bottleneck up a transposed conv (kernel = stride = the stride
of the stage it returns to), concatenation with that stage's skip, a residual conv block and a 1x1 head.

Memory. ``feature_map_elements(patch)`` counts this network's activations in the units of nnU-Net's conv
proxy, which the planner compares with its budget: every conv and transposed-conv output (as nnU-Net), every
linear output (qkv, projection, MLP, patch merging: each is followed by norm / activation tensors exactly
as a conv is, which the proxy leaves implied) and every attention matrix (windows x heads x N^2 per block).
The matrices are counted because the bias and shift mask are a float ``attn_mask``, which rules out the
flash kernel; the math kernel (CPU, MPS, older GPUs) materialises them, and counting them keeps the planner
from choosing a patch that fits only on the best-case kernel. Measured on the CPU (the bytes autograd saves
for the backward pass, 5-stage 3D plans with nnU-Net widths, 32x64x64 and 48^3 patches): 7.2-7.6 bytes per
counted element here against 9.1-9.3 for the plain U-Net, so the estimate is in the same units and errs on
the safe side. The count is arithmetic on the plan (no forward pass); a test checks it against hooks on a
real forward.

Not taken from the plan: ``n_conv_per_stage`` / ``n_conv_per_stage_decoder`` (the block counts are this
class's attributes, after SwinUNETR) and the transformer stages' kernel sizes (the skip and decoder conv
blocks use the plan's).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from autoseg.errors import AutosegError
from autoseg.networks.registry import register_network
from autoseg.networks.unet import (
    _CONV,
    _TRANSPOSED_CONV,
    ConvNorm,
    ConvNormAct,
    DeepSupervisionOutputs,
    check_plan,
    init_he,
)
from autoseg.plan import NetworkPlan

# --- windows ---------------------------------------------------------------------------------------


def window_size(spatial: Sequence[int], max_window: int) -> tuple[int, ...]:
    """Per axis: the whole edge if it fits in ``max_window``, else its largest divisor up to ``max_window``."""
    return tuple(s if s <= max_window else max(d for d in range(1, max_window + 1) if s % d == 0) for s in spatial)


def shift_size(spatial: Sequence[int], window: Sequence[int]) -> tuple[int, ...]:
    """Half a window along every axis that holds more than one window; no shift where one window covers it."""
    return tuple(w // 2 if s > w else 0 for s, w in zip(spatial, window))


def window_partition(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """(B, *spatial, C) -> (B, windows, tokens per window, C), windows in row-major order."""
    b, *spatial, c = x.shape
    dim = len(window)
    split = [v for s, w in zip(spatial, window) for v in (s // w, w)]
    x = x.view(b, *split, c)
    order = [0, *range(1, 2 * dim, 2), *range(2, 2 * dim + 1, 2), 2 * dim + 1]
    return x.permute(order).reshape(b, -1, math.prod(window), c)


def window_reverse(windows: torch.Tensor, window: Sequence[int], spatial: Sequence[int]) -> torch.Tensor:
    """The inverse of ``window_partition``: (B, windows, tokens, C) -> (B, *spatial, C)."""
    b, c, dim = windows.shape[0], windows.shape[-1], len(window)
    counts = [s // w for s, w in zip(spatial, window)]
    x = windows.reshape(b, *counts, *window, c)
    order = [0, *(v for a in range(dim) for v in (1 + a, 1 + dim + a)), 2 * dim + 1]
    return x.permute(order).reshape(b, *spatial, c)


def shifted_window_mask(spatial: Sequence[int], window: Sequence[int], shift: Sequence[int]) -> torch.Tensor:
    """Which token of a rolled window may attend to which: (windows, N, N) booleans, True = allowed.

    After rolling the map by ``-shift``, the last window along an axis holds tokens from both ends of the
    map. Swin labels three regions per axis, [0, S - w), [S - w, S - shift) and [S - shift, S), and lets
    two tokens attend to each other only when they share the region on every axis.
    """
    dim = len(spatial)
    regions = torch.zeros(spatial, dtype=torch.long)
    for axis, (s, w, sh) in enumerate(zip(spatial, window, shift)):
        along = torch.zeros(s, dtype=torch.long)
        if sh:
            along[s - w : s - sh] = 1
            along[s - sh :] = 2
        view = [1] * dim
        view[axis] = s
        regions = regions * 3 + along.view(view)
    ids = window_partition(regions[None, ..., None], window)[0, ..., 0]  # (windows, N)
    return ids[:, :, None] == ids[:, None, :]


@functools.lru_cache(maxsize=256)
def _cached_mask(
    spatial: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    return shifted_window_mask(spatial, window, shift).to(device)


@functools.lru_cache(maxsize=256)
def _relative_position_index(window: tuple[int, ...], max_window: int, device: torch.device) -> torch.Tensor:
    """(N, N) rows of the bias table: the offset between two tokens of a window, shifted to be >= 0."""
    coords = torch.stack(torch.meshgrid(*(torch.arange(w) for w in window), indexing="ij")).flatten(1).T
    offset = coords[:, None, :] - coords[None, :, :] + (max_window - 1)  # each in [0, 2 * max_window - 2]
    radix = torch.tensor([(2 * max_window - 1) ** (len(window) - 1 - a) for a in range(len(window))])
    return (offset * radix).sum(-1).to(device)


# --- transformer blocks ----------------------------------------------------------------------------


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with Swin's learned relative position bias."""

    def __init__(self, channels: int, heads: int, dim: int, max_window: int) -> None:
        super().__init__()
        self.heads, self.max_window = heads, max_window
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        # One bias per head and relative offset; windows up to max_window long need 2 * max_window - 1 offsets.
        self.relative_bias = nn.Parameter(torch.zeros((2 * max_window - 1) ** dim, heads))

    def forward(self, windows: torch.Tensor, window: tuple[int, ...], mask: torch.Tensor | None) -> torch.Tensor:
        b, n_windows, n, c = windows.shape
        qkv = self.qkv(windows).view(b, n_windows, n, 3, self.heads, c // self.heads)
        qkv = qkv.permute(3, 0, 1, 4, 2, 5).contiguous()  # (3, B, windows, heads, N, head channels)
        index = _relative_position_index(window, self.max_window, windows.device)
        bias = self.relative_bias[index.flatten()].view(n, n, self.heads).permute(2, 0, 1)  # (heads, N, N)
        # 4-D inputs whose mask broadcasts over the leading axis, as the fused kernels want: (B * windows,
        # heads) with the bias alone, (B, windows * heads) with the shift mask, which differs per window.
        if mask is None:
            q, k, v = qkv.view(3, b * n_windows, self.heads, n, -1).unbind(0)
        else:  # a token always sees itself, so no row is all -inf
            bias = bias.masked_fill(~mask[:, None], float("-inf")).flatten(0, 1)
            q, k, v = qkv.view(3, b, n_windows * self.heads, n, -1).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        out = out.view(b, n_windows, self.heads, n, -1).transpose(2, 3)
        return self.proj(out.reshape(b, n_windows, n, c))


class SwinBlock(nn.Module):
    """LayerNorm -> (shifted) window attention -> residual; LayerNorm -> MLP -> residual. Channels last."""

    mlp_ratio: ClassVar[int] = 4  # Swin and SwinUNETR: MLP hidden width 4x the channels

    def __init__(self, channels: int, heads: int, dim: int, max_window: int, shifted: bool) -> None:
        super().__init__()
        self.max_window, self.shifted = max_window, shifted
        self.norm1 = nn.LayerNorm(channels)
        self.attention = WindowAttention(channels, heads, dim, max_window)
        self.norm2 = nn.LayerNorm(channels)
        hidden = self.mlp_ratio * channels
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = tuple(x.shape[1:-1])
        window = window_size(spatial, self.max_window)
        shift = shift_size(spatial, window) if self.shifted else (0,) * len(spatial)
        dims = tuple(range(1, len(spatial) + 1))
        h = self.norm1(x)
        mask = None
        if any(shift):
            h = torch.roll(h, tuple(-s for s in shift), dims)
            mask = _cached_mask(spatial, window, shift, x.device)
        h = window_reverse(self.attention(window_partition(h, window), window, mask), window, spatial)
        if any(shift):
            h = torch.roll(h, shift, dims)
        x = x + h
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """Swin's patch merging with the plan's stride per axis: concatenate each block of neighbours, project."""

    def __init__(self, in_channels: int, out_channels: int, stride: Sequence[int]) -> None:
        super().__init__()
        self.stride = tuple(stride)
        merged = math.prod(self.stride) * in_channels
        self.norm = nn.LayerNorm(merged)
        self.reduction = nn.Linear(merged, out_channels, bias=False)  # Swin's reduction has no bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, *spatial, c = x.shape
        dim = len(spatial)
        x = x.view(b, *(v for s, st in zip(spatial, self.stride) for v in (s // st, st)), c)
        x = x.permute(0, *range(1, 2 * dim, 2), *range(2, 2 * dim + 1, 2), 2 * dim + 1)
        x = x.reshape(b, *(s // st for s, st in zip(spatial, self.stride)), -1)
        return self.reduction(self.norm(x))


# --- convolutional parts -----------------------------------------------------------------------------


class ResidualConvBlock(nn.Module):
    """MONAI's UnetResBlock: conv-norm-act, conv-norm, plus a 1x1 conv-norm shortcut when the shape changes."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: Sequence[int], stride: Sequence[int] = ()
    ) -> None:
        super().__init__()
        dim = len(kernel_size)
        stride = tuple(stride) or (1,) * dim
        self.conv1 = ConvNormAct(in_channels, out_channels, kernel_size, stride)
        self.conv2 = ConvNorm(out_channels, out_channels, kernel_size)
        self.shortcut: nn.Module | None = None
        if in_channels != out_channels or any(s != 1 for s in stride):
            self.shortcut = ConvNorm(in_channels, out_channels, (1,) * dim, stride)
        self.act = nn.LeakyReLU(ConvNormAct.negative_slope, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.shortcut is None else self.shortcut(x)
        return self.act(self.conv2(self.conv1(x)) + residual)

    def conv_outputs(self) -> int:
        """Conv outputs per output voxel, per channel: two convs, plus the shortcut's."""
        return 2 + (self.shortcut is not None)


def heads_for(channels: int, head_channels: int) -> int:
    """``channels // head_channels`` heads (at least one), lowered until it divides the channels."""
    heads = max(1, channels // head_channels)
    while channels % heads:
        heads -= 1
    return heads


# --- the network ---------------------------------------------------------------------------------------


@register_network("swin_unet")
class SwinUNet(DeepSupervisionOutputs, nn.Module):
    """Swin-transformer encoder, residual conv decoder (SwinUNETR-like), 2D or 3D, shaped by the plan.

    ``forward`` returns, with ``deep_supervision`` on, one logits tensor per decoder stage, full resolution
    first, else the full-resolution logits; ``num_outputs`` skips the lowest-resolution heads, as in
    ``PlainUNet``. ``feature_map_elements(patch)`` is the planner's memory estimate (see the module doc).
    """

    blocks_per_stage: ClassVar[int] = 2  # SwinUNETR's depths (2, 2, 2, 2)
    max_window: ClassVar[int] = 7  # SwinUNETR's window size 7
    head_channels: ClassVar[int] = 32  # Swin-T: 96 channels, 3 heads
    negative_slope: ClassVar[float] = 1e-2  # He init of the convs for LeakyReLU(1e-2), as PlainUNet
    linear_init_std: ClassVar[float] = 0.02  # Swin: truncated normal, std 0.02, for linears and the bias table
    # What fine-tuning (autoseg.training.pretrained) asks of a network: the segmentation heads, re-initialised
    # when the labels differ, and the encoder, frozen by the finetune trainer (the Swin stages and the conv stem
    # on the raw input; the skip blocks, upsampling and decoder learn the new task).
    head_prefixes: ClassVar[tuple[str, ...]] = ("heads.",)
    decoder_prefixes: ClassVar[tuple[str, ...]] = ("skips.", "upsample.", "decoder.", "heads.")

    def __init__(
        self, network: NetworkPlan, num_input_channels: int, num_classes: int, deep_supervision: bool = True
    ) -> None:
        super().__init__()
        dim = check_plan(network)
        features, kernels, strides = network.features_per_stage, network.kernel_sizes, network.strides
        self.deep_supervision = deep_supervision
        self.num_outputs: int | None = None  # None: every decoder stage's output
        self.num_classes = num_classes
        self.features, self.strides = tuple(features), tuple(tuple(s) for s in strides)
        self.shape_must_be_divisible_by = network.shape_must_be_divisible_by
        self.stem = ResidualConvBlock(num_input_channels, features[0], kernels[0], strides[0])
        embed_stride = tuple(a * b for a, b in zip(strides[0], strides[1]))
        self.patch_embed = _CONV[dim](num_input_channels, features[1], embed_stride, embed_stride, 0, bias=True)
        self.merges = nn.ModuleList(
            PatchMerging(features[i - 1], features[i], strides[i]) for i in range(2, len(features))
        )
        self.stages = nn.ModuleList(
            nn.Sequential(
                *(
                    SwinBlock(f, heads_for(f, self.head_channels), dim, self.max_window, shifted=b % 2 == 1)
                    for b in range(self.blocks_per_stage)
                )
            )
            for f in features[1:]
        )
        self.stage_norms = nn.ModuleList(nn.LayerNorm(f) for f in features[1:])
        self.skips = nn.ModuleList(ResidualConvBlock(f, f, k) for f, k in zip(features[1:], kernels[1:]))
        upsample, decoder, heads = [], [], []
        for i in range(network.num_stages - 1):  # lowest resolution first
            skip = network.num_stages - 2 - i
            stride = strides[skip + 1]
            upsample.append(_TRANSPOSED_CONV[dim](features[skip + 1], features[skip], stride, stride, bias=True))
            decoder.append(ResidualConvBlock(2 * features[skip], features[skip], kernels[skip]))
            heads.append(_CONV[dim](features[skip], num_classes, 1, 1, 0, bias=True))
        self.upsample = nn.ModuleList(upsample)
        self.decoder = nn.ModuleList(decoder)
        self.heads = nn.ModuleList(heads)
        self.apply(self._init)

    def _init(self, module: nn.Module) -> None:
        init_he(module, self.negative_slope)
        if isinstance(module, nn.Linear) and not module.weight.is_meta:
            nn.init.trunc_normal_(module.weight, std=self.linear_init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        if isinstance(module, WindowAttention) and not module.relative_bias.is_meta:
            nn.init.trunc_normal_(module.relative_bias, std=self.linear_init_std)

    def check_patch(self, spatial: Sequence[int]) -> None:
        divisor = self.shape_must_be_divisible_by
        if len(spatial) != len(divisor) or any(s < 1 or s % d for s, d in zip(spatial, divisor)):
            raise AutosegError(
                f"patch {tuple(spatial)} for swin_unet with strides {list(self.strides)}: every edge must be a"
                f" positive multiple of {divisor}; choose such a patch_size in the plan (or pad the input)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        self.check_patch(tuple(x.shape[2:]))
        skips = [self.stem(x)]
        tokens = self.patch_embed(x).movedim(1, -1)
        for i, (stage, norm, skip) in enumerate(zip(self.stages, self.stage_norms, self.skips)):
            if i > 0:
                tokens = self.merges[i - 1](tokens)
            tokens = stage(tokens)
            skips.append(skip(norm(tokens).movedim(-1, 1).contiguous()))
        x = skips.pop()
        first_head = len(self.decoder) - self.wanted_outputs()
        outputs = []
        for i, (up, block, head) in enumerate(zip(self.upsample, self.decoder, self.heads)):
            x = block(torch.cat((up(x), skips[-(i + 1)]), dim=1))
            if i >= first_head:
                outputs.append(head(x))
        outputs.reverse()  # full resolution first
        return outputs if self.deep_supervision else outputs[0]

    @property
    def stem_weight_names(self) -> tuple[str, ...]:
        """The weights that see the input channels: the conv stem's two entries and the patch embedding."""
        names = ["stem.conv1.conv.weight", "patch_embed.weight"]
        if self.stem.shortcut is not None:
            names.append("stem.shortcut.conv.weight")
        return tuple(names)

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """What a fine-tuning trainer freezes: every parameter outside the decoder."""
        return (p for name, p in self.named_parameters() if not name.startswith(self.decoder_prefixes))

    def feature_map_elements(self, patch_size: Sequence[int]) -> int:
        """Activations at batch size 1 in the planner's units: conv, linear and attention-matrix elements."""
        patch = tuple(int(p) for p in patch_size)
        self.check_patch(patch)
        sizes, cumulative = [], [1] * len(patch)
        for stride in self.strides:
            cumulative = [c * s for c, s in zip(cumulative, stride)]
            sizes.append(tuple(p // c for p, c in zip(patch, cumulative)))
        voxels = [math.prod(s) for s in sizes]
        f = self.features
        total = self.stem.conv_outputs() * f[0] * voxels[0] + f[1] * voxels[1]  # stem, patch embedding
        for i in range(1, len(f)):
            total += f[i] * voxels[i] * (i > 1)  # patch merging's projection
            heads, n = heads_for(f[i], self.head_channels), math.prod(window_size(sizes[i], self.max_window))
            # qkv, projection, MLP in and out; then windows * heads * N^2 = heads * voxels * N attention scores
            per_block = (3 + 1 + SwinBlock.mlp_ratio + 1) * f[i] * voxels[i] + heads * voxels[i] * n
            total += self.blocks_per_stage * per_block
        skips = cast(list[ResidualConvBlock], list(self.skips))
        total += sum(block.conv_outputs() * c * v for block, c, v in zip(skips, f[1:], voxels[1:]))
        first_head = len(self.decoder) - self.wanted_outputs()
        for i, block in enumerate(cast(list[ResidualConvBlock], list(self.decoder))):
            skip = len(f) - 2 - i
            total += (1 + block.conv_outputs()) * f[skip] * voxels[skip]  # transposed conv, block
            total += self.num_classes * voxels[skip] * (i >= first_head)
        return total
