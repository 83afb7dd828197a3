"""The trained models that ``best.json`` names, loaded once for a whole prediction run.

Each member (a trainer x planner x configuration) is read from its folder under the results (or bundle)
folder: ``plan.json`` for preprocessing and the network's shape, and one weight file per fold
(``checkpoint_final.pt`` or ``model.safetensors``, see ``autoseg.inference.weights``). A member's folds
become one module, ``FoldAverage``, whose output is the mean of the folds' logits, so the sliding window
cuts, weights and accumulates every tile once for all folds. ``PassProbabilities`` wraps it for
``--save-uncertainty``: it also returns the folds' mean softmax, as K more channels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoseg import serialization
from autoseg.errors import AutosegError
from autoseg.evaluation.best import PLAN_FILE, BestChoice, ModelRef
from autoseg.plan import Configuration, Plan


class FoldAverage(nn.Module):
    """The mean of the folds' logits for one input batch.

    nnU-Net averages the logits of the folds too (``predict_logits_from_preprocessed_data``), but runs one
    sliding window per fold; the Gaussian-weighted mean over tiles is linear, so averaging inside each tile
    gives the same logits with one pass of tile cutting and accumulation instead of one per fold.
    """

    def __init__(self, networks: Sequence[nn.Module]) -> None:
        super().__init__()
        if not networks:
            raise ValueError("FoldAverage needs at least one network")
        self.folds = nn.ModuleList(networks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _mean_logits(self.fold_logits(x))

    def fold_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each fold's full-resolution logits (B, K, *patch) for ``x`` (B, C, *patch)."""
        return [_full_resolution(network(x)) for network in self.folds]


def _mean_logits(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    total = logits[0]
    for more in logits[1:]:
        total = total + more
    return total / len(logits) if len(logits) > 1 else total


def _full_resolution(output: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


class PassProbabilities(nn.Module):
    """The folds' mean logits and their mean softmax, as one output of 2K channels (B, 2K, *patch).

    For the uncertainty map (``--save-uncertainty``): its entropy must be that of the class probabilities
    averaged over every pass (fold x mirroring), which the softmax of the averaged logits is not: two folds
    sure of different classes average to undecided probabilities, but their logits may average to a
    confident softmax. The sliding window averages every output channel over the mirrored passes and
    weights it over the tiles linearly, channel by channel, so channels K .. 2K-1 come out as the Gaussian-
    weighted mean over fold x mirror passes of each pass's softmax, and channels 0 .. K-1 as exactly the
    logits ``FoldAverage`` alone gives (the same arithmetic on the same values): the segmentation does not
    change. The price is K more channels in the sliding window's accumulator and its result (one more
    (K, *shape) volume, in the accumulator's dtype) and one softmax per fold, mirrored copy and tile.
    """

    # The smallest class probability a pass gives: each pass's logits are clipped to log(this) below their
    # maximum before the softmax. A trained network's logits often differ by 90 or more (far from the
    # body), whose softmax lies below float32's smallest normal number (1.2e-38), and x86 CPUs compute with
    # such denormal numbers several times slower (measured, 1 thread: softmax of a (1, 3, 16, 20, 20) tile
    # 20 us with normal logits, 86 us with logit gaps of ~100; clipped, 25 us either way). From 1e-8 on,
    # the products the sliding window's running mean forms with weight ratios (down to ~1e-12) stay
    # normal too. The price: a certain voxel's entropy is (K - 1) * 1e-8 * log(1e8) ~ (K - 1) * 1.8e-7
    # instead of 0 (normalised, under 1e-6 for K <= 14), far below what a clinician could read off a map.
    probability_floor: float = 1e-8

    def __init__(self, folds: FoldAverage) -> None:
        super().__init__()
        self.fold_average = folds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fold_average.fold_logits(x)
        return torch.cat([_mean_logits(logits).float(), _mean_logits([self._softmax(f) for f in logits])], dim=1)

    def _softmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax over the classes in float32 (also under autocast: the entropy is about probabilities near
        0 and 1), with the logits clipped to log(``probability_floor``) below their maximum."""
        logits = logits.float()
        shifted = logits - logits.amax(dim=1, keepdim=True)  # a new tensor: the logits stay as they are
        shifted.clamp_(min=math.log(self.probability_floor)).exp_()
        return shifted.div_(shifted.sum(dim=1, keepdim=True))


@dataclass
class Member:
    """One model of the chosen candidate, ready to predict: its plan, configuration and averaged folds."""

    ref: ModelRef
    plan: Plan
    configuration: Configuration
    network: FoldAverage  # on the prediction device, in eval mode
    mirror_axes: tuple[int, ...]
    folds: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        return len(self.plan.labels)


def load_members(
    model_dir: Path, best: BestChoice, device: torch.device, folds: Sequence[int] | None = None
) -> list[Member]:
    """Every member of ``best`` with ``folds`` (default: best.json's), networks on ``device``."""
    chosen = tuple(int(f) for f in folds) if folds is not None else tuple(best.folds)
    if not chosen:
        raise AutosegError(f"{model_dir / 'best.json'}: no folds to predict with. Fix: pass --folds 0 1 2 3 4")
    return [_load_member(model_dir, ref, best, chosen, device) for ref in best.members]


def _load_member(
    model_dir: Path, ref: ModelRef, best: BestChoice, folds: tuple[int, ...], device: torch.device
) -> Member:
    from autoseg.inference.weights import load_fold_weights
    from autoseg.networks import build_network

    member_dir = model_dir / ref.folder
    plan_file = member_dir / PLAN_FILE
    if not plan_file.is_file():
        raise AutosegError(
            f"{plan_file}: missing. best.json names model {ref.folder!r}, but its folder holds no plan."
            " Fix: point -m at the results/<dataset> folder (or bundle) the model was trained into"
        )
    plan = serialization.load(Plan, plan_file)
    configuration = plan.configuration(ref.configuration)
    if plan.labels != best.labels:
        raise AutosegError(
            f"{plan_file}: labels {plan.labels} differ from best.json's {best.labels}; every member of an ensemble"
            " must predict the same labels. Fix: run find-best again"
        )
    num_channels = len(best.channel_names)
    networks: list[nn.Module] = []
    mirror_axes: tuple[int, ...] | None = None
    for fold in folds:
        fold_dir = member_dir / f"fold_{fold}"
        state, metadata = load_fold_weights(fold_dir, best.checkpoint)
        _check_metadata(fold_dir, metadata, ref, num_channels)
        network = build_network(configuration.network, num_channels, len(plan.labels), deep_supervision=False)
        _load_state(network, state, fold_dir)
        networks.append(network)
        # The folds of one model are trained by one trainer, so they share mirror axes; nnU-Net too takes
        # them from the first checkpoint.
        if mirror_axes is None:
            mirror_axes = tuple(int(a) for a in metadata.get("mirror_axes", range(configuration.dim)))
    fold_average = FoldAverage(networks).to(device).eval()
    return Member(ref, plan, configuration, fold_average, mirror_axes or (), folds)


def _check_metadata(fold_dir: Path, metadata: dict[str, Any], ref: ModelRef, num_channels: int) -> None:
    configuration = metadata.get("configuration")
    if configuration is not None and configuration != ref.configuration:
        raise AutosegError(
            f"{fold_dir}: its weights were trained for configuration {configuration!r}, but the folder is"
            f" {ref.folder!r}. Fix: move the fold into the model folder it belongs to"
        )
    channels = metadata.get("num_input_channels")
    if channels is not None and int(channels) != num_channels:
        raise AutosegError(
            f"{fold_dir}: the network takes {channels} input channel(s), best.json declares {num_channels}."
            " Fix: run find-best again on the results this model belongs to"
        )


def _load_state(network: nn.Module, state: dict[str, torch.Tensor], fold_dir: Path) -> None:
    """Load strictly: the plain U-Net has its deep-supervision heads whether or not they are used, so a
    network trained with deep supervision has exactly the keys of the one built without it. Only the
    wrappers of torch.compile / DDP are unwrapped, in case a plug-in trainer saved the wrapped module."""
    state = {_unwrapped(key): value for key, value in state.items()}
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        expected = set(network.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        detail = f"missing {missing[:5]}, unexpected {unexpected[:5]}" if missing or unexpected else str(exc)[:300]
        raise AutosegError(
            f"{fold_dir}: its weights do not fit the network of plan.json ({detail}). Fix: predict with the plan"
            " the fold was trained with (the model folder's plan.json), or retrain the fold"
        ) from None


def _unwrapped(key: str) -> str:
    for prefix in ("_orig_mod.", "module."):
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key
