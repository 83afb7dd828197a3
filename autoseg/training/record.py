"""``run.json``: every value a run actually used, written when it starts, stops and finishes."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

import torch

from autoseg import atomic, serialization
from autoseg.errors import AutosegError
from autoseg.evaluation.best import DATASET_FILE, PLAN_FILE, RUN_FILE

if TYPE_CHECKING:
    from autoseg.training.loop import Run


def write_model_files(run: Run) -> None:
    """``plan.json`` and ``dataset.json`` beside the folds, so the model folder predicts on its own.

    Every fold of a model must come from one plan: a plan that changed since other folds were trained
    would make an ensemble of folds that disagree about spacing and patch size, so it is refused.
    """
    if not run.main:
        return
    model_dir = run.out.parent
    plan = serialization.to_jsonable(run.setup.plan)
    plan_file = model_dir / PLAN_FILE
    if plan_file.is_file():
        if json.loads(plan_file.read_text(encoding="utf-8")) != plan:
            raise AutosegError(
                f"{plan_file}: the plan changed since other folds of this model were trained. Fix: train the"
                " new plan into another --results folder, or delete the model folder to retrain every fold"
            )
    else:
        atomic.write_json(plan_file, plan)
    description = run.setup.dataset_description
    if description is not None and description.is_file():
        atomic.write_text(model_dir / DATASET_FILE, description.read_text(encoding="utf-8"))


def write_run_json(run: Run, status: str, train_ids: list[str], val_ids: list[str], **extra: Any) -> None:
    if not run.main:
        return
    t, conf = run.trainer, run.setup.configuration
    data = {
        "status": status,
        "dataset": run.setup.dataset,
        "trainer": run.setup.trainer_name,
        "trainer_class": f"{type(t).__module__}.{type(t).__qualname__}",
        "planner": run.setup.plan.planner,
        "configuration": conf.name,
        "fold": run.setup.fold,
        "epochs": t.num_epochs,
        "iterations_per_epoch": t.num_iterations,
        "val_iterations": t.num_val_iterations,
        "initial_lr": t.lr,
        "momentum": t.momentum,
        "weight_decay": t.weight_decay,
        "nesterov": t.nesterov,
        "grad_clip_norm": t.grad_clip_norm,
        "lr_schedule": serialization.to_jsonable(run.schedule)
        if hasattr(run.schedule, "__dataclass_fields__")
        else repr(run.schedule),
        "batch_size": t.batch_size,
        "batch_size_per_process": run.dist.share_batch(t.batch_size),
        "oversample_foreground": t.oversample_foreground,
        "patch_size": list(conf.patch_size),
        "sample_size": list(run.spatial.sample_size),
        "mirror_axes": list(run.spatial.mirror_axes),
        "dummy_2d_augmentation": run.spatial.do_dummy_2d,
        "augmentation": serialization.to_jsonable(run.params),
        # a scheduled augmentation (epoch_augmentations): from which epoch on which values differ from epoch 0's
        "augmentation_schedule": _schedule(run.params, run.augmentation_phases),
        "trainer_notes": run.trainer_notes,  # what the trainer decided from the data (Trainer.notes)
        # how often each training case is drawn (Trainer.case_weights); None: every case equally often
        "train_case_probabilities": run.train_case_probabilities,
        "deep_supervision_weights": run.ds_weights,
        "num_workers": run.num_workers,
        "seed": run.options.seed,
        "device": str(run.device),
        "precision": str(run.autocast_dtype).replace("torch.", "") if run.autocast_dtype else "float32",
        "grad_scaler": run.scaler is not None,
        "compile": run.compile,
        "cuda_graphs": run.cuda_graphs,
        "augmentation_device": run.augmentation_device,  # where the training augmentation ran: cpu or device
        "augmentation_note": run.augmentation_note,  # why it ran on the CPU when the device was asked for
        "cases_on_device": run.cases_on_device,  # batches cut from cases kept on the device, no workers
        "cases_on_device_note": run.cases_on_device_note,  # why not, where it was asked for or automatic
        "compile_seconds": run.compile_seconds,
        "world_size": run.dist.world_size,
        "fast_dev_run": run.options.fast_dev_run,
        "splits_file": str(run.setup.splits_file),
        "train_cases": train_ids,
        "val_cases": val_ids,
        "pretrained": run.pretrained,
        "early_stopping_patience": t.stopping_patience,
        "early_stopping_min_epochs": t.stopping_min_epochs,
        "epochs_done": run.position.epoch,
        "stop_reason": run.position.stop_reason,
        "torch_version": torch.__version__,
        "python_version": sys.version.split()[0],
        **extra,
    }
    atomic.write_json(run.out / RUN_FILE, data)


def _schedule(first: Any, phases: list[tuple[int, Any]]) -> list[dict[str, Any]] | None:
    """None for one augmentation throughout; else per phase its first epoch and the fields that differ."""
    if len(phases) <= 1:
        return None
    reference = serialization.to_jsonable(first)
    result = []
    for epoch, params in phases:
        values = serialization.to_jsonable(params)
        result.append({"first_epoch": epoch, "changed": {k: v for k, v in values.items() if reference.get(k) != v}})
    return result
