"""What every built-in network promises the rest of autoseg, checked on each one registered.

Training needs the deep-supervision outputs, the planner a memory estimate, fine-tuning the names of the
segmentation heads and of the weights that see the input channels, and the finetune trainer an encoder to
freeze. A new network in ``autoseg/networks`` is picked up here automatically.
"""

from __future__ import annotations

import pytest
import torch

from autoseg.networks import NETWORKS, build_network, feature_map_elements
from autoseg.plan import NetworkPlan
from autoseg.training import pretrained as pre
from autoseg.training.pretrained import PretrainedWeights

BUILT_IN = [name for name, factory in NETWORKS.items() if factory.__module__.startswith("autoseg.networks.")]
PATCH = (16, 32, 32)


def small_plan(architecture: str) -> NetworkPlan:
    return NetworkPlan(
        architecture=architecture,
        features_per_stage=(8, 16, 32),
        kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3)),
        strides=((1, 1, 1), (1, 2, 2), (2, 2, 2)),
        n_conv_per_stage=(1, 2, 2),
        n_conv_per_stage_decoder=(1, 1),
    )


def test_the_built_in_networks_are_all_here() -> None:
    assert {"plain_unet", "resenc_unet", "swin_unet"} <= set(BUILT_IN)


@pytest.mark.parametrize("architecture", BUILT_IN)
def test_network_contract(architecture: str) -> None:
    torch.manual_seed(0)
    plan = small_plan(architecture)
    network = build_network(plan, 2, 3, deep_supervision=True)
    outputs = network(torch.randn(2, 2, *PATCH))
    assert isinstance(outputs, list | tuple) and outputs[0].shape == (2, 3, *PATCH)  # full resolution first
    plain = build_network(plan, 2, 3, deep_supervision=False)
    assert plain(torch.randn(1, 2, *PATCH)).shape == (1, 3, *PATCH)
    assert feature_map_elements(plan, PATCH, 2, 3) > feature_map_elements(plan, (16, 16, 16), 2, 3) > 0

    state = network.state_dict()
    stems = pre.stem_names(network)
    assert stems and all(name in state and state[name].shape[1] == 2 for name in stems)
    heads = pre.head_names(network, 3)
    assert heads and all(state[name].shape[0] == 3 for name in heads)
    encoder = {id(p) for p in pre.encoder_parameters(network)}
    named = dict(network.named_parameters())
    assert encoder and not encoder & {id(named[n]) for n in heads if n in named}
    assert len(encoder) < len(named)  # something (the decoder) stays trainable

    # Fine-tuning a 2-channel, 3-label model from a 1-channel, 2-label one of the same topology.
    source = build_network(plan, 1, 2, deep_supervision=True)
    weights = PretrainedWeights(source.state_dict(), {"labels": {"background": 0, "a": 1}}, source="memory")
    summary = pre.transfer_state(network, weights, {"background": 0, "a": 1, "b": 2}, plan)
    assert summary.input_channels == (1, 2) and set(summary.reinitialised) == heads
    loaded = network.state_dict()
    untouched = next(n for n in loaded if n not in heads and n not in stems and loaded[n].is_floating_point())
    torch.testing.assert_close(loaded[untouched], source.state_dict()[untouched])
