"""Gathering the cross-validation predictions of trained models: which folds finished, which case each fold
predicted, and the checks that every case of the folds used was predicted exactly once (``splits.json``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoseg.data.splits import Split, validate_splits
from autoseg.errors import AutosegError
from autoseg.evaluation.best import RUN_FILE, ModelRef
from autoseg.inference.export import probabilities_files

Members = tuple[ModelRef, ...]
FINISHED = "finished"
FOLD_PREFIX = "fold_"
VALIDATION_DIR = "validation"
# How many case names an error message lists before it says "and N more".
_LISTED_CASES = 5


@dataclass(frozen=True)
class CrossValidationCase:
    case_id: str
    fold: int  # the fold that held the case out
    reference: Path
    segmentations: dict[ModelRef, Path]  # every model's prediction
    probabilities: dict[ModelRef, Path]  # CASE.npz of the models that can join ensembles


@dataclass(frozen=True)
class CrossValidation:
    models: Members
    folds: tuple[int, ...]
    cases: tuple[CrossValidationCase, ...]  # sorted by case id
    cases_total: int  # training cases in splits.json
    ensemble_models: Members  # models with stored probabilities for every case
    notes: tuple[str, ...]  # what was left out and why, for the report


def crossval_cases(
    results_dataset_dir: Path,
    ground_truth_dir: Path,
    splits_file: Path,
    file_ending: str,
    models: Sequence[ModelRef] | None = None,
    folds: Sequence[int] | None = None,
    checkpoint: str = "checkpoint_final.pt",
) -> CrossValidation:
    """Every model's prediction of every case held out by the folds used, checked (module docstring, step 1)."""
    splits = _load_splits(splits_file, ground_truth_dir, file_ending)
    notes: list[str] = []
    finished = _finished_folds(results_dataset_dir, models, notes)
    used_folds = _used_folds(finished, folds, len(splits), splits_file, notes)
    ids = sorted(c for k in used_folds for c in splits[k]["val"])
    fold_of = {c: k for k in used_folds for c in splits[k]["val"]}
    segmentations: dict[ModelRef, dict[str, Path]] = {}
    for model in finished:
        found: dict[str, tuple[int, Path]] = {}
        for k in used_folds:
            fold_dir = results_dataset_dir / model.folder / f"{FOLD_PREFIX}{k}"
            for case_id, path in _fold_predictions(fold_dir, k, splits[k]["val"], file_ending, checkpoint).items():
                if case_id in found:
                    other, other_path = found[case_id]
                    raise AutosegError(
                        f"case {case_id} is predicted by two folds of {model.folder}: {other_path} (fold {other})"
                        f" and {path} (fold {k}); {splits_file} holds it out in fold {fold_of.get(case_id)}."
                        " Fix: delete the stray prediction, or retrain the fold whose run.json disagrees"
                    )
                found[case_id] = (k, path)
        segmentations[model] = {c: found[c][1] for c in ids}
    ensemble_models = _with_probabilities(segmentations, notes)
    cases = tuple(
        CrossValidationCase(
            case_id=c,
            fold=fold_of[c],
            reference=ground_truth_dir / f"{c}{file_ending}",
            segmentations={m: segmentations[m][c] for m in finished},
            probabilities={m: probabilities_files(segmentations[m][c])[0] for m in ensemble_models},
        )
        for c in ids
    )
    total = len({c for split in splits for c in split["val"]})
    if len(ids) < total:
        notes.append(
            f"Only {len(ids)} of the {total} training cases were scored (folds {', '.join(map(str, used_folds))});"
            " the choice rests on part of the cross-validation. Train the remaining folds for the full picture."
        )
    return CrossValidation(tuple(finished), used_folds, cases, total, ensemble_models, tuple(notes))


def _load_splits(splits_file: Path, ground_truth_dir: Path, file_ending: str) -> list[Split]:
    if not ground_truth_dir.is_dir():
        raise AutosegError(f"{ground_truth_dir}: no ground truth folder. Fix: autoseg preprocess DATASET")
    if not splits_file.is_file():
        raise AutosegError(f"{splits_file}: no cross-validation splits; training writes them. Fix: train first")
    case_ids = [
        p.name[: -len(file_ending)]
        for p in ground_truth_dir.iterdir()
        if p.name.endswith(file_ending) and not p.name.startswith(".")
    ]
    try:
        data = json.loads(splits_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AutosegError(f"{splits_file}: not valid JSON ({exc})") from None
    splits = validate_splits(data, case_ids, splits_file)
    held_out_by: dict[str, int] = {}
    for k, split in enumerate(splits):
        for case_id in split["val"]:
            if case_id in held_out_by:
                raise AutosegError(
                    f"{splits_file}: case {case_id} is validated by fold {held_out_by[case_id]} and fold {k};"
                    " cross-validation needs each case held out by exactly one fold. Fix the file"
                )
            held_out_by[case_id] = k
    return splits


def _read_run(run_file: Path) -> dict[str, Any] | None:
    if not run_file.is_file():
        return None
    try:
        data = json.loads(run_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AutosegError(f"{run_file}: not valid JSON ({exc}). Fix: retrain the fold") from None
    return data if isinstance(data, dict) else None


def finished_folds(model_dir: Path) -> tuple[int, ...]:
    """The numbered folds of a model whose run.json says finished (fold "all" has no held-out cases)."""
    folds = []
    for fold_dir in model_dir.glob(f"{FOLD_PREFIX}*"):
        number = fold_dir.name[len(FOLD_PREFIX) :]
        run = _read_run(fold_dir / RUN_FILE) if number.isdigit() else None
        if run is not None and run.get("status") == FINISHED:
            folds.append(int(number))
    return tuple(sorted(folds))


def _finished_folds(
    results_dataset_dir: Path, models: Sequence[ModelRef] | None, notes: list[str]
) -> dict[ModelRef, tuple[int, ...]]:
    if models is None:
        if not results_dataset_dir.is_dir():
            raise AutosegError(f"{results_dataset_dir}: no results folder. Fix: train a model first")
        models = sorted(
            ModelRef.from_folder(d.name)
            for d in results_dataset_dir.iterdir()
            if d.is_dir() and d.name.count("__") == 2 and all(d.name.split("__"))
        )
    finished = {}
    for model in sorted(set(models)):
        folds = finished_folds(results_dataset_dir / model.folder)
        if folds:
            finished[model] = folds
        else:
            notes.append(f"`{model.folder}` was left out: it has no finished fold.")
    if not finished:
        raise AutosegError(
            f"{results_dataset_dir}: no model with a finished fold among {', '.join(m.folder for m in models) or '-'}."
            " Fix: train (and let it finish) at least one fold"
        )
    return finished


def _used_folds(
    finished: dict[ModelRef, tuple[int, ...]],
    folds: Sequence[int] | None,
    n_folds: int,
    splits_file: Path,
    notes: list[str],
) -> tuple[int, ...]:
    if folds is not None:
        used = tuple(sorted(set(folds)))
        for k in used:
            if not 0 <= k < n_folds:
                raise AutosegError(f"{splits_file}: has folds 0 to {n_folds - 1}, so fold {k} does not exist")
        for model, have in finished.items():
            lacking = sorted(set(used) - set(have))
            if lacking:
                raise AutosegError(
                    f"{model.folder}: fold(s) {', '.join(map(str, lacking))} not finished (finished: "
                    f"{', '.join(map(str, have))}). Fix: train them, or choose other --folds or models"
                )
        return used
    used = tuple(sorted(set.intersection(*(set(have) for have in finished.values()))))
    if not used:
        listing = "; ".join(f"{m.folder}: {', '.join(map(str, have))}" for m, have in finished.items())
        raise AutosegError(
            f"no fold is finished by every model ({listing}), so they cannot be compared on the same cases."
            " Fix: choose the models, or train the missing folds"
        )
    for model, have in finished.items():
        unused = sorted(set(have) - set(used))
        if unused:
            notes.append(
                f"`{model.folder}`: finished fold(s) {', '.join(map(str, unused))} not used, because not every"
                " model has them (choose models or folds to change that)."
            )
    return used


def _fold_predictions(
    fold_dir: Path, fold: int, val_cases: Sequence[str], file_ending: str, checkpoint: str
) -> dict[str, Path]:
    """Case id -> prediction file of every segmentation in the fold's validation folder, checked."""
    from autoseg.inference.weights import SAFETENSORS_FILE  # here: the module imports torch

    run = _read_run(fold_dir / RUN_FILE) or {}
    recorded = run.get("val_cases")
    if isinstance(recorded, list) and sorted(recorded) != sorted(val_cases):
        raise AutosegError(
            f"{fold_dir / RUN_FILE}: the fold validated {len(recorded)} cases, but splits.json now holds out"
            f" {len(val_cases)} other ones in fold {fold}; the splits changed after training."
            " Fix: restore splits.json, or retrain the fold"
        )
    if not (fold_dir / checkpoint).is_file() and not (fold_dir / SAFETENSORS_FILE).is_file():
        raise AutosegError(
            f"{fold_dir}: neither {checkpoint} nor {SAFETENSORS_FILE}, so the fold cannot predict later."
            " Fix: pass the checkpoint file name that exists, or retrain the fold"
        )
    validation = fold_dir / VALIDATION_DIR
    found = {
        p.name[: -len(file_ending)]: p
        for p in (sorted(validation.iterdir()) if validation.is_dir() else [])
        if p.name.endswith(file_ending) and not p.name.startswith(".")
    }
    missing = [c for c in sorted(val_cases) if c not in found]
    if missing:
        hint = " It was trained with --fast-dev-run, which validates 2 cases only." if run.get("fast_dev_run") else ""
        raise AutosegError(
            f"{validation}: no prediction for {len(missing)} of the {len(val_cases)} cases that fold {fold} holds"
            f" out ({_listed(missing)}).{hint} Fix: retrain the fold"
        )
    return found


def _with_probabilities(segmentations: dict[ModelRef, dict[str, Path]], notes: list[str]) -> Members:
    able = []
    for model, files in segmentations.items():
        lacking = [c for c, path in files.items() if not all(f.is_file() for f in probabilities_files(path))]
        if lacking:
            notes.append(
                f"`{model.folder}` cannot join ensembles: {len(lacking)} of {len(files)} cases have no stored"
                f" probabilities ({_listed(lacking)}); it is scored alone. Train with --save-probabilities."
            )
        else:
            able.append(model)
    return tuple(sorted(able))


def _listed(case_ids: Sequence[str]) -> str:
    more = f" and {len(case_ids) - _LISTED_CASES} more" if len(case_ids) > _LISTED_CASES else ""
    return ", ".join(case_ids[:_LISTED_CASES]) + more
