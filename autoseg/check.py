"""The dataset check: every problem at once, each naming the case, the file and how to fix it.

The check has two halves. ``header_problems`` reads only file headers (cheap: every command runs it);
``content_problems`` needs the voxels (NaN/Inf, label values) and therefore runs inside the
fingerprint's pass over the data, so a dataset is read once for both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autoseg.dataset import Case, DatasetSpec, load_case, load_dataset
from autoseg.errors import AutosegError
from autoseg.io import file_ending, nifti_truncation
from autoseg.parallel import parallel_map

# Relative tolerance for spacing/origin/direction agreement between a case's files (nnU-Net uses 1e-3 too
# in verify_dataset_integrity); scanners and converters round these values slightly differently.
GEOMETRY_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Problem:
    message: str
    fix: str
    case: str | None = None
    file: Path | None = None

    def __str__(self) -> str:
        where = " ".join(
            p for p in (f"case {self.case}:" if self.case else "", f"{self.file}:" if self.file else "") if p
        )
        return f"{where} {self.message}. Fix: {self.fix}".strip()


class DatasetCheckFailed(AutosegError):
    def __init__(self, spec_root: Path, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"dataset {spec_root} has {len(self.problems)} problem(s):\n{lines}")


@dataclass(frozen=True)
class _Header:
    dimension: int
    size: tuple[int, ...]  # ITK order
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    components: int


def _read_header(path: Path) -> _Header:
    problem = nifti_truncation(path)
    if problem:
        raise RuntimeError(problem)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return _Header(
        reader.GetDimension(),
        tuple(reader.GetSize()),
        tuple(reader.GetSpacing()),
        tuple(reader.GetOrigin()),
        tuple(reader.GetDirection()),
        reader.GetNumberOfComponents(),
    )


def dataset_problems(spec: DatasetSpec) -> list[Problem]:
    """Problems of the dataset as a whole (no file is opened)."""
    problems = []
    description = spec.description_file
    if not spec.training:
        problems.append(
            Problem(
                f"no training cases found (looked for imagesTr/CASE_0000{spec.file_ending})",
                "put the images into imagesTr/ named CASE_XXXX" + spec.file_ending + " (XXXX = channel number)",
                file=spec.root / "imagesTr",
            )
        )
    elif spec.num_training != len(spec.training):
        problems.append(
            Problem(
                f"numTraining is {spec.num_training} but {len(spec.training)} training cases were found",
                f'set "numTraining": {len(spec.training)} in dataset.json, or add the missing cases',
                file=description,
            )
        )
    for path in spec.unmatched_files:
        ending = file_ending(path)
        if ending and ending != spec.file_ending:
            problems.append(
                Problem(
                    f"wrong file ending {ending!r}; dataset.json says file_ending is {spec.file_ending!r}",
                    f"convert the file to {spec.file_ending} or change file_ending in dataset.json",
                    file=path,
                )
            )
        elif path.parent.name.startswith("labels"):
            problems.append(
                Problem(
                    "label file matches no case (no image CASE_0000 of that name)",
                    "add the case's images or remove the label file",
                    file=path,
                )
            )
        else:
            problems.append(
                Problem(
                    f"file matches no case; image files must be named CASE_XXXX{spec.file_ending} with XXXX a"
                    f" channel number below {spec.num_channels}",
                    "rename or remove it, or declare the channel in channel_names",
                    file=path,
                )
            )
    return problems


def header_problems(spec: DatasetSpec, case: Case, is_training: bool = True) -> list[Problem]:
    """Problems visible from the file headers of one case."""
    problems: list[Problem] = []
    headers: dict[Path, _Header] = {}
    files = list(case.image_files) + ([case.label_file] if case.label_file else [])
    for channel, path in enumerate(case.image_files):
        if not path.is_file():
            problems.append(
                Problem(
                    f"channel {channel} ({spec.channel_names[channel] if channel < spec.num_channels else '?'})"
                    " is missing",
                    f"add {path.name}, or remove the case's other files",
                    case.case_id,
                    path,
                )
            )
    if is_training and (case.label_file is None or not case.label_file.is_file()):
        expected = case.label_file or spec.root / "labelsTr" / f"{case.case_id}{spec.file_ending}"
        problems.append(Problem("label file is missing", f"add {expected}", case.case_id, expected))
    for path in files:
        if path is None or not path.is_file():
            continue
        try:
            headers[path] = _read_header(path)
        except RuntimeError as exc:
            problems.append(
                Problem(
                    f"cannot be read as an image ({_short(exc)})",
                    "re-export the file from its source",
                    case.case_id,
                    path,
                )
            )
    if not headers:
        return problems
    expected_dims = {3, 2}
    for path, h in headers.items():
        is_image = path != case.label_file
        multichannel_file = is_image and spec.layout == "msd" and spec.num_channels > 1
        if multichannel_file:
            if h.dimension != 4 or h.size[3] != spec.num_channels:
                problems.append(
                    Problem(
                        f"expected a 4D image with {spec.num_channels} channels (MSD layout), got"
                        f" {h.dimension}D of size {h.size}",
                        "store each case's modalities as the 4th axis, in the order of 'modality'",
                        case.case_id,
                        path,
                    )
                )
        elif h.dimension not in expected_dims:
            problems.append(
                Problem(
                    f"is a {h.dimension}D image of size {h.size} where a 3D image is expected",
                    "split the 4th axis into one file per channel (CASE_0000, CASE_0001, ...) and declare each"
                    " in channel_names"
                    if is_image
                    else "labels must be a single 3D volume",
                    case.case_id,
                    path,
                )
            )
        if h.components != 1:
            problems.append(
                Problem(
                    f"has {h.components} values per voxel (a vector/RGB image)",
                    "store each component as its own channel file",
                    case.case_id,
                    path,
                )
            )
    problems += _geometry_problems(case, headers)
    return problems


def _short(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0][:200] if lines else "corrupt or not an image"


def _geometry_problems(case: Case, headers: dict[Path, _Header]) -> list[Problem]:
    problems = []
    items = list(headers.items())
    ref_path, ref = items[0]
    for path, h in items[1:]:
        size, ref_size = h.size[:3], ref.size[:3]
        if size != ref_size:
            problems.append(
                Problem(
                    f"shape {tuple(reversed(size))} (z, y, x) differs from"
                    f" {ref_path.name}'s {tuple(reversed(ref_size))}",
                    "resample all of a case's files onto one grid",
                    case.case_id,
                    path,
                )
            )
            continue
        for field in ("spacing", "origin", "direction"):
            a, b = np.asarray(getattr(h, field)), np.asarray(getattr(ref, field))
            if field == "direction" and a.size != b.size:  # 4D MSD image against 3D label
                n = 3
                a = a.reshape(int(np.sqrt(a.size)), -1)[:n, :n].ravel()
                b = b.reshape(int(np.sqrt(b.size)), -1)[:n, :n].ravel()
            a, b = a[: min(a.size, b.size)], b[: min(a.size, b.size)]
            scale = max(1.0, float(np.abs(a).max()), float(np.abs(b).max()))
            if np.abs(a - b).max() > GEOMETRY_TOLERANCE * scale:
                problems.append(
                    Problem(
                        f"{field} {tuple(np.round(a, 4))} differs from {ref_path.name}'s {tuple(np.round(b, 4))}",
                        f"copy the {field} of the image into the label (e.g. SimpleITK CopyInformation) if they"
                        " are truly aligned, otherwise resample",
                        case.case_id,
                        path,
                    )
                )
    return problems


def content_problems(spec: DatasetSpec, case: Case, image: np.ndarray, label: np.ndarray | None) -> list[Problem]:
    """Problems that need the voxels: non-finite intensities and undeclared or non-integer labels."""
    problems = []
    for channel, channel_image in enumerate(image):
        bad = int(np.count_nonzero(~np.isfinite(channel_image)))
        if bad:
            path = case.image_files[min(channel, len(case.image_files) - 1)]
            problems.append(
                Problem(
                    f"channel {channel} has {bad} NaN or infinite voxel(s)",
                    "replace them in the source image (e.g. with 0) and re-export",
                    case.case_id,
                    path,
                )
            )
    if label is not None:
        fractional = not np.issubdtype(label.dtype, np.integer) and (
            not np.all(np.isfinite(label)) or np.any(np.mod(label, 1) != 0)
        )
        if fractional:
            problems.append(
                Problem(
                    "label map holds non-integer values",
                    "labels must be whole numbers; round or re-export the label map as an integer type",
                    case.case_id,
                    case.label_file,
                )
            )
            return problems
        present = {int(v) for v in np.unique(label)}
        undeclared = sorted(present - set(spec.label_values))
        if undeclared:
            problems.append(
                Problem(
                    f"label values {undeclared} are not declared in dataset.json (declared: {spec.labels})",
                    "add them to 'labels' in dataset.json, or fix the label map",
                    case.case_id,
                    case.label_file,
                )
            )
    return problems


def _check_case_fully(args: tuple[DatasetSpec, Case, bool]) -> list[Problem]:
    spec, case, is_training = args
    problems = header_problems(spec, case, is_training)
    if problems:
        return problems
    try:
        image, label, _ = load_case(spec, case)
    except AutosegError as exc:
        return [Problem(str(exc), "re-export the file from its source", case.case_id)]
    return content_problems(spec, case, image, label)


def check_headers(spec: DatasetSpec) -> list[Problem]:
    """The cheap half of the check: dataset-level problems and every case's headers."""
    problems = dataset_problems(spec)
    for case in spec.training:
        problems += header_problems(spec, case, True)
    for case in spec.test:
        problems += header_problems(spec, case, False)
    return problems


def check_dataset(
    root: str | Path, num_workers: int | None = None, content: bool = True, show_progress: bool = True
) -> tuple[DatasetSpec, list[Problem]]:
    """Load and check a dataset; ``content`` also reads every voxel."""
    spec = load_dataset(root)
    if not content:
        return spec, check_headers(spec)
    problems = dataset_problems(spec)
    jobs = [(spec, c, True) for c in spec.training] + [(spec, c, False) for c in spec.test]
    for case_problems in parallel_map(_check_case_fully, jobs, num_workers, "checking", show_progress):
        problems += case_problems
    return spec, problems


def require_valid(spec: DatasetSpec, problems: Sequence[Problem]) -> DatasetSpec:
    if problems:
        raise DatasetCheckFailed(spec.root, problems)
    return spec
