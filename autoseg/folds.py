"""Training many (configuration, fold) runs: which are done, which to resume, and running them.

One device: the folds run one after the other in this process (progress bars and all). Several GPUs
(``--gpus N``): one worker per device takes the next fold from a queue and trains it in a subprocess
(``python -m autoseg train ... --device cuda:k``) whose output goes to ``fold_k/train.log``. Either way a
fold that fails is recorded with its log and the others go on.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from autoseg import atomic
from autoseg.errors import TrainingInterrupted
from autoseg.evaluation.best import RUN_FILE
from autoseg.paths import Paths
from autoseg.training.trainer import TrainOptions

FoldState = Literal["finished", "interrupted", "new"]
ERROR_LOG = "error.log"
SUBPROCESS_LOG = "train.log"


@dataclass(frozen=True)
class FoldJob:
    configuration: str
    fold: int
    folder: Path  # results/<dataset>/<trainer>__<planner>__<configuration>/fold_<k>


@dataclass(frozen=True)
class FoldOutcome:
    job: FoldJob
    status: Literal["skipped", "trained", "resumed", "failed"]
    seconds: float
    log: Path | None = None  # where to look when it failed
    error: str | None = None


def fold_state(folder: Path, epochs: int) -> FoldState:
    """``finished``: run.json says so for at least ``epochs`` epochs and the validation was scored."""
    run_file = folder / RUN_FILE
    if run_file.is_file():
        try:
            run = json.loads(run_file.read_text(encoding="utf-8"))
        except ValueError:
            run = {}
        summary = folder / "validation" / "summary.json"
        if run.get("status") == "finished" and int(run.get("epochs", 0)) >= epochs and summary.is_file():
            return "finished"
    if (folder / "checkpoint_latest.pt").is_file():
        return "interrupted"
    return "new"


def _options_for(state: FoldState, options: TrainOptions) -> TrainOptions:
    """Resume continues an interrupted fold (and extends a finished one to a larger --epochs); a fold with
    nothing to resume from starts clean, discarding a run killed before its first checkpoint_latest."""
    return replace(options, resume=state == "interrupted", overwrite=state == "new")


def _train_in_process(
    job: FoldJob, dataset: Path, paths: Paths, trainer: str, planner: str, options: TrainOptions
) -> None:
    from autoseg.pipeline import train

    train(dataset, paths, job.configuration, job.fold, trainer, planner, options)


def _train_argv(
    job: FoldJob, dataset: Path, paths: Paths, trainer: str, planner: str, options: TrainOptions,
    device: str, plugin_files: Sequence[str],
) -> list[str]:  # fmt: skip
    argv = [sys.executable, "-m", "autoseg", "-q"]
    for plugin in plugin_files:
        argv += ["--plugins", str(plugin)]
    argv += ["train", str(dataset), job.configuration, str(job.fold), "--preprocessed", str(paths.preprocessed),
             "--results", str(paths.results), "--trainer", trainer, "--planner", planner, "--device", device,
             "--seed", str(options.seed)]  # fmt: skip
    if options.pretrained is not None:
        argv += ["--pretrained", str(options.pretrained)]
    numeric = {"--epochs": options.epochs, "--iterations-per-epoch": options.iterations_per_epoch,
               "--val-iterations": options.val_iterations, "--lr": options.lr, "--batch-size": options.batch_size,
               "--num-workers": options.num_workers, "--early-stopping-patience": options.early_stopping_patience,
               "--early-stopping-min-epochs": options.early_stopping_min_epochs}  # fmt: skip
    for flag, value in numeric.items():
        if value is not None:
            argv += [flag, str(value)]
    if options.compile is not None:
        argv.append("--compile" if options.compile else "--no-compile")
    if options.augmentation is not None:
        argv += ["--augmentation", options.augmentation]
    switches = {
        "--resume": options.resume,
        "--cuda-graphs": options.cuda_graphs,
        "--fast-dev-run": options.fast_dev_run,
        "--save-probabilities": options.save_probabilities,
        "--no-tta": not options.validation_mirroring,
    }
    return argv + [flag for flag, on in switches.items() if on]


def run_fold_jobs(
    jobs: Sequence[FoldJob],
    dataset: Path,
    paths: Paths,
    trainer: str,
    planner: str,
    options: TrainOptions,
    epochs: int,
    devices: Sequence[str] | None = None,
    plugin_files: Sequence[str] = (),
    announce: Callable[[str], None] = print,
) -> list[FoldOutcome]:
    """Train every job not yet finished; ``devices`` with more than one entry runs them side by side."""
    todo: list[tuple[FoldJob, FoldState]] = []
    outcomes: list[FoldOutcome] = []
    for job in jobs:
        state = fold_state(job.folder, epochs)
        if state == "finished":
            announce(f"{job.configuration} fold {job.fold}: finished before, skipped ({job.folder})")
            outcomes.append(FoldOutcome(job, "skipped", 0.0))
        else:
            todo.append((job, state))
    if devices is not None and len(devices) > 1:
        outcomes += _run_side_by_side(todo, dataset, paths, trainer, planner, options, devices, plugin_files, announce)
    else:
        if devices:
            options = replace(options, device=devices[0])
        for job, state in todo:
            outcomes.append(_run_here(job, state, dataset, paths, trainer, planner, options, announce))
    order = {job: i for i, job in enumerate(jobs)}
    return sorted(outcomes, key=lambda o: order[o.job])


def _run_here(
    job: FoldJob, state: FoldState, dataset: Path, paths: Paths, trainer: str, planner: str,
    options: TrainOptions, announce: Callable[[str], None],
) -> FoldOutcome:  # fmt: skip
    options = _options_for(state, options)
    verb = "resuming" if state == "interrupted" else "training"
    announce(f"{job.configuration} fold {job.fold}: {verb} ({job.folder})")
    started = time.perf_counter()
    try:
        _train_in_process(job, dataset, paths, trainer, planner, options)
    except (KeyboardInterrupt, TrainingInterrupted):
        raise  # the user stopped everything; the fold saved its state and the rerun resumes it
    except Exception as exc:  # one fold's failure must not lose the others
        log = job.folder / ERROR_LOG
        job.folder.mkdir(parents=True, exist_ok=True)
        atomic.write_text(log, traceback.format_exc())
        announce(f"{job.configuration} fold {job.fold}: FAILED ({exc}); traceback in {log}")
        return FoldOutcome(job, "failed", time.perf_counter() - started, log, str(exc))
    return FoldOutcome(job, "resumed" if state == "interrupted" else "trained", time.perf_counter() - started)


def _run_side_by_side(
    todo: Sequence[tuple[FoldJob, FoldState]], dataset: Path, paths: Paths, trainer: str, planner: str,
    options: TrainOptions, devices: Sequence[str], plugin_files: Sequence[str], announce: Callable[[str], None],
) -> list[FoldOutcome]:  # fmt: skip
    waiting: queue.Queue[tuple[FoldJob, FoldState]] = queue.Queue()
    for item in todo:
        waiting.put(item)
    outcomes: list[FoldOutcome] = []
    lock = threading.Lock()

    def worker(device: str) -> None:
        while True:
            try:
                job, state = waiting.get_nowait()
            except queue.Empty:
                return
            job.folder.mkdir(parents=True, exist_ok=True)
            log = job.folder / SUBPROCESS_LOG
            with lock:
                announce(f"{job.configuration} fold {job.fold}: training on {device}, log in {log}")
            started = time.perf_counter()
            argv = _train_argv(
                job, dataset, paths, trainer, planner, _options_for(state, options), device, plugin_files
            )
            with open(log, "a", encoding="utf-8") as out:
                code = subprocess.call(argv, stdout=out, stderr=subprocess.STDOUT)
            seconds = time.perf_counter() - started
            if code == 0:
                outcome = FoldOutcome(job, "resumed" if state == "interrupted" else "trained", seconds)
            else:
                outcome = FoldOutcome(job, "failed", seconds, log, f"exit code {code}")
            with lock:
                outcomes.append(outcome)
                if code != 0:
                    announce(f"{job.configuration} fold {job.fold}: FAILED (exit code {code}); see {log}")

    threads = [threading.Thread(target=worker, args=(device,), daemon=True) for device in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes
