"""Named network factories and the one path that builds a network from a plan.

Training, inference and the planner's memory estimate all go through ``build_network``, so a plan and
the network trained from it can never disagree: the estimate is counted on the very module a trainer
would get, built on the ``meta`` device (shapes only, no memory) and run on a meta tensor.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence

import torch
from torch import nn

from autoseg.errors import AutosegError
from autoseg.plan import NetworkPlan
from autoseg.registry import Registry

# (network plan, input channels, classes, deep supervision) -> module
NetworkFactory = Callable[[NetworkPlan, int, int, bool], nn.Module]

NETWORKS: Registry[NetworkFactory] = Registry("network")
register_network = NETWORKS.register

# What nnU-Net's compute_conv_feature_map_size counts: the output of every conv and transposed conv.
COUNTED_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# Modules that return a tensor of their input's shape. On the meta device they cost up to 1 ms each
# (instance norm runs as a decomposition) against 0.03 ms for a conv, so the count skips them: a
# six-stage 3D U-Net is counted in 6 ms instead of 40, and no shape can change.
SHAPE_PRESERVING_MODULES = (
    nn.modules.instancenorm._InstanceNorm,
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.dropout._DropoutNd,
    nn.LeakyReLU,
    nn.ReLU,
    nn.PReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
)


def build_network(
    network: NetworkPlan, num_input_channels: int, num_classes: int, deep_supervision: bool = True
) -> nn.Module:
    """The module the plan describes, from the factory registered as ``network.architecture``."""
    factory = NETWORKS.get(network.architecture)
    return factory(network, num_input_channels, num_classes, deep_supervision)


def feature_map_elements(
    network_plan: NetworkPlan,
    patch_size: Sequence[int],
    num_input_channels: int,
    num_classes: int,
    deep_supervision: bool = False,
) -> int:
    """Elements of every conv and transposed-conv output at batch size 1: nnU-Net's memory proxy.

    Counted by running the network that ``build_network`` returns, so it counts what
    dynamic_network_architectures' compute_conv_feature_map_size counts for a plain U-Net (each conv
    block, each transposed conv, the segmentation heads that are computed) and whatever a plug-in
    architecture computes. nnU-Net's planner builds its network without deep supervision, so by default
    only the full-resolution head is counted. The input itself is not counted.

    A network whose memory is not mostly conv outputs (attention, say) defines its own estimate as a method
    ``feature_map_elements(patch_size) -> int`` in the same units; the module built here is asked instead of
    counted.
    """
    patch = tuple(int(p) for p in patch_size)
    return _feature_map_elements(network_plan, patch, num_input_channels, num_classes, deep_supervision)


@functools.lru_cache(maxsize=4096)  # the planner asks again for the same patch while it shrinks others
def _feature_map_elements(
    network_plan: NetworkPlan, patch: tuple[int, ...], num_input_channels: int, num_classes: int, deep_supervision: bool
) -> int:
    counter = _meta_network(network_plan, num_input_channels, num_classes, deep_supervision)
    return counter.count(patch)


class _MetaCounter:
    """A network on the meta device whose forward hooks add up the elements of conv outputs."""

    def __init__(self, module: nn.Module, num_input_channels: int, architecture: str) -> None:
        self.module = module
        self.num_input_channels = num_input_channels
        self.architecture = architecture
        self.total = 0
        self.lock = threading.Lock()  # the hooks share one running total
        # The network's own estimate, when it has one (see feature_map_elements): no forward pass at all.
        self.estimate: Callable[[Sequence[int]], int] | None = getattr(module, "feature_map_elements", None)
        if self.estimate is not None:
            return
        for m in module.modules():
            if isinstance(m, COUNTED_MODULES):
                m.register_forward_hook(self._hook)
            elif isinstance(m, SHAPE_PRESERVING_MODULES):
                m.forward = _identity  # type: ignore[method-assign]

    def _hook(self, module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        self.total += output.numel()

    def count(self, patch: tuple[int, ...]) -> int:
        if self.estimate is not None:
            try:
                return int(self.estimate(patch))
            except (RuntimeError, ValueError) as exc:
                raise AutosegError(f"network {self.architecture!r} cannot run on a patch of {patch}: {exc}") from exc
        x = torch.empty((1, self.num_input_channels, *patch), device="meta")
        with self.lock, torch.no_grad():
            self.total = 0
            try:
                self.module(x)
            except (RuntimeError, ValueError) as exc:
                raise AutosegError(f"network {self.architecture!r} cannot run on a patch of {patch}: {exc}") from exc
            return self.total


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@functools.lru_cache(maxsize=64)
def _meta_network(
    network_plan: NetworkPlan, num_input_channels: int, num_classes: int, deep_supervision: bool
) -> _MetaCounter:
    with torch.device("meta"):
        module = build_network(network_plan, num_input_channels, num_classes, deep_supervision)
    return _MetaCounter(module.eval(), num_input_channels, network_plan.architecture)
