"""Starting a run from another model's weights (``--pretrained``), and planning a dataset like that model.

Where the weights come from. ``--pretrained PATH`` accepts, from the most to the least specific:

* a checkpoint file (``.pt``, read with ``weights_only=True``; its ``state["network"]``) or a
  ``model.safetensors`` file;
* a fold folder (``checkpoint_final.pt``, else ``model.safetensors``);
* a model folder ``<trainer>__<planner>__<configuration>`` holding ``fold_<k>`` folders: ``fold_0``, else the
  first fold that has weights;
* a results folder ``results/<dataset>`` holding model folders: the model of this run's configuration
  (among several, the one best.json chose, else the first by name), else the first model;
* a bundle ``.zip`` (``autoseg export-model``): validated, unpacked to a temporary folder and read as a
  results folder.
Every choice is reported in the summary line and in ``run.json``, so a run says which weights it started from.

What is loaded. Every tensor whose name and shape match this run's network. Two differences are expected
and handled; anything else means another topology and is refused, naming the stage that differs:

* Labels. When the pretrained model's label set (metadata ``labels``) is not this plan's, the segmentation
  heads keep their fresh initialisation, even where shapes happen to match: a head trained to output
  "liver" in channel 1 is no start for "tumour" in channel 1. A model without labels (``{}``, as the
  self-supervised ``autoseg pretrain`` writes) always counts as different.
* Input channels. The first convolution's filters are averaged over the old input channels and that mean
  is copied to every new channel, scaled by old/new channel count: timm's ``adapt_input_conv`` rule, which
  keeps the pre-activation magnitude when the new channels carry similar signals (1 -> 2 channels of the
  same image give exactly the old response). In the plain U-Net InstanceNorm follows the conv and
  cancels any scale anyway.

Which tensors are heads and which is the first conv. A network names them itself with two class
attributes, which any architecture should define:

* ``head_prefixes: tuple[str, ...]``: state-dict name prefixes of the segmentation heads (the layers whose
  output channels are the classes), e.g. ``("heads.",)``;
* ``stem_weight_names: tuple[str, ...]``: the weights that see the input channels (dimension 1), e.g.
  ``("encoder.0.0.conv.weight",)`` (``PlainUNet`` computes it: its first conv, so a subclass's stem);
* ``encoder_parameters()``: what a fine-tuning trainer freezes (``PlainUNet``: all but the decoder).
Without them: the heads are the convolutions whose output channels equal the number of classes (so a
network with as many features as classes somewhere must declare its heads), and the first conv is the
first non-transposed convolution in module order.

Without ``encoder_parameters()``, the parameters of the network's ``encoder`` module are the encoder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from autoseg import serialization
from autoseg.errors import AutosegError
from autoseg.evaluation.best import BEST_FILE, PLAN_FILE, SEPARATOR
from autoseg.fingerprint import Fingerprint
from autoseg.plan import Configuration, NetworkPlan, Plan, check_plan_name

WEIGHT_FILES = ("checkpoint_final.pt", "model.safetensors")
CHECKPOINT_SUFFIXES = (".pt", ".pth")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ALL_CONVS = (*_CONVS, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
PATH_FORMS = (
    "a fold folder, a model folder (<trainer>__<planner>__<configuration>), a results/<dataset> folder, a"
    " checkpoint .pt or a bundle .zip"
)


@dataclass(frozen=True)
class PretrainedWeights:
    """A network state dict with the metadata it was saved with, and where exactly it was read."""

    state: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    source: str  # the file read, e.g. results/D/m/fold_0/checkpoint_final.pt (bundle.zip:D/m/fold_0/... )
    choices: tuple[str, ...] = ()  # which model / fold was taken where the path held several


@dataclass(frozen=True)
class PretrainedSummary:
    """What a run took from its pretrained model: written to run.json (``pretrained``) and printed."""

    path: str  # --pretrained as given
    source: str
    choices: tuple[str, ...]
    loaded_tensors: int
    reinitialised: tuple[str, ...]  # tensor names left at their fresh initialisation
    reinitialised_reason: str | None  # e.g. "labels differ"
    input_channels: tuple[int, int] | None  # (pretrained, this run) when the first conv was adapted
    pretrained_task: str | None = None  # metadata "task" (e.g. masked_reconstruction), when there is one
    pretrained_labels: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        parts = [f"loaded {self.loaded_tensors} tensors from {self.source}"]
        if self.choices:
            parts[0] += f" ({'; '.join(self.choices)})"
        if self.reinitialised:
            parts.append(f"re-initialised heads ({self.reinitialised_reason})")
        if self.input_channels is not None:
            old, new = self.input_channels
            parts.append(f"first conv adapted {old}->{new} channels")
        return "pretrained: " + ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = serialization.to_jsonable(self)
        data["summary"] = self.line()
        return data


# -- finding the weights ---------------------------------------------------------------------------------
def read_pretrained(path: str | Path, configuration: str | None = None) -> PretrainedWeights:
    """The weights ``path`` names (see the module docstring); ``configuration`` picks among several models."""
    from autoseg.bundle import is_bundle, opened_bundle

    path = Path(path)
    if not path.exists():
        raise AutosegError(f"--pretrained {path} does not exist. Fix: give {PATH_FORMS}")
    if is_bundle(path) and path.suffix not in CHECKPOINT_SUFFIXES:  # a torch checkpoint is a zip file too
        with opened_bundle(path) as root:
            weights = _read_folder(root, configuration)
            inside = Path(weights.source).relative_to(root.parent).as_posix()
            return replace(weights, source=f"{path}:{inside}")
    if path.is_file():
        return _read_file(path)
    return _read_folder(path, configuration)


def _read_file(path: Path) -> PretrainedWeights:
    from autoseg.inference.weights import load_safetensors
    from autoseg.training.checkpoint import load_checkpoint

    if path.suffix == ".safetensors":
        tensors, metadata = load_safetensors(path)
        return PretrainedWeights(dict(tensors), metadata, str(path))
    state, metadata = load_checkpoint(path)
    if not isinstance(state.get("network"), Mapping):
        raise AutosegError(f"checkpoint {path} holds no network weights (state['network']). Fix: {PATH_FORMS}")
    return PretrainedWeights(dict(state["network"]), metadata, str(path))


def _has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in WEIGHT_FILES)


def _model_folders(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and d.name.count(SEPARATOR) == 2)


def _best_members(results_dir: Path) -> list[str]:
    """Folder names of the models best.json chose, if it is there and readable; else none."""
    try:
        best = json.loads((results_dir / BEST_FILE).read_text(encoding="utf-8"))
        return [SEPARATOR.join((m["trainer"], m["planner"], m["configuration"])) for m in best["members"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def choose_model(results_dir: Path, configuration: str | None) -> tuple[Path, str]:
    """(model folder, why it was chosen) among the model folders of a results/<dataset> folder."""
    models = [m for m in _model_folders(results_dir) if any(_has_weights(f) for f in m.glob("fold_*"))]
    if not models:
        raise AutosegError(f"--pretrained {results_dir}: no trained model in it. Fix: give {PATH_FORMS}")
    best = _best_members(results_dir)
    matching = [m for m in models if m.name.split(SEPARATOR)[2] == configuration]
    pool = matching or models
    chosen = next((m for m in pool if m.name in best), pool[0])
    why = "best.json's choice" if chosen.name in best else "the first by name"
    if configuration is not None and not matching:
        why += f"; none is of configuration {configuration}"
    elif len(pool) == 1:
        why = "the only one" + ("" if configuration is None else f" of configuration {configuration}")
    return chosen, f"model {chosen.name} ({why})"


def _read_folder(folder: Path, configuration: str | None) -> PretrainedWeights:
    from autoseg.inference.weights import load_fold_weights

    if _has_weights(folder):
        state, metadata = load_fold_weights(folder)
        name = next(n for n in WEIGHT_FILES if (folder / n).is_file())
        return PretrainedWeights(dict(state), metadata, str(folder / name))
    folds = sorted((f for f in folder.glob("fold_*") if _has_weights(f)), key=lambda f: _fold_key(f.name))
    if folds:
        chosen = folds[0]
        why = "the only fold with weights" if len(folds) == 1 else f"of {len(folds)} folds, the first"
        weights = _read_folder(chosen, configuration)
        return replace(weights, choices=(f"{chosen.name}: {why}",))
    if folder.is_dir() and _model_folders(folder):
        model, why = choose_model(folder, configuration)
        weights = _read_folder(model, configuration)
        return replace(weights, choices=(why, *weights.choices))
    raise AutosegError(
        f"--pretrained {folder}: no {' / '.join(WEIGHT_FILES)}, no fold_<k> folder with them and no trained model"
        f" folder. Fix: give {PATH_FORMS} (a fold that is still training has no checkpoint_final.pt yet)"
    )


def _fold_key(name: str) -> tuple[int, str]:
    suffix = name.removeprefix("fold_")
    return (int(suffix), "") if suffix.isdigit() else (1 << 30, suffix)


# -- which tensors are what --------------------------------------------------------------------------------
def _unwrapped(key: str) -> str:
    for prefix in ("_orig_mod.", "module."):
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def head_prefixes(network: nn.Module, num_classes: int) -> tuple[str, ...]:
    """State-dict name prefixes of the segmentation heads (see the module docstring for the rule)."""
    declared = getattr(network, "head_prefixes", None)
    if declared is not None:
        return tuple(declared)
    return tuple(
        f"{name}."
        for name, module in network.named_modules()
        if isinstance(module, _ALL_CONVS) and module.out_channels == num_classes
    )


def head_names(network: nn.Module, num_classes: int) -> set[str]:
    prefixes = head_prefixes(network, num_classes)
    return {n for n in network.state_dict() if n.startswith(prefixes)} if prefixes else set()


def stem_names(network: nn.Module) -> set[str]:
    """State-dict names of the weights that see the input channels (see the module docstring)."""
    declared = getattr(network, "stem_weight_names", None)
    if declared is not None:
        return set(declared)
    first = next((name for name, m in network.named_modules() if isinstance(m, _CONVS)), None)
    return set() if first is None else {f"{first}.weight"}


def encoder_parameters(network: nn.Module) -> list[nn.Parameter]:
    """The encoder's parameters: ``network.encoder_parameters()``, else those of ``network.encoder``."""
    declared = getattr(network, "encoder_parameters", None)
    if callable(declared):
        return list(declared())
    encoder = getattr(network, "encoder", None)
    if isinstance(encoder, nn.Module):
        return list(encoder.parameters())
    raise AutosegError(
        f"network {type(network).__name__} names no encoder: give it an `encoder` module or an"
        " `encoder_parameters()` method so that a trainer can freeze it"
    )


def adapt_input_channels(weight: torch.Tensor, num_input_channels: int) -> torch.Tensor:
    """A conv weight (out, old_in, *kernel) -> (out, new_in, *kernel): the mean filter over the old
    channels in every new channel, scaled by old_in / new_in (timm's adapt_input_conv rule)."""
    old = weight.shape[1]
    mean = weight.float().mean(dim=1, keepdim=True) * (old / num_input_channels)
    return mean.expand(-1, num_input_channels, *weight.shape[2:]).contiguous().to(weight.dtype)


# -- loading -------------------------------------------------------------------------------------------
def like_plan_name(dataset: str) -> str:
    """The default name of a plan made with ``plan --like``: ``like_<pretrained dataset>``."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "-", dataset)
    return "like_" + re.sub(r"_{2,}", "_", safe)


def topology_differences(pretrained: Mapping[str, Any] | None, network: NetworkPlan) -> list[str]:
    """Per stage, what differs between the pretrained network plan (JSON) and this one; [] if nothing does."""
    if not isinstance(pretrained, Mapping):
        return []
    try:
        other = serialization.from_jsonable(NetworkPlan, dict(pretrained))
    except (AutosegError, ValueError, TypeError):
        return ["the pretrained model's network plan is unreadable"]
    diffs = []
    if other.architecture != network.architecture:
        diffs.append(f"architecture {other.architecture!r} (pretrained) vs {network.architecture!r} (this plan)")
    if other.num_stages != network.num_stages:
        diffs.append(f"{other.num_stages} stages (pretrained) vs {network.num_stages} (this plan)")
    per_stage = ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage")
    for i in range(min(other.num_stages, network.num_stages)):
        for name in per_stage:
            a, b = getattr(other, name)[i], getattr(network, name)[i]
            if a != b:
                diffs.append(f"encoder stage {i}: {name} {_fmt(a)} (pretrained) vs {_fmt(b)} (this plan)")
    for i in range(min(other.num_stages, network.num_stages) - 1):
        a_dec, b_dec = other.n_conv_per_stage_decoder[i], network.n_conv_per_stage_decoder[i]
        if a_dec != b_dec:
            diffs.append(f"decoder stage {i}: n_conv_per_stage_decoder {a_dec} (pretrained) vs {b_dec} (this plan)")
    return diffs


def _fmt(value: Any) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)


def transfer_state(
    network: nn.Module,
    weights: PretrainedWeights,
    labels: Mapping[str, int],
    network_plan: NetworkPlan,
    path: str | Path = "",
) -> PretrainedSummary:
    """Load ``weights`` into ``network`` by the rules of the module docstring; returns what was done."""
    target = network.state_dict()
    source = {_unwrapped(k): v for k, v in weights.state.items()}
    prefixes = head_prefixes(network, len(labels))
    heads = head_names(network, len(labels))
    stems = stem_names(network)
    pretrained_labels = weights.metadata.get("labels")
    labels_differ = not pretrained_labels or dict(pretrained_labels) != dict(labels)
    new_state: dict[str, torch.Tensor] = {}
    reinitialised: list[str] = []
    misfits: list[str] = []
    adapted: tuple[int, int] | None = None
    for name, tensor in target.items():
        if name in heads and labels_differ:
            reinitialised.append(name)
            continue
        got = source.get(name)
        if got is None:
            misfits.append(f"{name} is not in the pretrained model")
        elif got.shape == tensor.shape:
            new_state[name] = got
        elif name in stems and got.dim() == tensor.dim() >= 2 and _same_but_inputs(got, tensor):
            new_state[name] = adapt_input_channels(got, tensor.shape[1])
            adapted = (int(got.shape[1]), int(tensor.shape[1]))
        else:
            misfits.append(f"{name} has shape {list(got.shape)} there, {list(tensor.shape)} here")
    extra = [n for n in source if n not in target and not (labels_differ and prefixes and n.startswith(prefixes))]
    misfits += [f"{name} of the pretrained model has no place here" for name in sorted(extra)]
    if misfits:
        raise _topology_error(weights, network_plan, misfits, path)
    full = {**target, **{k: v.to(device=target[k].device, dtype=target[k].dtype) for k, v in new_state.items()}}
    network.load_state_dict(full, strict=True)
    return PretrainedSummary(
        path=str(path),
        source=weights.source,
        choices=weights.choices,
        loaded_tensors=len(new_state),
        reinitialised=tuple(reinitialised),
        reinitialised_reason=_label_reason(pretrained_labels) if reinitialised else None,
        input_channels=adapted,
        pretrained_task=weights.metadata.get("task"),
        pretrained_labels=dict(pretrained_labels or {}),
    )


def _same_but_inputs(got: torch.Tensor, expected: torch.Tensor) -> bool:
    return got.shape[0] == expected.shape[0] and got.shape[2:] == expected.shape[2:]


def _label_reason(pretrained_labels: Any) -> str:
    return "the pretrained model has no labels" if not pretrained_labels else "labels differ"


def _topology_error(
    weights: PretrainedWeights, plan: NetworkPlan, misfits: Sequence[str], path: str | Path
) -> Exception:
    diffs = topology_differences(weights.metadata.get("network"), plan)
    what = "; ".join(diffs[:4]) if diffs else "; ".join(misfits[:3])
    dataset = weights.metadata.get("dataset")
    name = like_plan_name(str(dataset)) if dataset else "<the plan name it prints>"
    return AutosegError(
        f"--pretrained {path or weights.source}: the pretrained network does not fit this plan's ({what}). Spacing"
        f" and patch size may differ from the pretrained plan, the network topology may not. Fix: plan this"
        f" dataset like the pretrained model, `autoseg plan DATASET --like {path or weights.source}`, then"
        f" preprocess and train with `--planner {name}`"
    )


def load_pretrained(
    network: nn.Module, path: str | Path, plan: Plan, configuration: Configuration
) -> PretrainedSummary:
    """Read ``path`` (see ``read_pretrained``) and load it into ``network`` of ``configuration``."""
    weights = read_pretrained(path, configuration.name)
    return transfer_state(network, weights, plan.labels, configuration.network, path)


# -- planning like a pretrained model ------------------------------------------------------------------------
@contextmanager
def _plan_file(path: Path, paths: Any | None) -> Iterator[tuple[Path, str]]:
    """(plan.json of the pretrained model, which model it belongs to)."""
    from autoseg.bundle import is_bundle, opened_bundle

    if not path.exists():
        raise AutosegError(f"--like {path} does not exist. Fix: give {PATH_FORMS}")
    if is_bundle(path) and path.suffix not in CHECKPOINT_SUFFIXES:
        with opened_bundle(path) as root:
            model, why = choose_model(root, None)
            yield model / PLAN_FILE, f"{path}: {why}"
        return
    folder = path.parent if path.is_file() else path
    for candidate in (folder, folder.parent):
        if (candidate / PLAN_FILE).is_file():
            yield candidate / PLAN_FILE, str(candidate)
            return
    if path.is_dir() and _model_folders(path):
        model, why = choose_model(path, None)
        yield model / PLAN_FILE, f"{path}: {why}"
        return
    # A checkpoint without a plan beside it (e.g. `autoseg pretrain`'s): the plan it names in the preprocessed folder.
    weights = read_pretrained(path)
    dataset, planner = weights.metadata.get("dataset"), weights.metadata.get("planner")
    if paths is not None and dataset and planner and paths.plan_file(dataset, planner).is_file():
        yield paths.plan_file(dataset, planner), f"{weights.source} (plan {planner} of {dataset})"
        return
    raise AutosegError(
        f"--like {path}: no {PLAN_FILE} beside the weights or in the folder above, and the plan they name"
        f" ({planner!r} of {dataset!r}) is not in the preprocessed folder. Fix: give {PATH_FORMS}"
    )


def read_pretrained_plan(path: str | Path, paths: Any | None = None) -> tuple[Plan, str]:
    """The plan a pretrained model was trained with, and where it was found."""
    with _plan_file(Path(path), paths) as (plan_file, where):
        return serialization.load(Plan, plan_file), where


def plan_like(source: Plan, fingerprint: Fingerprint, name: str) -> Plan:
    """``source``'s configurations (network, patch size, spacing, batch size) for the dataset of ``fingerprint``.

    As nnU-Net's move_plans_between_datasets, except that what belongs to the data comes from the new
    dataset: its name, channels, labels, foreground intensities, the normalization its channel names call
    for (by the source planner's rules when it is installed, else the default planner's), its median shapes.
    """
    from autoseg.planning import PLANNERS

    check_plan_name(name)
    planner_class = PLANNERS.get(source.planner if source.planner in PLANNERS else "default")
    rules = planner_class(gpu_memory_gb=source.gpu_memory_gb)
    normalization = tuple(rules.normalization_for_channel(c) for c in fingerprint.channel_names)
    use_mask = tuple(rules.use_mask_for_norm(n, fingerprint) for n in normalization)
    configurations = {
        key: replace(
            conf,
            data_identifier=f"{name}_{key}",
            median_shape=_median_shape(fingerprint, conf.spacing_mm, source.transpose_forward),
            normalization=normalization,
            use_mask_for_norm=use_mask,
        )
        for key, conf in source.configurations.items()
    }
    return replace(
        source,
        dataset_name=fingerprint.dataset_name,
        planner=name,
        original_median_spacing_mm=tuple(float(s) for s in np.median(fingerprint.spacings, axis=0)),
        original_median_shape=tuple(round(s) for s in np.median(fingerprint.shapes_after_crop, axis=0)),
        channel_names=fingerprint.channel_names,
        labels=dict(fingerprint.labels),
        foreground_intensity_per_channel=fingerprint.foreground_intensity_per_channel,
        configurations=configurations,
    )


def _median_shape(fingerprint: Fingerprint, spacing: Sequence[float], forward: Sequence[int]) -> tuple[int, ...]:
    """The median case shape at ``spacing`` (transposed order; 2 entries for 2D: the in-plane axes)."""
    from autoseg.preprocessing.resample import compute_new_shape

    offset = len(forward) - len(spacing)
    shapes = []
    for case in fingerprint.cases:
        target = list(case.spacing_mm)
        for i, s in enumerate(spacing):
            target[forward[i + offset]] = s
        new = compute_new_shape(case.shape_after_crop, case.spacing_mm, target)
        shapes.append([new[forward[i + offset]] for i in range(len(spacing))])
    return tuple(round(float(m)) for m in np.median(np.array(shapes), axis=0))
