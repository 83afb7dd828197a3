"""Ensembles of stored class probabilities: average them, take the argmax, write the segmentation.

Each prediction folder holds ``CASE.npz`` + ``CASE_probabilities.json`` (``autoseg.inference.export``) beside
``CASE<ending>``. Members are summed in float32 in the order given and divided by their number, so that
``find_best`` (which passes its members sorted) scores exactly the argmax that ``ensemble_folders`` writes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from autoseg.errors import AutosegError
from autoseg.inference.export import (
    ProbabilitiesInfo,
    labels_from_probabilities,
    load_probabilities,
    probabilities_files,
    write_probabilities,
)
from autoseg.io import SUPPORTED_ENDINGS, write_segmentation
from autoseg.parallel import parallel_map

NPZ_SUFFIX = ".npz"
INFO_SUFFIX = "_probabilities.json"


def probabilities_cases(folder: Path) -> dict[str, Path]:
    """Case id -> ``CASE.npz`` of every case in ``folder`` that has both probability files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AutosegError(f"{folder}: no such prediction folder")
    return {
        npz.name[: -len(NPZ_SUFFIX)]: npz
        for npz in sorted(folder.glob(f"*{NPZ_SUFFIX}"))
        if not npz.name.startswith(".") and probabilities_files(npz)[1].is_file()
    }


def average_probabilities(members: Sequence[np.ndarray]) -> np.ndarray:
    """The mean of the members' probabilities (K, *shape), summed in float32 in the given order."""
    if not members:
        raise ValueError("an ensemble needs at least one member")
    total = np.zeros(members[0].shape, dtype=np.float32)
    for member in members:
        total += member
    total /= len(members)
    return total


def segmentation_from_probabilities(probabilities: np.ndarray, channel_label_values: Sequence[int]) -> np.ndarray:
    """The argmax channel of each voxel as its label value (ties go to the lower channel, as np.argmax)."""
    return np.asarray(labels_from_probabilities(probabilities, channel_label_values))


def load_members(npz_files: Sequence[Path]) -> tuple[list[np.ndarray], list[ProbabilitiesInfo]]:
    """Every member's stored probabilities of one case and their infos, checked to fit together."""
    if not npz_files:
        raise AutosegError("an ensemble needs at least one prediction folder")
    arrays: list[np.ndarray] = []
    infos: list[ProbabilitiesInfo] = []
    for npz in npz_files:
        probabilities, info = load_probabilities(npz)
        if infos:
            _check_member(Path(npz), info, Path(npz_files[0]), infos[0])
        arrays.append(probabilities)
        infos.append(info)
    return arrays, infos


def _check_member(npz: Path, info: ProbabilitiesInfo, first_npz: Path, first: ProbabilitiesInfo) -> None:
    where = f"case {info.case_id}: {npz} does not fit {first_npz}"
    if info.channel_label_values != first.channel_label_values:
        raise AutosegError(
            f"{where}: channel label values {info.channel_label_values} vs {first.channel_label_values};"
            " only models trained on the same labels can be ensembled"
        )
    if info.shape != first.shape:
        raise AutosegError(f"{where}: probabilities of shape {info.shape} vs {first.shape}; predict both again")
    differing = info.geometry.matches(first.geometry)
    if differing:
        raise AutosegError(f"{where}: the image geometry differs ({', '.join(differing)}); were they the same image?")


def ensemble_case(npz_files: Sequence[Path], output_file: Path, save_probabilities: bool = False) -> Path:
    """Average one case's member probabilities and write ``output_file`` (and its probabilities if asked)."""
    members, infos = load_members(npz_files)
    probabilities = average_probabilities(members)
    del members
    first = infos[0]
    write_segmentation(
        segmentation_from_probabilities(probabilities, first.channel_label_values), first.geometry, output_file
    )
    if save_probabilities:
        # the averaged file names every member configuration, e.g. "2d+3d_fullres"
        configuration = "+".join(dict.fromkeys(info.configuration for info in infos))
        write_probabilities(probabilities, dataclasses.replace(first, configuration=configuration), output_file)
    return Path(output_file)


@dataclasses.dataclass(frozen=True)
class _CaseJob:
    npz_files: tuple[Path, ...]
    output_file: Path
    save_probabilities: bool


def _run_case(job: _CaseJob) -> Path:
    return ensemble_case(job.npz_files, job.output_file, job.save_probabilities)


def ensemble_folders(
    folders: Sequence[Path],
    output_dir: Path,
    save_probabilities: bool = False,
    num_workers: int | None = None,
    show_progress: bool = True,
    file_ending: str | None = None,
) -> list[Path]:
    """Average the stored probabilities of the same cases in ``folders`` into ``output_dir/CASE<ending>``.

    ``file_ending`` defaults to that of the first folder's segmentations. Every folder must hold the same cases.
    """
    folders = [Path(f) for f in folders]
    if not folders:
        raise AutosegError("nothing to ensemble: pass at least one prediction folder")
    if len({f.resolve() for f in folders}) != len(folders):
        raise AutosegError(f"a folder is listed twice in {[str(f) for f in folders]}; it would count double")
    cases = [probabilities_cases(f) for f in folders]
    if not cases[0]:
        raise AutosegError(
            f"{folders[0]}: no stored probabilities (CASE.npz + CASE_probabilities.json);"
            " predict or train with --save-probabilities"
        )
    for folder, found in zip(folders[1:], cases[1:]):
        _check_same_cases(folders[0], set(cases[0]), folder, set(found))
    ending = file_ending or _segmentation_ending(folders[0], next(iter(cases[0])))
    jobs = [
        _CaseJob(tuple(found[case_id] for found in cases), Path(output_dir) / f"{case_id}{ending}", save_probabilities)
        for case_id in sorted(cases[0])
    ]
    return parallel_map(_run_case, jobs, num_workers, desc="ensemble", show_progress=show_progress)


def _check_same_cases(first: Path, first_cases: set[str], folder: Path, found: set[str]) -> None:
    if found == first_cases:
        return
    only_first, only_here = sorted(first_cases - found), sorted(found - first_cases)
    problems = []
    if only_first:
        problems.append(f"{len(only_first)} case(s) only in {first} (first: {', '.join(only_first[:5])})")
    if only_here:
        problems.append(f"{len(only_here)} case(s) only in {folder} (first: {', '.join(only_here[:5])})")
    raise AutosegError(
        f"the prediction folders hold different cases: {'; '.join(problems)}. Ensemble folders predicted from"
        " the same images"
    )


def _segmentation_ending(folder: Path, case_id: str) -> str:
    for ending in SUPPORTED_ENDINGS:
        if (folder / f"{case_id}{ending}").is_file():
            return ending
    raise AutosegError(
        f"{folder}: no segmentation {case_id}<ending> beside {case_id}.npz to take the file ending from;"
        f" pass the file ending (one of {', '.join(SUPPORTED_ENDINGS)})"
    )
