"""Where a run stands, and how that is saved, restored, or refused.

A checkpoint holds the tensors (network, optimiser, gradient scaler, torch's random state) and, as JSON, the
position (epoch, iteration, the losses of a part-done epoch, the pseudo-Dice averages) and the log so far.
Because batches depend only on (seed, rank, epoch, iteration), that is all an exact resume needs.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from autoseg import serialization
from autoseg.errors import AutosegError
from autoseg.training import checkpoint as ckpt
from autoseg.training.progress import EpochRecord, read_log

if TYPE_CHECKING:
    from autoseg.training.loop import Run

CHECKPOINT_NAMES = ("checkpoint_latest.pt", "checkpoint_best.pt", "checkpoint_final.pt")


@dataclass
class Position:
    """Where training stands; what a checkpoint restores besides the tensors."""

    epoch: int = 0  # the epoch being trained (== epochs done when between epochs)
    iteration: int = 0  # iterations of ``epoch`` already done (non-zero only after an interrupt)
    partial_losses: list[float] = field(default_factory=list)  # train losses of those iterations
    ema_pseudo_dice: float | None = None
    best_ema_pseudo_dice: float | None = None
    records: list[EpochRecord] = field(default_factory=list)
    finished_epochs: int | None = None  # set when training reached the end of its budget
    stop_reason: str | None = None


def checkpoint_state(run: Run) -> dict[str, Any]:
    state: dict[str, Any] = {
        "network": run.network.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    if run.scaler is not None:
        state["grad_scaler"] = run.scaler.state_dict()
    if run.device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(run.device)
    return state


def checkpoint_metadata(run: Run) -> dict[str, Any]:
    p = run.position
    return {
        "trainer": run.setup.trainer_name,
        "dataset": run.setup.dataset,
        "planner": run.setup.plan.planner,
        "configuration": run.setup.configuration.name,
        "fold": run.setup.fold,
        "num_input_channels": run.trainer.num_input_channels,
        "labels": run.setup.plan.labels,
        "network": serialization.to_jsonable(run.setup.configuration.network),
        "mirror_axes": list(run.spatial.mirror_axes),
        "pretrained": run.pretrained,
        "epochs": run.trainer.num_epochs,
        "position": {key: value for key, value in asdict(p).items() if key != "records"},
        "log": [asdict(r) for r in p.records],
    }


def save(run: Run, name: str) -> None:
    if run.main:
        ckpt.save_checkpoint(run.out / name, checkpoint_state(run), checkpoint_metadata(run))


def restore(run: Run, path: Path) -> None:
    state, meta = ckpt.load_checkpoint(path)
    for key, expected in (
        ("trainer", run.setup.trainer_name),
        ("configuration", run.setup.configuration.name),
        ("fold", run.setup.fold),
    ):
        if meta.get(key) != expected:
            raise AutosegError(f"checkpoint {path} belongs to {key} {meta.get(key)!r}, not {expected!r}")
    try:
        run.network.load_state_dict(state["network"])
        run.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise AutosegError(
            f"checkpoint {path} does not fit this run's network or optimiser ({str(exc).splitlines()[0]});"
            " the plan or trainer changed since it was written. Fix: train without --resume (--overwrite)"
        ) from exc
    if run.scaler is not None and "grad_scaler" in state:
        run.scaler.load_state_dict(state["grad_scaler"])
    torch.set_rng_state(state["torch_rng"])
    if run.device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], run.device)
    run.pretrained = meta.get("pretrained")  # what the run started from, kept for run.json
    try:
        run.position = Position(**meta["position"], records=read_log(meta["log"]))
    except (KeyError, TypeError) as exc:
        raise AutosegError(f"checkpoint {path} has metadata this autoseg does not know ({exc})") from exc


def prepare_output(run: Run) -> None:
    """Fresh start, resume, or refuse: never mix two runs in one folder silently."""
    existing = [run.out / n for n in CHECKPOINT_NAMES if (run.out / n).is_file()]
    if run.options.resume:
        latest = run.out / "checkpoint_latest.pt"
        if not latest.is_file():
            if run.main:
                print(f"autoseg: nothing to resume in {run.out}; starting from scratch", file=sys.stderr)
            return
        restore(run, latest)
        done = run.position.finished_epochs
        if done is not None and run.trainer.num_epochs < done:
            raise AutosegError(f"{run.out} finished {done} epochs; --epochs {run.trainer.num_epochs} cannot shorten it")
        if done is not None and run.trainer.num_epochs > done:
            run.position.finished_epochs = None  # extend a finished run
            run.position.stop_reason = None
        return
    if existing:
        if not run.options.overwrite:
            raise AutosegError(
                f"{run.out} already holds a run ({existing[0].name}). Fix: pass --resume to continue it"
                " (or extend it with a larger --epochs), or --overwrite to start again"
            )
        run.dist.barrier()
        if run.main:
            shutil.rmtree(run.out)
        run.dist.barrier()
