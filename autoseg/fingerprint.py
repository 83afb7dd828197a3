"""Dataset fingerprint: the measured properties of a dataset that the planner derives its plan from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cc3d
import numpy as np

from autoseg.check import DatasetCheckFailed, Problem, content_problems
from autoseg.dataset import Case, DatasetSpec, load_case
from autoseg.errors import AutosegError
from autoseg.parallel import parallel_map
from autoseg.preprocessing.crop import crop_to_nonzero


@dataclass(frozen=True)
class IntensityStats:
    """Statistics of one channel's intensities inside the labelled foreground."""

    mean: float
    median: float
    std: float
    min: float
    max: float
    percentile_00_5: float
    percentile_99_5: float


@dataclass(frozen=True)
class CaseFingerprint:
    case_id: str
    spacing_mm: tuple[float, ...]  # (z, y, x)
    shape_before_crop: tuple[int, ...]
    shape_after_crop: tuple[int, ...]
    bbox: tuple[tuple[int, int], ...]  # [start, stop) per axis of the nonzero region
    relative_size_after_crop: float  # voxels after / before cropping
    class_voxel_counts: dict[str, int]  # label name -> voxels (background included)
    class_component_counts: dict[str, int]  # label name -> connected components (26-connectivity)


@dataclass(frozen=True)
class Fingerprint:
    SCHEMA_VERSION = 1

    schema_version: int
    dataset_name: str
    seed: int
    foreground_samples_total: int  # most foreground intensities kept over the whole dataset
    channel_names: tuple[str, ...]
    labels: dict[str, int]
    cases: tuple[CaseFingerprint, ...]
    foreground_intensity_per_channel: tuple[IntensityStats, ...]

    @property
    def spacings(self) -> list[tuple[float, ...]]:
        return [c.spacing_mm for c in self.cases]

    @property
    def shapes_after_crop(self) -> list[tuple[int, ...]]:
        return [c.shape_after_crop for c in self.cases]

    @property
    def median_relative_size_after_crop(self) -> float:
        return float(np.median([c.relative_size_after_crop for c in self.cases]))


# nnU-Net samples 1e8 foreground voxels over the whole dataset for its intensity statistics; we keep at
# most this many (fewer when the foreground is smaller) and weight every case equally.
FOREGROUND_SAMPLES_TOTAL = 100_000_000
# Face-, edge- and corner-neighbours count as connected, the usual choice for 3D objects.
COMPONENT_CONNECTIVITY: Literal[26] = 26


@dataclass(frozen=True)
class _CaseJob:
    spec: DatasetSpec
    case: Case
    index: int
    seed: int
    samples_per_case: int


@dataclass
class _CaseResult:
    fingerprint: CaseFingerprint | None
    samples: list[np.ndarray]  # per channel
    problems: list[Problem]


def _fingerprint_case(job: _CaseJob) -> _CaseResult:
    spec, case = job.spec, job.case
    try:
        image, label, geometry = load_case(spec, case)
    except AutosegError as exc:
        return _CaseResult(None, [], [Problem(str(exc), "re-export the file from its source", case.case_id)])
    problems = content_problems(spec, case, image, label)
    if problems or label is None:
        return _CaseResult(None, [], problems)
    label = label.astype(np.int16 if spec.label_values[-1] > 127 else np.int8, copy=False)
    counts = np.bincount(label.ravel().astype(np.intp), minlength=spec.label_values[-1] + 1)
    components = {}
    for value in spec.foreground_labels:
        components[spec.label_name(value)] = (
            int(cc3d.connected_components(label == value, connectivity=COMPONENT_CONNECTIVITY, return_N=True)[1])
            if counts[value]
            else 0
        )
    shape_before = image.shape[1:]
    image, label_cropped, bbox = crop_to_nonzero(image, label)
    foreground = label_cropped > 0
    rng = np.random.default_rng([job.seed, job.index])
    samples = []
    for channel_image in image:
        values = channel_image[foreground]
        if values.size > job.samples_per_case:
            values = rng.choice(values, job.samples_per_case, replace=False)
        samples.append(values.astype(np.float32, copy=False))
    fingerprint = CaseFingerprint(
        case_id=case.case_id,
        spacing_mm=tuple(geometry.spacing_mm),
        shape_before_crop=tuple(int(s) for s in shape_before),
        shape_after_crop=tuple(int(s) for s in image.shape[1:]),
        bbox=tuple((int(a), int(b)) for a, b in bbox),
        relative_size_after_crop=float(np.prod(image.shape[1:]) / np.prod(shape_before)),
        class_voxel_counts={spec.label_name(v): int(counts[v]) for v in spec.label_values},
        class_component_counts=components,
    )
    return _CaseResult(fingerprint, samples, [])


def intensity_stats(per_case: list[np.ndarray]) -> IntensityStats:
    """Statistics over the foreground of all cases, every case weighing the same.

    nnU-Net draws the same number of samples from each case with replacement; weighting each case's
    values by 1 / its count estimates the same quantities without the redundant draws (a small case's
    few voxels are not repeated millions of times), which is both exact and much faster.
    """
    per_case = [v for v in per_case if v.size]
    if not per_case:  # no labelled foreground anywhere: nothing to measure
        return IntensityStats(0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0)
    values = np.concatenate(per_case).astype(np.float64)
    weights = np.concatenate([np.full(v.size, 1.0 / (v.size * len(per_case))) for v in per_case])
    mean = float(np.dot(weights, values))
    std = float(np.sqrt(np.dot(weights, (values - mean) ** 2)))
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order])

    def quantile(q: float) -> float:
        index = min(int(np.searchsorted(cumulative, q * cumulative[-1], side="left")), len(values) - 1)
        return float(values[order[index]])

    return IntensityStats(
        mean=mean,
        median=quantile(0.5),
        std=std,
        min=float(values[order[0]]),
        max=float(values[order[-1]]),
        percentile_00_5=quantile(0.005),
        percentile_99_5=quantile(0.995),
    )


def extract_fingerprint(
    spec: DatasetSpec,
    num_workers: int | None = None,
    seed: int = 0,
    foreground_samples_total: int = FOREGROUND_SAMPLES_TOTAL,
    show_progress: bool = True,
) -> Fingerprint:
    """Measure every training case; raises DatasetCheckFailed listing all problems found on the way.

    The voxel half of the dataset check runs here, in the same read; the header half
    (``check.check_headers``) is the caller's, as ``pipeline.fingerprint`` does.
    """
    problems: list[Problem] = []
    samples_per_case = foreground_samples_total // max(1, len(spec.training))
    jobs = [_CaseJob(spec, c, i, seed, samples_per_case) for i, c in enumerate(spec.training)]
    results = parallel_map(_fingerprint_case, jobs, num_workers, "fingerprint", show_progress)
    for r in results:
        problems += r.problems
    if problems:
        raise DatasetCheckFailed(spec.root, problems)
    stats = tuple(intensity_stats([r.samples[c] for r in results]) for c in range(spec.num_channels))
    return Fingerprint(
        schema_version=Fingerprint.SCHEMA_VERSION,
        dataset_name=spec.name,
        seed=seed,
        foreground_samples_total=foreground_samples_total,
        channel_names=spec.channel_names,
        labels=dict(spec.labels),
        cases=tuple(r.fingerprint for r in results if r.fingerprint is not None),
        foreground_intensity_per_channel=stats,
    )
