"""Segmentation networks: a registry of named factories and nnU-Net's plain U-Net (``plain_unet``).

``build_network(plan.network, ...)`` is the one way to turn a plan into a module; the planner's memory
estimate, ``feature_map_elements``, runs the same build on the meta device. A lab's own architecture
registers with ``@register_network("name")`` and is named in the plan's ``network.architecture``.
"""

from autoseg.networks.registry import NETWORKS, NetworkFactory, build_network, feature_map_elements, register_network
from autoseg.networks.resenc import ResEncUNet  # noqa: F401  registers "resenc_unet"
from autoseg.networks.swin import SwinUNet  # noqa: F401  registers "swin_unet"
from autoseg.networks.unet import PlainUNet

__all__ = ["NETWORKS", "NetworkFactory", "PlainUNet", "build_network", "feature_map_elements", "register_network"]
