"""Preprocess every training case of a dataset for one or more configurations, in parallel, resumably.

Per case the folder holds ``CASE.npy`` (image, (C, z, y, x) float32), ``CASE_seg.npy`` (labels),
``CASE_locations.npy`` ((N, 4) int32: label value, z, y, x) and ``CASE.json`` (CaseProperties). Every
file is written atomically and the JSON last, so a case whose JSON exists is complete. A folder also holds
``configuration.json``: when the plan that made it differs from the current one, the folder is redone.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from autoseg import atomic, serialization
from autoseg.dataset import Case, DatasetSpec, load_case
from autoseg.parallel import parallel_map
from autoseg.paths import Paths
from autoseg.plan import Configuration, Plan
from autoseg.preprocessing.case import CaseProperties, preprocess_case


def case_files(folder: Path, case_id: str) -> dict[str, Path]:
    return {
        "image": folder / f"{case_id}.npy",
        "label": folder / f"{case_id}_seg.npy",
        "locations": folder / f"{case_id}_locations.npy",
        "properties": folder / f"{case_id}.json",
    }


def is_complete(folder: Path, case_id: str) -> bool:
    files = case_files(folder, case_id)
    if not all(p.is_file() for p in files.values()):
        return False
    try:  # the headers must be readable; the payload was renamed into place whole
        for key in ("image", "label", "locations"):
            np.load(files[key], mmap_mode="r", allow_pickle=False)
        serialization.load(CaseProperties, files["properties"])
    except (ValueError, OSError, serialization.SchemaError):
        return False
    return True


@dataclass(frozen=True)
class _Job:
    spec: DatasetSpec
    case: Case
    plan: Plan
    configuration: Configuration
    folder: Path
    seed: int


def _preprocess_one(job: _Job) -> str:
    image, label, geometry = load_case(job.spec, job.case)
    result = preprocess_case(image, label, geometry, job.plan, job.configuration, job.case.case_id, job.seed)
    files = case_files(job.folder, job.case.case_id)
    atomic.save_npy(files["image"], result.image)
    assert result.label is not None
    atomic.save_npy(files["label"], result.label)
    atomic.save_npy(files["locations"], result.locations)
    serialization.save(result.properties, files["properties"])
    return job.case.case_id


def _configuration_record(plan: Plan, configuration: Configuration) -> dict[str, object]:
    """Everything in the plan that changes this configuration's preprocessed files."""
    return serialization.to_jsonable(
        {
            "transpose_forward": plan.transpose_forward,
            "foreground_intensity_per_channel": plan.foreground_intensity_per_channel,
            "labels": plan.labels,
            "spacing_mm": configuration.spacing_mm,
            "normalization": configuration.normalization,
            "use_mask_for_norm": configuration.use_mask_for_norm,
            "resampling": configuration.resampling,
        }
    )


def prepare_folder(folder: Path, record: dict[str, object]) -> None:
    """Make ``folder`` hold data of ``record``'s plan: data made by another plan is removed first.

    Two runs must not preprocess the same folder at once: each would remove the other's temporaries.
    """
    record_file = folder / "configuration.json"
    if folder.exists():
        try:
            old = json.loads(record_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if old != record:
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in folder.glob(".*"):  # temporaries of a run that was killed before it could clean up
        if leftover.is_file():
            leftover.unlink()
    if not record_file.exists():
        atomic.write_json(record_file, record)


def _copy(source: Path, target: Path) -> None:
    shutil.copyfile(source, target)


def copy_ground_truth(spec: DatasetSpec, target_dir: Path) -> None:
    """Keep the training labels beside the preprocessed data, for evaluation after training."""
    for case in spec.training:
        assert case.label_file is not None
        target = target_dir / f"{case.case_id}{spec.file_ending}"
        if target.is_file() and target.stat().st_size == case.label_file.stat().st_size:
            continue
        atomic.write_with(target, partial(_copy, case.label_file))


def preprocess_dataset(
    spec: DatasetSpec,
    plan: Plan,
    configurations: list[str],
    paths: Paths,
    num_workers: int | None = None,
    seed: int = 0,
    show_progress: bool = True,
) -> dict[str, Path]:
    """Preprocess the training cases for each named configuration; returns the folder of each."""
    folders = {}
    for name in configurations:
        configuration = plan.configuration(name)
        folder = paths.configuration_dir(spec.name, configuration.data_identifier)
        prepare_folder(folder, _configuration_record(plan, configuration))
        jobs = [
            _Job(spec, case, plan, configuration, folder, seed + index)
            for index, case in enumerate(spec.training)
            if not is_complete(folder, case.case_id)
        ]
        parallel_map(_preprocess_one, jobs, num_workers, f"preprocess {name}", show_progress)
        folders[name] = folder
    copy_ground_truth(spec, paths.ground_truth_dir(spec.name))
    return folders
