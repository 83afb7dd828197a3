"""The cases of a folder to predict: found by name, checked from their headers, every problem at once.

An input folder holds ``CASE_XXXX<file_ending>`` files (XXXX = channel 0000 .. C-1, nnU-Net's naming),
as the model's ``best.json`` declares them. Before any case is predicted, every file's header (not its
voxels) is read and all problems of all cases are reported together: a missing or extra channel, channels
that disagree in shape / spacing / origin / direction, an image of the wrong dimensionality, an unreadable
file, a file with another ending, or no case at all. A night's prediction run then cannot stop at case 412
over a file that could have been named on the first second.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.check import Problem, header_problems
from autoseg.dataset import CHANNEL_SUFFIX, Case, DatasetSpec
from autoseg.errors import AutosegError
from autoseg.io import Geometry, file_ending, read_image

# Files an input folder may hold beside its images without being reported: dataset descriptions, notes
# and tables that people keep with their test images (nnU-Net's own output folders hold dataset.json).
SIDECAR_ENDINGS = (".json", ".txt", ".md", ".csv", ".tsv")


@dataclass(frozen=True)
class InputCase:
    case_id: str
    image_files: tuple[Path, ...]  # one per channel, in channel order

    def output_file(self, output_dir: Path, ending: str) -> Path:
        return output_dir / f"{self.case_id}{ending}"


class InputCheckFailed(AutosegError):
    """The input folder cannot be predicted as it is; ``problems`` lists every reason."""

    def __init__(self, input_dir: Path, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"input folder {input_dir} has {len(self.problems)} problem(s); nothing was predicted:\n{lines}"
        )


def find_input_cases(
    input_dir: str | Path, ending: str, channel_names: Sequence[str]
) -> tuple[list[InputCase], list[Problem]]:
    """The cases of ``input_dir`` (sorted by id) and every problem of the folder and its files' headers."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        problem = Problem("no such folder", "pass the folder that holds the CASE_XXXX images with -i", file=input_dir)
        return [], [problem]
    channels: dict[str, dict[int, Path]] = {}
    problems: list[Problem] = []
    expected = _expected_names(ending, channel_names)
    for path in sorted(input_dir.iterdir()):
        if path.name.startswith(".") or path.is_dir() or path.name.lower().endswith(SIDECAR_ENDINGS):
            continue
        match = CHANNEL_SUFFIX.match(path.name[: -len(ending)]) if path.name.endswith(ending) else None
        if match is None:
            problems.append(_unmatched_problem(path, ending, expected))
        elif int(match["channel"]) >= len(channel_names):
            problems.append(
                Problem(
                    f"extra channel {int(match['channel'])}: the model takes {len(channel_names)} channel(s)"
                    f" ({expected})",
                    "remove the file, or predict with a model trained on this channel",
                    match["case"],
                    path,
                )
            )
        else:
            channels.setdefault(match["case"], {})[int(match["channel"])] = path
    cases = [
        InputCase(
            case_id,
            tuple(found.get(c, input_dir / f"{case_id}_{c:04d}{ending}") for c in range(len(channel_names))),
        )
        for case_id, found in sorted(channels.items())
    ]
    if not cases:
        problems.append(
            Problem(
                f"no cases found (looked for {expected})",
                f"put the images into this folder named CASE_XXXX{ending}, XXXX being the channel number",
                file=input_dir,
            )
        )
    spec = _input_spec(input_dir, ending, channel_names, cases)
    for case in spec.test:
        problems += header_problems(spec, case, is_training=False)
    return cases, problems


def checked_input_cases(input_dir: str | Path, ending: str, channel_names: Sequence[str]) -> list[InputCase]:
    """``find_input_cases``, raising ``InputCheckFailed`` with every problem when there is any."""
    cases, problems = find_input_cases(input_dir, ending, channel_names)
    if problems:
        raise InputCheckFailed(Path(input_dir), problems)
    return cases


def read_input_case(case: InputCase) -> tuple[np.ndarray, Geometry]:
    """The case's channels as one (C, z, y, x) float32 array, and the geometry of its first channel."""
    arrays = []
    geometry: Geometry | None = None
    for path in case.image_files:
        array, channel_geometry = read_image(path)
        geometry = geometry or channel_geometry
        arrays.append(array)
    assert geometry is not None
    return np.stack(arrays).astype(np.float32, copy=False), geometry


def _expected_names(ending: str, channel_names: Sequence[str]) -> str:
    return ", ".join(f"CASE_{c:04d}{ending} ({name})" for c, name in enumerate(channel_names))


def _unmatched_problem(path: Path, ending: str, expected: str) -> Problem:
    other = file_ending(path)
    if other and other != ending:
        return Problem(
            f"file ending {other!r}, but the model reads {ending!r} files",
            f"convert the file to {ending} (e.g. SimpleITK ReadImage + WriteImage), or move it out of the folder",
            file=path,
        )
    return Problem(
        f"name does not follow CASE_XXXX{ending}; the model expects {expected}",
        "rename the file (XXXX is the channel number), or move it out of the folder",
        file=path,
    )


def _input_spec(input_dir: Path, ending: str, channel_names: Sequence[str], cases: list[InputCase]) -> DatasetSpec:
    """The input folder as an nnU-Net-layout dataset of test cases, so that the dataset check reads its headers."""
    return DatasetSpec(
        name=input_dir.name,
        root=input_dir,
        layout="nnunet",
        channel_names=tuple(channel_names),
        labels={"background": 0},
        file_ending=ending,
        num_training=0,
        training=(),
        test=tuple(Case(c.case_id, c.image_files, None) for c in cases),
    )
