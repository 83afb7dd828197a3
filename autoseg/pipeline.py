"""The stages a user runs, as functions: each reads the previous stage's file and writes its own.

The CLI is a thin shim over these; they are also the Python API.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from autoseg import serialization
from autoseg.check import DatasetCheckFailed, Problem, check_dataset, check_headers
from autoseg.dataset import DatasetSpec, load_dataset
from autoseg.errors import AutosegError
from autoseg.fingerprint import Fingerprint, extract_fingerprint
from autoseg.paths import Paths
from autoseg.plan import Plan

if TYPE_CHECKING:
    from autoseg.evaluation.best import BestChoice
    from autoseg.training.trainer import TrainingSetup, TrainOptions


def checked_dataset(dataset: str | Path) -> DatasetSpec:
    """Load a dataset and run the header half of the check; every command starts here."""
    spec = load_dataset(dataset)
    problems = check_headers(spec)
    if problems:
        raise DatasetCheckFailed(spec.root, problems)
    return spec


def check(
    dataset: str | Path, num_workers: int | None = None, read_voxels: bool = True, show_progress: bool = True
) -> tuple[DatasetSpec, list[Problem]]:
    return check_dataset(dataset, num_workers, content=read_voxels, show_progress=show_progress)


def fingerprint(
    dataset: str | Path,
    paths: Paths,
    num_workers: int | None = None,
    seed: int = 0,
    show_progress: bool = True,
) -> Path:
    spec = checked_dataset(dataset)
    result = extract_fingerprint(spec, num_workers=num_workers, seed=seed, show_progress=show_progress)
    target = paths.fingerprint_file(spec.name)
    serialization.save(result, target)
    return target


def load_fingerprint(spec: DatasetSpec, paths: Paths) -> Fingerprint:
    path = paths.fingerprint_file(spec.name)
    if not path.is_file():
        raise AutosegError(f"{path}: no fingerprint yet; run `autoseg fingerprint {spec.root}` first")
    return serialization.load(Fingerprint, path)


def plan(
    dataset: str | Path,
    paths: Paths,
    planner: str = "default",
    gpu_memory_gb: float | None = None,
    architecture: str | None = None,
    plan_name: str | None = None,
) -> Path:
    """Write the plan; ``architecture`` (``--network``) replaces the planner's own network in every configuration.

    The plan is saved as ``plans/<plan_name>.json``; by default the planner's name, or ``<planner>_<network>``
    with another network (see ``default_plan_name``). ``--planner <plan_name>`` then names it to every command.
    """
    from autoseg.plan import default_plan_name
    from autoseg.planning import PLANNERS

    spec = checked_dataset(dataset)
    planner_class = PLANNERS.get(planner)
    result = planner_class(gpu_memory_gb=gpu_memory_gb, architecture=architecture).plan(load_fingerprint(spec, paths))
    name = plan_name or default_plan_name(planner, architecture, planner_class.architecture)
    if name != result.planner:
        result = result.renamed(name)
    target = paths.plan_file(spec.name, name)
    serialization.save(result, target)
    return target


def plan_like(
    dataset: str | Path,
    paths: Paths,
    pretrained: str | Path,
    plan_name: str | None = None,
    num_workers: int | None = None,
    show_progress: bool = True,
) -> Path:
    """Plan ``dataset`` like a trained model, so that its weights fit (``--pretrained``); returns the plan file.

    The model's configurations (network, patch size, spacing, batch size) with this dataset's channels,
    labels, intensities and normalization; see ``autoseg.training.pretrained.plan_like``. Fingerprints the
    dataset first if that has not been done. Saved as ``plans/<plan_name>.json``, default
    ``like_<the model's dataset>``: ``--planner <plan_name>`` then preprocesses and trains it.
    """
    from autoseg.training import pretrained as pre

    spec = checked_dataset(dataset)
    if not paths.fingerprint_file(spec.name).is_file():
        fingerprint(spec.root, paths, num_workers=num_workers, show_progress=show_progress)
    source, _ = pre.read_pretrained_plan(pretrained, paths)
    name = plan_name or pre.like_plan_name(source.dataset_name)
    result = pre.plan_like(source, load_fingerprint(spec, paths), name)
    target = paths.plan_file(spec.name, name)
    serialization.save(result, target)
    return target


def load_plan(spec: DatasetSpec, paths: Paths, planner: str) -> Plan:
    path = paths.plan_file(spec.name, planner)
    if not path.is_file():
        raise AutosegError(f"{path}: no plan yet; run `autoseg plan {spec.root} --planner {planner}` first")
    return serialization.load(Plan, path)


def preprocess(
    dataset: str | Path,
    paths: Paths,
    planner: str = "default",
    configurations: list[str] | None = None,
    num_workers: int | None = None,
    show_progress: bool = True,
) -> dict[str, Path]:
    from autoseg.preprocessing.run import preprocess_dataset

    spec = checked_dataset(dataset)
    the_plan = load_plan(spec, paths, planner)
    names = configurations or list(the_plan.configurations)
    for name in names:
        the_plan.configuration(name)  # unknown names fail before any work
    return preprocess_dataset(spec, the_plan, names, paths, num_workers=num_workers, show_progress=show_progress)


def plan_and_preprocess(
    dataset: str | Path,
    paths: Paths,
    planner: str = "default",
    gpu_memory_gb: float | None = None,
    configurations: list[str] | None = None,
    num_workers: int | None = None,
    show_progress: bool = True,
) -> dict[str, Path]:
    fingerprint(dataset, paths, num_workers=num_workers, show_progress=show_progress)
    plan(dataset, paths, planner=planner, gpu_memory_gb=gpu_memory_gb)
    return preprocess(dataset, paths, planner, configurations, num_workers, show_progress)


def training_setup(
    dataset: str | Path, paths: Paths, configuration: str, fold: int, trainer: str = "default", planner: str = "default"
) -> TrainingSetup:
    """Everything a trainer needs to know about one fold, checked: the plan, the data, where to write."""
    from autoseg.preprocessing.run import is_complete
    from autoseg.training.trainer import TrainingSetup

    spec = checked_dataset(dataset)
    the_plan = load_plan(spec, paths, planner)
    conf = the_plan.configuration(configuration)
    data_dir = paths.configuration_dir(spec.name, conf.data_identifier)
    case_ids = tuple(case.case_id for case in spec.training)
    missing = [c for c in case_ids if not is_complete(data_dir, c)]
    if missing:
        raise AutosegError(
            f"{data_dir}: {len(missing)} of {len(case_ids)} cases are not preprocessed (first: {missing[0]}). Fix:"
            f" autoseg preprocess {spec.root} --planner {planner} -c {configuration}"
        )
    return TrainingSetup(
        dataset=spec.name,
        plan=the_plan,
        configuration=conf,
        fold=fold,
        trainer_name=trainer,
        case_ids=case_ids,
        data_dir=data_dir,
        splits_file=paths.splits_file(spec.name),
        ground_truth_dir=paths.ground_truth_dir(spec.name),
        file_ending=spec.file_ending,
        output_dir=paths.fold_dir(spec.name, trainer, planner, configuration, fold),
        dataset_description=spec.description_file,
    )


def train(
    dataset: str | Path,
    paths: Paths,
    configuration: str,
    fold: int,
    trainer: str = "default",
    planner: str = "default",
    options: TrainOptions | None = None,
) -> Path:
    """Train one fold of one configuration and validate it on the fold's whole held-out cases.

    Writes ``<results>/<dataset>/<trainer>__<planner>__<configuration>/fold_<fold>/`` and returns it.
    """
    from autoseg.training.trainer import TRAINERS

    trainer_class = TRAINERS.get(trainer)
    setup = training_setup(dataset, paths, configuration, fold, trainer, planner)
    return trainer_class(setup, options).fit()


def find_best(
    dataset: str | Path,
    paths: Paths,
    *,
    trainer: str | None = None,
    planner: str | None = None,
    configurations: Sequence[str] | None = None,
    folds: Sequence[int] | None = None,
    num_workers: int | None = None,
    show_progress: bool = True,
) -> BestChoice:
    """Choose the best model or ensemble and its postprocessing by cross-validation; writes best.json.

    Candidates are the trained models under ``<results>/<dataset>/``, narrowed to ``trainer``, ``planner``
    and ``configurations`` when given.
    """
    from autoseg.evaluation.best import PRETRAIN_TRAINER, ModelRef
    from autoseg.evaluation.find_best import find_best as choose

    spec = checked_dataset(dataset)
    results_dir = paths.results / spec.name
    found = sorted(
        ModelRef.from_folder(d.name) for d in results_dir.glob("*__*__*") if d.is_dir() and d.name.count("__") == 2
    ) if results_dir.is_dir() else []  # fmt: skip
    models = [
        m
        for m in found
        if m.trainer != PRETRAIN_TRAINER
        and (trainer is None or m.trainer == trainer)
        and (planner is None or m.planner == planner)
        and (configurations is None or m.configuration in configurations)
    ]
    if not models:
        raise AutosegError(
            f"{results_dir}: no trained model to choose from"
            + (f" (found: {', '.join(m.folder for m in found)})" if found else "")
            + f". Fix: autoseg plan-and-train {spec.root} (or autoseg train ...)"
        )
    return choose(
        results_dir,
        paths.ground_truth_dir(spec.name),
        paths.splits_file(spec.name),
        spec.labels,
        spec.file_ending,
        spec.channel_names,
        spec.name,
        models=models,
        folds=folds,
        images_dir=spec.root / "imagesTr",
        num_workers=num_workers,
        show_progress=show_progress,
    )
