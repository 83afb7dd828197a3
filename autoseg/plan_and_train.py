"""``autoseg plan-and-train``: dataset folder in, the best cross-validated model out, in one resumable command.

check -> fingerprint -> plan -> preprocess -> train every (configuration, fold) -> find-best. Rerunning
the same command reuses the fingerprint and plan, skips preprocessed cases and finished folds, resumes
interrupted folds, and chooses again. A fold that fails is reported with its log; the others go on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from autoseg.errors import AutosegError
from autoseg.evaluation.best import BestChoice
from autoseg.folds import FoldJob, FoldOutcome, run_fold_jobs
from autoseg.paths import Paths
from autoseg.plan import default_plan_name
from autoseg.presets import ALL_FOLDS, PRESETS
from autoseg.training.trainer import TrainOptions


@dataclass
class PlanAndTrainResult:
    dataset: str
    results_dir: Path  # results/<dataset>
    stage_seconds: dict[str, float] = field(default_factory=dict)
    outcomes: list[FoldOutcome] = field(default_factory=list)
    best: BestChoice | None = None  # when find-best ran
    test_images: Path | None = None  # the dataset's imagesTs, when it has one

    @property
    def failed(self) -> list[FoldOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


def resolve_preset(
    name: str | None, configurations: Sequence[str] | None, folds: Sequence[int] | None, options: TrainOptions
) -> tuple[Sequence[str] | None, Sequence[int], TrainOptions]:
    preset = PRESETS["full"] if name is None else PRESETS.get(name)
    if preset is None:
        raise AutosegError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    options = replace(
        options,
        epochs=options.epochs if options.epochs is not None else preset.epochs,
        iterations_per_epoch=options.iterations_per_epoch or preset.iterations_per_epoch,
        val_iterations=options.val_iterations or preset.val_iterations,
    )
    return configurations or preset.configurations, tuple(folds) if folds else preset.folds, options


def requested_epochs(trainer: str, options: TrainOptions) -> int:
    from autoseg.training.trainer import TRAINERS

    if options.epochs is not None:
        return options.epochs
    return 2 if options.fast_dev_run else TRAINERS.get(trainer).epochs


def plan_and_train(
    dataset: str | Path,
    paths: Paths,
    *,
    configurations: Sequence[str] | None = None,
    folds: Sequence[int] = ALL_FOLDS,
    trainer: str = "default",
    planner: str = "default",
    options: TrainOptions | None = None,
    gpu_memory_gb: float | None = None,
    devices: Sequence[str] | None = None,
    num_workers: int | None = None,
    plugin_files: Sequence[str] = (),
    announce: Callable[[str], None] = print,
    network: str | None = None,
    like: str | Path | None = None,
    plan_name: str | None = None,
) -> PlanAndTrainResult:
    """Run every stage; see the module docstring. ``devices`` with several entries trains folds side by side.

    ``network`` (``--network``) plans for that registered network instead of the planner's own.
    ``like`` (``--like``) plans like that trained model (``pipeline.plan_like``) under ``plan_name``, which
    takes the place of ``planner``; with ``options.pretrained`` its weights then fit.
    """
    from autoseg import pipeline
    from autoseg.check import DatasetCheckFailed
    from autoseg.training.trainer import TRAINERS

    TRAINERS.get(trainer)  # an unknown trainer fails before any work
    options = replace(options or TrainOptions(), save_probabilities=True)  # ensembles need them
    show = options.show_progress
    seconds: dict[str, float] = {}
    with _timed(seconds, "check"):
        spec, problems = pipeline.check(dataset, num_workers, read_voxels=True, show_progress=show)
        if problems:
            raise DatasetCheckFailed(spec.root, problems)
    result = PlanAndTrainResult(spec.name, paths.results / spec.name, seconds)
    result.test_images = spec.root / "imagesTs" if (spec.root / "imagesTs").is_dir() else None
    with _timed(seconds, "fingerprint"):
        if paths.fingerprint_file(spec.name).is_file():
            announce(f"reusing {paths.fingerprint_file(spec.name)}")
        else:
            pipeline.fingerprint(spec.root, paths, num_workers, show_progress=show)
    with _timed(seconds, "plan"):
        from autoseg.planning import PLANNERS

        planner_name = planner
        if like is not None:
            planner = _like_plan_name(like, plan_name, planner, network, paths)
        else:
            planner = plan_name or default_plan_name(planner, network, PLANNERS.get(planner).architecture)
        plan_file = paths.plan_file(spec.name, planner)
        if plan_file.is_file():
            announce(f"reusing {plan_file} (delete it to plan again)")
        elif like is not None:
            pipeline.plan_like(spec.root, paths, like, planner, num_workers, show_progress=show)
        else:
            pipeline.plan(spec.root, paths, planner_name, gpu_memory_gb, network, planner)
        the_plan = pipeline.load_plan(spec, paths, planner)
        planned_for = sorted({c.network.architecture for c in the_plan.configurations.values()})
        if network is not None and planned_for != [network]:
            raise AutosegError(
                f"{plan_file} was planned for network {', '.join(planned_for)}, not --network {network}."
                " Fix: delete the plan (and its preprocessed data) to plan again, or leave out --network"
            )
    names = list(configurations or the_plan.configurations)
    missing = [n for n in names if n not in the_plan.configurations]
    if missing:
        raise AutosegError(
            f"{plan_file}: no configuration {', '.join(missing)}; the plan has {', '.join(the_plan.configurations)}"
            " (a 3d_lowres exists only for large images). Fix: --configurations with names from the plan"
        )
    with _timed(seconds, "preprocess"):
        pipeline.preprocess(spec.root, paths, planner, names, num_workers, show_progress=show)
    jobs = [
        FoldJob(name, fold, paths.fold_dir(spec.name, trainer, planner, name, fold)) for name in names for fold in folds
    ]
    with _timed(seconds, "train"):
        result.outcomes = run_fold_jobs(
            jobs, spec.root, paths, trainer, planner, options, requested_epochs(trainer, options), devices,
            plugin_files, announce,
        )  # fmt: skip
    # Choose among what finished: a configuration with no finished fold drops out, and a fold that failed
    # for any remaining configuration drops out for all, so every candidate is scored on the same cases.
    failed = {(o.job.configuration, o.job.fold) for o in result.outcomes if o.status == "failed"}
    usable = [n for n in names if any((n, f) not in failed for f in folds)]
    usable_folds = [f for f in folds if all((n, f) not in failed for n in usable)]
    if usable and usable_folds:
        with _timed(seconds, "find-best"):
            result.best = pipeline.find_best(
                spec.root, paths, trainer=trainer, planner=planner, configurations=usable, folds=usable_folds,
                num_workers=num_workers, show_progress=show,
            )  # fmt: skip
    return result


def _like_plan_name(like: str | Path, plan_name: str | None, planner: str, network: str | None, paths: Paths) -> str:
    """The plan --like makes: --plan-name, else like_<the pretrained model's dataset>."""
    from autoseg.training.pretrained import like_plan_name, read_pretrained_plan

    if planner != "default" or network is not None:
        raise AutosegError(
            "--like plans like the pretrained model, so --planner and --network do not apply. Fix: leave them"
            " out (name the plan with --plan-name)"
        )
    return plan_name or like_plan_name(read_pretrained_plan(like, paths)[0].dataset_name)


@contextmanager
def _timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] = time.perf_counter() - started
