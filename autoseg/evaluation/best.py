"""``best.json``: what find-best chose and why, the one file ``autoseg predict`` reads.

JSON only (no pickles): which trained models (one, or an ensemble that averages their class
probabilities), which folds and checkpoint, which postprocessing, and the cross-validation scores of every
candidate that was tried.

Layout under ``<results>/<dataset>/``::

    best.json                                   this file
    report.md, report/*.png                     the human-readable report
    crossval/<candidate>/CASE<ending>           cross-validation predictions of ensembles (find-best)
    <trainer>__<planner>__<configuration>/      one trained model (``ModelRef.folder``)
        plan.json, dataset.json                 the plan it was trained with, the dataset description
        fold_<k>/run.json, checkpoint_final.pt  (a bundle holds model.safetensors instead of checkpoints)
        fold_<k>/validation/CASE<ending>        plus CASE.npz + CASE_probabilities.json with probabilities
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from autoseg import serialization
from autoseg.errors import AutosegError

BEST_FILE = "best.json"
# Files of the results layout above, named once for training (which writes them), find-best, predict and bundles.
PLAN_FILE = "plan.json"
DATASET_FILE = "dataset.json"
RUN_FILE = "run.json"
# The trainer part of `autoseg pretrain`'s model folders: reconstruction networks, never segmentation candidates.
PRETRAIN_TRAINER = "pretrain"
SEPARATOR = "__"


@dataclass(frozen=True, order=True)
class ModelRef:
    """One trained model: a (trainer, planner, configuration) with its folds under ``folder``."""

    trainer: str
    planner: str
    configuration: str

    @property
    def folder(self) -> str:
        return f"{self.trainer}{SEPARATOR}{self.planner}{SEPARATOR}{self.configuration}"

    @staticmethod
    def from_folder(name: str) -> ModelRef:
        parts = name.split(SEPARATOR)
        if len(parts) != 3 or not all(parts):
            raise AutosegError(f"{name!r} is not a model folder name (<trainer>__<planner>__<configuration>)")
        return ModelRef(*parts)


def candidate_name(members: tuple[ModelRef, ...] | list[ModelRef]) -> str:
    """A single model is named by its folder; an ensemble by its members' folders joined with ``+``."""
    return "+".join(m.folder for m in sorted(members))


@dataclass(frozen=True)
class Postprocessing:
    """Keep-the-largest-connected-component rules, applied in this order.

    ``largest_component_foreground``: all foreground labels together, keep the largest component (voxels of
    other components become background). ``largest_component_labels``: then, per label value listed, keep
    that label's largest component.
    """

    largest_component_foreground: bool = False
    largest_component_labels: tuple[int, ...] = ()

    @property
    def is_identity(self) -> bool:
        return not self.largest_component_foreground and not self.largest_component_labels


@dataclass(frozen=True)
class CandidateScore:
    """A candidate's cross-validation score: mean over cases of each label's Dice, and their mean."""

    name: str
    members: tuple[ModelRef, ...]
    foreground_mean_dice: float
    dice_per_label: dict[str, float | None]  # label value (as a string) -> mean Dice over cases


@dataclass(frozen=True)
class BestChoice:
    SCHEMA_VERSION = 1

    schema_version: int
    dataset: str
    members: tuple[ModelRef, ...]  # one model, or the models of an ensemble (probabilities averaged)
    folds: tuple[int, ...]  # the folds to predict with (those every member has)
    checkpoint: str  # file name in each fold folder, e.g. checkpoint_final.pt
    postprocessing: Postprocessing
    file_ending: str
    labels: dict[str, int]
    channel_names: tuple[str, ...]
    cross_validation_dice: float  # foreground mean of the chosen candidate, before postprocessing
    postprocessed_dice: float  # the same after postprocessing
    cases_scored: int  # training cases with a cross-validation prediction
    cases_total: int
    candidates: tuple[CandidateScore, ...] = field(default_factory=tuple)  # every candidate tried, best first

    @property
    def name(self) -> str:
        return candidate_name(self.members)


def best_file(results_dataset_dir: str | Path) -> Path:
    return Path(results_dataset_dir) / BEST_FILE


def load_best(results_dataset_dir: str | Path) -> BestChoice:
    path = best_file(results_dataset_dir)
    if not path.is_file():
        raise AutosegError(
            f"{path}: no best.json yet. Fix: run `autoseg find-best DATASET --results ...` after training"
        )
    return serialization.load(BestChoice, path)


def save_best(choice: BestChoice, results_dataset_dir: str | Path) -> Path:
    path = best_file(results_dataset_dir)
    serialization.save(choice, path)
    return path
