"""The dataset description (``dataset.json``) and the discovery of its cases.

Two layouts are read without editing:

* nnU-Net v2: ``imagesTr/CASE_XXXX<ending>`` (XXXX = channel), ``labelsTr/CASE<ending>``, optional
  ``imagesTs/`` (and ``labelsTs/``), and ``channel_names``, ``labels`` (name -> integer),
  ``numTraining``, ``file_ending`` in dataset.json.
* Medical Segmentation Decathlon: ``modality``, ``labels`` (integer as a string -> name) and the
  ``training`` / ``test`` lists; a multi-modal case is one 4D file whose last ITK axis is the channel.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.errors import AutosegError
from autoseg.io import SUPPORTED_ENDINGS, Geometry, file_ending, read_image

CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


class DatasetError(AutosegError):
    """dataset.json or the folder layout cannot be used at all."""


@dataclass(frozen=True)
class Case:
    case_id: str
    image_files: tuple[Path, ...]  # one per channel; MSD: a single (maybe 4D) file holding every channel
    label_file: Path | None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    root: Path
    layout: str  # "nnunet" or "msd"
    channel_names: tuple[str, ...]
    labels: dict[str, int]  # name -> integer; background is 0
    file_ending: str
    num_training: int  # as declared in dataset.json
    training: tuple[Case, ...]
    test: tuple[Case, ...]
    unmatched_files: tuple[Path, ...] = ()  # files in the case folders that belong to no case

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def label_values(self) -> list[int]:
        return sorted(self.labels.values())

    @property
    def foreground_labels(self) -> list[int]:
        return [v for v in self.label_values if v != 0]

    def label_name(self, value: int) -> str:
        return next(name for name, v in self.labels.items() if v == value)

    @property
    def description_file(self) -> Path:
        return self.root / "dataset.json"


def load_dataset(root: str | Path) -> DatasetSpec:
    """Read ``root/dataset.json`` and discover the cases; raises DatasetError when that is impossible."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset folder")
    description_file = root / "dataset.json"
    if not description_file.is_file():
        raise DatasetError(
            f"{description_file}: missing. Every dataset folder needs a dataset.json; see"
            " datasets.json.example in the autoseg repository for every field."
        )
    try:
        description = json.loads(description_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{description_file}: not valid JSON ({exc})") from None
    if not isinstance(description, dict):
        raise DatasetError(f"{description_file}: must hold a JSON object")
    if "training" in description or "modality" in description:
        return _load_msd(root, description)
    return _load_nnunet(root, description)


def _require_fields(description: dict[str, Any], examples: dict[str, str], file: Path) -> None:
    """Fail naming every missing field at once, each with an example of its form."""
    missing = [field for field in examples if field not in description]
    if not missing:
        return
    noun = f"field {missing[0]!r} is" if len(missing) == 1 else f"fields {', '.join(missing)} are"
    raise DatasetError(f"{file}: {noun} missing; e.g. {', '.join(examples[f] for f in missing)}")


def _channel_names(raw: Any, field: str, file: Path) -> tuple[str, ...]:
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f'{file}: {field!r} must be an object like {{"0": "T1", "1": "T2"}}')
    try:
        indices = sorted(int(k) for k in raw)
    except ValueError:
        raise DatasetError(f"{file}: {field!r} keys must be channel numbers 0, 1, ...; got {list(raw)}") from None
    if indices != list(range(len(raw))):
        raise DatasetError(f"{file}: {field!r} keys must be 0..{len(raw) - 1} without gaps; got {indices}")
    return tuple(str(raw[str(i)]) for i in indices)


def _labels_nnunet(raw: Any, file: Path) -> dict[str, int]:
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f'{file}: "labels" must be an object like {{"background": 0, "tumour": 1}}')
    labels: dict[str, int] = {}
    for name, value in raw.items():
        if isinstance(value, list):
            raise DatasetError(
                f"{file}: label {name!r} is a region (a list of values); autoseg supports one integer per label"
            )
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DatasetError(f"{file}: label {name!r} must be a non-negative integer, got {value!r}")
        labels[str(name)] = value
    return _validated_labels(labels, file)


def _validated_labels(labels: dict[str, int], file: Path) -> dict[str, int]:
    values = list(labels.values())
    if len(set(values)) != len(values):
        raise DatasetError(f"{file}: two labels share one integer value: {labels}")
    if 0 not in values:
        raise DatasetError(f'{file}: "labels" must declare the background as 0, e.g. "background": 0')
    return dict(sorted(labels.items(), key=lambda kv: kv[1]))


def _num_training(description: dict[str, Any], file: Path) -> int:
    value = description["numTraining"]
    if isinstance(value, bool) or not isinstance(value, int):
        raise DatasetError(f"{file}: 'numTraining' must be an integer, got {value!r}")
    return value


NNUNET_REQUIRED_FIELDS = {
    "channel_names": '"channel_names": {"0": "T1"}',
    "labels": '"labels": {"background": 0, "tumour": 1}',
    "numTraining": '"numTraining": 24',
    "file_ending": '"file_ending": ".nii.gz"',
}
MSD_REQUIRED_FIELDS = {
    "modality": '"modality": {"0": "MRI"}',
    "labels": '"labels": {"0": "background", "1": "tumour"}',
    "numTraining": '"numTraining": 24',
    "training": '"training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]',
}


def _load_nnunet(root: Path, description: dict[str, Any]) -> DatasetSpec:
    file = root / "dataset.json"
    _require_fields(description, NNUNET_REQUIRED_FIELDS, file)
    channel_names = _channel_names(description["channel_names"], "channel_names", file)
    labels = _labels_nnunet(description["labels"], file)
    ending = description["file_ending"]
    if ending not in SUPPORTED_ENDINGS:
        raise DatasetError(f"{file}: file_ending {ending!r} is not supported; use one of {SUPPORTED_ENDINGS}")
    num_training = _num_training(description, file)
    training, unmatched_tr = _discover(root / "imagesTr", root / "labelsTr", ending, len(channel_names))
    test, unmatched_ts = _discover(root / "imagesTs", root / "labelsTs", ending, len(channel_names))
    return DatasetSpec(
        name=root.name,
        root=root,
        layout="nnunet",
        channel_names=channel_names,
        labels=labels,
        file_ending=ending,
        num_training=num_training,
        training=training,
        test=test,
        unmatched_files=unmatched_tr + unmatched_ts,
    )


def _discover(
    image_dir: Path, label_dir: Path, ending: str, num_channels: int
) -> tuple[tuple[Case, ...], tuple[Path, ...]]:
    """Group ``CASE_XXXX<ending>`` files into cases; files that fit no case are returned apart."""
    unmatched: list[Path] = []
    channels: dict[str, dict[int, Path]] = {}
    for path in sorted(image_dir.iterdir()) if image_dir.is_dir() else []:
        if path.name.startswith(".") or path.is_dir():
            continue
        match = CHANNEL_SUFFIX.match(path.name[: -len(ending)]) if path.name.endswith(ending) else None
        if match is None or int(match["channel"]) >= num_channels:
            unmatched.append(path)
            continue
        channels.setdefault(match["case"], {})[int(match["channel"])] = path
    labels = {}
    for path in sorted(label_dir.iterdir()) if label_dir.is_dir() else []:
        if path.name.startswith(".") or path.is_dir():
            continue
        if path.name.endswith(ending) and path.name[: -len(ending)] in channels:
            labels[path.name[: -len(ending)]] = path
        else:
            unmatched.append(path)
    cases = tuple(
        Case(
            case_id,
            tuple(found[c] if c in found else image_dir / f"{case_id}_{c:04d}{ending}" for c in range(num_channels)),
            labels.get(case_id) if label_dir.is_dir() else None,
        )
        for case_id, found in sorted(channels.items())
    )
    return cases, tuple(unmatched)


def _load_msd(root: Path, description: dict[str, Any]) -> DatasetSpec:
    file = root / "dataset.json"
    _require_fields(description, MSD_REQUIRED_FIELDS, file)
    channel_names = _channel_names(description["modality"], "modality", file)
    raw_labels = description["labels"]
    if not isinstance(raw_labels, dict):
        raise DatasetError(f'{file}: "labels" must be an object like {{"0": "background"}}')
    try:
        labels = {str(name): int(value) for value, name in raw_labels.items()}
    except ValueError:
        raise DatasetError(f"{file}: MSD label keys must be integers as strings; got {list(raw_labels)}") from None
    labels = _validated_labels(labels, file)
    training_list = description["training"]
    if not isinstance(training_list, list):
        raise DatasetError(f'{file}: "training" must be a list of {{"image": ..., "label": ...}}')
    training = []
    for i, entry in enumerate(training_list):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise DatasetError(f'{file}: training[{i}] must be {{"image": "./imagesTr/X.nii.gz", "label": ...}}')
        image = root / entry["image"]
        training.append(Case(_msd_case_id(image), (image,), root / entry["label"]))
    test = [Case(_msd_case_id(root / p), (root / p,), None) for p in description.get("test", [])]
    endings = {file_ending(c.image_files[0]) for c in training} or {".nii.gz"}
    return DatasetSpec(
        name=root.name,
        root=root,
        layout="msd",
        channel_names=channel_names,
        labels=labels,
        file_ending=sorted(endings)[0],
        num_training=_num_training(description, file),
        training=tuple(training),
        test=tuple(test),
    )


def _msd_case_id(image: Path) -> str:
    ending = file_ending(image)
    return image.name[: -len(ending)] if ending else image.name


def load_case(spec: DatasetSpec, case: Case) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
    """Read a case: image (C, z, y, x) float32, label (z, y, x) or None, and the geometry of channel 0."""
    arrays: list[np.ndarray] = []
    geometry: Geometry | None = None
    for path in case.image_files:
        array, g = read_image(path)
        geometry = geometry or g
        if spec.layout == "msd" and spec.num_channels > 1:
            arrays.extend(array)  # 4D: (channel, z, y, x)
        else:
            arrays.append(array)
    assert geometry is not None
    image = np.stack(arrays).astype(np.float32, copy=False)
    label = None
    if case.label_file is not None:
        label, _ = read_image(case.label_file)
    return image, label, geometry
