"""Evaluate a folder of predicted segmentations against a folder of references; write summary.json.

summary.json holds, as nnU-Net's does, ``metric_per_case`` (one entry per case: its files and the metrics of
every label), ``mean`` (per label, the mean over cases) and ``foreground_mean`` (per metric, the mean over
the labels other than 0 of their means). Means skip NaN (a label absent from both prediction and reference
says nothing about the prediction). JSON has no NaN or infinity, so non-finite values are written as null:
a per-case HD95 of null next to a Dice of 0 means one of the two masks is empty (HD95 is inf in Python), and
a mean HD95 of null means that happened in at least one case.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autoseg import atomic
from autoseg.errors import AutosegError
from autoseg.evaluation.metrics import METRIC_NAMES, case_metrics
from autoseg.io import SUPPORTED_ENDINGS, file_ending, read_image
from autoseg.parallel import parallel_map

SUMMARY_FILE = "summary.json"
# How many missing case names an error message lists before it says "and N more".
_LISTED_CASES = 10


@dataclass(frozen=True)
class _CaseJob:
    case_id: str
    prediction_file: Path
    reference_file: Path
    labels: tuple[int, ...]
    tolerance_mm: float


def evaluate_folder(
    pred_dir: str | Path,
    gt_dir: str | Path,
    labels: Mapping[str, int] | None = None,
    file_ending: str | None = None,
    output_file: str | Path | None = None,
    tolerance_mm: float = 1.0,
    num_workers: int | None = None,
    show_progress: bool = True,
    case_ids: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Score every reference in ``gt_dir`` against the prediction of the same file name in ``pred_dir``.

    ``labels`` (name -> value) default to those of a dataset.json beside or inside ``gt_dir``, else to every
    value found in the references. ``file_ending`` defaults to the most common supported ending in ``gt_dir``.
    The summary goes to ``output_file`` (default ``pred_dir/summary.json``) and is returned as written.
    ``case_ids`` restricts the scoring to those references (a fold's held-out cases).
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for folder, role in ((gt_dir, "reference"), (pred_dir, "prediction")):
        if not folder.is_dir():
            raise AutosegError(f"{folder}: no such {role} folder")
    ending = _check_ending(file_ending, gt_dir) if file_ending else _most_common_ending(gt_dir)
    references = [p for p in _image_files(gt_dir) if _ending_of(p) == ending]
    if case_ids is not None:  # a subset, e.g. one fold's held-out cases
        wanted = set(case_ids)
        references = [p for p in references if p.name[: -len(ending)] in wanted]
        found = {p.name[: -len(ending)] for p in references}
        if wanted - found:
            raise AutosegError(f"{gt_dir}: no reference for {', '.join(sorted(wanted - found))}")
    if not references:
        raise AutosegError(f"{gt_dir}: no reference files ending in {ending}")
    case_ids = [p.name[: -len(ending)] for p in references]
    predictions = [pred_dir / (case_id + ending) for case_id in case_ids]
    _check_predictions_exist(pred_dir, gt_dir, ending, case_ids, predictions)

    label_map = dict(labels) if labels is not None else _labels_from_dataset_json(gt_dir)
    if label_map is None:
        label_map = _labels_found(references, num_workers, show_progress)
    label_map = _validated(label_map)

    jobs = [
        _CaseJob(case_id, prediction, reference, tuple(label_map.values()), tolerance_mm)
        for case_id, prediction, reference in zip(case_ids, predictions, references)
    ]
    per_case = parallel_map(_evaluate_case, jobs, num_workers, desc="evaluate", show_progress=show_progress)
    summary = _summary(per_case, label_map, pred_dir, gt_dir, ending, tolerance_mm)
    atomic.write_json(Path(output_file) if output_file is not None else pred_dir / SUMMARY_FILE, summary)
    return summary


def _image_files(folder: Path) -> list[Path]:
    # names starting with a dot are hidden files, among them the temporaries of an interrupted atomic write
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and _ending_of(p))


def _ending_of(path: Path) -> str:
    return file_ending(path.name)


def _check_ending(ending: str, gt_dir: Path) -> str:
    if ending.lower() not in SUPPORTED_ENDINGS:
        raise AutosegError(
            f"file ending {ending!r} for {gt_dir} is not supported; use one of {', '.join(SUPPORTED_ENDINGS)}"
        )
    return ending.lower()


def _most_common_ending(gt_dir: Path) -> str:
    counts = Counter(_ending_of(p) for p in _image_files(gt_dir))
    if not counts:
        raise AutosegError(f"{gt_dir}: no reference images (files ending in {', '.join(SUPPORTED_ENDINGS)})")
    return counts.most_common(1)[0][0]


def _check_predictions_exist(
    pred_dir: Path, gt_dir: Path, ending: str, case_ids: list[str], predictions: list[Path]
) -> None:
    missing = [case_id for case_id, path in zip(case_ids, predictions) if not path.is_file()]
    if not missing:
        return
    listed = ", ".join(missing[:_LISTED_CASES])
    more = f" and {len(missing) - _LISTED_CASES} more" if len(missing) > _LISTED_CASES else ""
    raise AutosegError(
        f"{pred_dir}: no prediction for {len(missing)} of the {len(case_ids)} references in {gt_dir}:"
        f" {listed}{more}. Each prediction must be named like its reference (CASE{ending})."
    )


def _labels_from_dataset_json(gt_dir: Path) -> dict[str, int] | None:
    """The labels of a dataset.json beside ``gt_dir`` (nnU-Net's labelsTr layout) or inside it, if any."""
    for candidate in (gt_dir.parent / "dataset.json", gt_dir / "dataset.json"):
        if candidate.is_file():
            return _parse_labels(candidate)
    return None


def _parse_labels(file: Path) -> dict[str, int]:
    """nnU-Net's ``{"name": value}`` or the Decathlon's ``{"value": "name"}``."""
    try:
        raw = json.loads(file.read_text(encoding="utf-8")).get("labels")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise AutosegError(f"{file}: cannot read its 'labels' ({exc}); pass the labels explicitly") from None
    if not isinstance(raw, dict) or not raw:
        raise AutosegError(f"{file}: no 'labels' object to evaluate with; pass the labels explicitly")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in raw.values()):
        return {str(name): int(value) for name, value in raw.items()}
    if all(isinstance(k, str) and k.isdigit() for k in raw):
        return {str(name): int(value) for value, name in raw.items()}
    raise AutosegError(
        f"{file}: 'labels' must map names to integers (regions are not supported); got {raw}."
        " Pass the labels explicitly to evaluate anyway."
    )


def _labels_found(references: Sequence[Path], num_workers: int | None, show_progress: bool) -> dict[str, int]:
    found = parallel_map(_label_values, list(references), num_workers, desc="labels", show_progress=show_progress)
    values = sorted(set().union(*found))
    return {str(value): value for value in values}


def _label_values(path: Path) -> set[int]:
    array, _ = read_image(path)
    return {int(v) for v in np.unique(array)}


def _validated(labels: Mapping[str, int]) -> dict[str, int]:
    if not labels:
        raise AutosegError("no labels to evaluate: pass at least one, e.g. {'tumour': 1}")
    for name, value in labels.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise AutosegError(f"label {name!r} must be an integer value, got {value!r}")
    if len(set(labels.values())) != len(labels):
        raise AutosegError(f"two labels share one value: {dict(labels)}")
    return {str(name): int(value) for name, value in sorted(labels.items(), key=lambda item: int(item[1]))}


def _evaluate_case(job: _CaseJob) -> dict[str, Any]:
    reference, reference_geometry = read_image(job.reference_file)
    prediction, prediction_geometry = read_image(job.prediction_file)
    if prediction.shape != reference.shape:
        raise AutosegError(
            f"{job.prediction_file}: shape {prediction.shape} differs from the reference"
            f" {job.reference_file} {reference.shape}; predictions must be in the reference's image grid"
        )
    differing = reference_geometry.matches(prediction_geometry)
    if differing:
        details = "; ".join(
            f"{name} {getattr(prediction_geometry, name)} vs {getattr(reference_geometry, name)}" for name in differing
        )
        raise AutosegError(
            f"{job.prediction_file}: geometry differs from the reference {job.reference_file} ({details})"
        )
    metrics = case_metrics(prediction, reference, job.labels, reference_geometry.spacing_mm, job.tolerance_mm)
    return {
        "case": job.case_id,
        "prediction_file": str(job.prediction_file),
        "reference_file": str(job.reference_file),
        "metrics": metrics,
    }


def mean_skipping_nan(values: Iterable[float]) -> float:
    """Mean skipping NaN; NaN when nothing is left. inf stays (an empty mask on one side is a failure)."""
    kept = [float(v) for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def _summary(
    per_case: list[dict[str, Any]],
    labels: dict[str, int],
    pred_dir: Path,
    gt_dir: Path,
    ending: str,
    tolerance_mm: float,
) -> dict[str, Any]:
    means = {
        value: {
            metric: mean_skipping_nan(case["metrics"][value][metric] for case in per_case) for metric in METRIC_NAMES
        }
        for value in labels.values()
    }
    foreground = [value for value in labels.values() if value != 0]
    foreground_mean = {
        metric: mean_skipping_nan(means[value][metric] for value in foreground) for metric in METRIC_NAMES
    }
    summary = {
        "prediction_folder": str(pred_dir),
        "reference_folder": str(gt_dir),
        "file_ending": ending,
        "tolerance_mm": tolerance_mm,
        "labels": labels,
        "foreground_mean": foreground_mean,
        "mean": {str(value): metrics for value, metrics in means.items()},
        "metric_per_case": [
            {**case, "metrics": {str(value): metrics for value, metrics in case["metrics"].items()}}
            for case in per_case
        ],
    }
    return _json_safe(summary)


def _json_safe(value: Any) -> Any:
    """NaN and infinities become None, since JSON has neither."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
