"""Keep-the-largest-connected-component postprocessing: apply it, and choose it on cross-validation results.

The rules and their acceptance follow nnU-Net v2 (``determine_postprocessing``): first keep the largest
component of all foreground labels together, accepted only if the foreground-mean Dice improves and no
foreground label's mean Dice gets worse; then, label by label on top of that (only with more than one
foreground label), keep that label's largest component, accepted if that label's mean Dice improves. Voxels
removed become background (0). Components tied for the largest size are all kept, as nnU-Net keeps them.

Dice is computed as ``evaluate.py`` defines it (``metrics.dice`` per case and label, NaN where prediction and
reference are both empty, means over cases skipping NaN), but from confusion counts in memory, so choosing
needs no summary.json files. Removing label l's voxels changes no other foreground label's Dice, so the
per-label decisions are independent and one pass over the cases gathers everything they need.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cc3d
import numpy as np

from autoseg.errors import AutosegError
from autoseg.evaluation.best import Postprocessing, load_best
from autoseg.evaluation.evaluate import mean_skipping_nan
from autoseg.evaluation.metrics import dice
from autoseg.io import read_image, write_segmentation
from autoseg.parallel import parallel_map

# nnU-Net v2 labels components with skimage.measure.label(connectivity=None), i.e. full connectivity:
# voxels touching by a face, an edge or a corner are one component (nnU-Net v1 used face connectivity).
FULL_CONNECTIVITY: dict[int, Literal[8, 26]] = {2: 8, 3: 26}
# Label values below this are mapped to label positions with a lookup table instead of a binary search.
_LOOKUP_TABLE_SIZE = 1 << 16


@dataclass(frozen=True)
class DiceScores:
    """Mean Dice over cases per label value (NaN where no case has it on either side) and the foreground mean."""

    per_label: dict[int, float]
    foreground_mean: float


def label_indices(segmentation: np.ndarray, label_values: Sequence[int]) -> np.ndarray:
    """Each voxel's position in ``label_values``; values not listed become ``len(label_values)``."""
    values = np.asarray(label_values, dtype=np.int64)
    other = len(values)
    index_dtype = np.uint8 if other < 256 else np.uint16
    array = segmentation.view(np.uint8) if segmentation.dtype == bool else segmentation
    low, high = int(array.min(initial=0)), int(array.max(initial=0))
    if low >= 0 and high < _LOOKUP_TABLE_SIZE:
        table = np.full(max(high, int(values.max(initial=0))) + 1, other, dtype=index_dtype)
        listed = values >= 0
        table[values[listed]] = np.flatnonzero(listed)
        return table[array]
    order = np.argsort(values)
    position = np.clip(np.searchsorted(values[order], array), 0, max(other - 1, 0))
    found = values[order][position] == array if other else np.zeros(array.shape, bool)
    return np.where(found, order[position], other).astype(index_dtype)


def dice_per_label(prediction_index: np.ndarray, reference_index: np.ndarray, n_labels: int) -> np.ndarray:
    """Dice of label positions 0..n_labels-1 from index arrays (``label_indices``), via one confusion matrix."""
    bins = n_labels + 1
    pairs = reference_index.astype(np.intp).ravel() * bins + prediction_index.ravel()
    counts = np.bincount(pairs, minlength=bins * bins).reshape(bins, bins)
    true_positive = np.diagonal(counts)[:n_labels]
    predicted = counts.sum(axis=0)[:n_labels]
    referenced = counts.sum(axis=1)[:n_labels]
    return np.array(
        [dice(int(tp), int(p - tp), int(r - tp)) for tp, p, r in zip(true_positive, predicted, referenced)],
        dtype=np.float64,
    )


def mean_dice_scores(case_dice: np.ndarray, label_values: Sequence[int]) -> DiceScores:
    """``case_dice`` (cases, labels) -> per-label means over cases and their foreground mean, NaN skipped."""
    per_label = {int(v): mean_skipping_nan(case_dice[:, i]) for i, v in enumerate(label_values)}
    return DiceScores(per_label, mean_skipping_nan(d for v, d in per_label.items() if v != 0))


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component(s) of a boolean mask (full connectivity, ties all kept)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim not in FULL_CONNECTIVITY:
        raise ValueError(f"connected components need a 2D or 3D mask, got shape {mask.shape}")
    if not mask.any():
        return mask.copy()
    components = cc3d.connected_components(mask, connectivity=FULL_CONNECTIVITY[mask.ndim])
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    keep = sizes == sizes.max()
    keep[0] = False
    return np.asarray(keep[components])


def apply_postprocessing(
    segmentation: np.ndarray, rules: Postprocessing, foreground_labels: Sequence[int]
) -> np.ndarray:
    """A copy of ``segmentation`` with ``rules`` applied in order; removed voxels become background 0."""
    foreground = [int(v) for v in foreground_labels]
    unknown = sorted(set(rules.largest_component_labels) - set(foreground))
    if unknown:
        raise AutosegError(
            f"postprocessing rule for label(s) {unknown}, which are not foreground labels {foreground};"
            " fix largest_component_labels in best.json"
        )
    result = segmentation.copy()
    if rules.largest_component_foreground:
        mask = np.isin(result, foreground)
        result[mask & ~keep_largest_component(mask)] = 0
    for label in rules.largest_component_labels:
        mask = result == label
        result[mask & ~keep_largest_component(mask)] = 0
    return result


@dataclass(frozen=True)
class CasePostprocessingDice:
    """One case's Dice per foreground label (columns in ``foreground_labels`` order) under each rule tried."""

    baseline: np.ndarray
    largest_foreground: np.ndarray
    largest_per_label: np.ndarray  # column l: label l's Dice after keeping its largest component
    largest_per_label_after_foreground: np.ndarray  # the same, on top of the foreground rule


def case_postprocessing_dice(
    prediction: np.ndarray, reference: np.ndarray, foreground_labels: Sequence[int]
) -> CasePostprocessingDice:
    if prediction.shape != reference.shape:
        raise AutosegError(f"prediction shape {prediction.shape} differs from the reference {reference.shape}")
    labels = [int(v) for v in foreground_labels]
    n = len(labels)
    reference_index = label_indices(reference, labels)
    prediction_index = label_indices(prediction, labels)
    largest = apply_postprocessing(prediction, Postprocessing(largest_component_foreground=True), labels)
    largest_index = label_indices(largest, labels)
    return CasePostprocessingDice(
        baseline=dice_per_label(prediction_index, reference_index, n),
        largest_foreground=dice_per_label(largest_index, reference_index, n),
        largest_per_label=_largest_component_dice(prediction_index, reference_index, n),
        largest_per_label_after_foreground=_largest_component_dice(largest_index, reference_index, n),
    )


def _largest_component_dice(prediction_index: np.ndarray, reference_index: np.ndarray, n: int) -> np.ndarray:
    out = np.empty(n, dtype=np.float64)
    for i in range(n):
        kept = keep_largest_component(prediction_index == i)
        referenced = reference_index == i
        tp = int(np.count_nonzero(kept & referenced))
        out[i] = dice(tp, int(np.count_nonzero(kept)) - tp, int(np.count_nonzero(referenced)) - tp)
    return out


@dataclass(frozen=True)
class PostprocessingChoice:
    rules: Postprocessing
    before: DiceScores
    after: DiceScores
    case_dice_after: np.ndarray  # (cases, foreground labels): each case's Dice with the chosen rules


def decide_postprocessing(
    per_case: Sequence[CasePostprocessingDice], foreground_labels: Sequence[int]
) -> PostprocessingChoice:
    """nnU-Net's acceptance rules (module docstring) applied to every case's Dice under each rule."""
    if not per_case:
        raise AutosegError("no cases to choose the postprocessing on")
    labels = [int(v) for v in foreground_labels]
    baseline = np.stack([c.baseline for c in per_case])
    before = mean_dice_scores(baseline, labels)
    largest = np.stack([c.largest_foreground for c in per_case])
    with_largest = mean_dice_scores(largest, labels)
    # comparisons with NaN are False: a label absent everywhere neither blocks nor justifies a rule (as nnU-Net)
    use_foreground = with_largest.foreground_mean > before.foreground_mean and not any(
        with_largest.per_label[v] < before.per_label[v] for v in labels
    )
    current = largest if use_foreground else baseline
    current_scores = with_largest if use_foreground else before
    per_label = np.stack(
        [c.largest_per_label_after_foreground if use_foreground else c.largest_per_label for c in per_case]
    )
    final = current.copy()
    accepted = []
    if len(labels) > 1:  # with one label the per-label rule repeats the foreground rule
        for i, value in enumerate(labels):
            if mean_skipping_nan(per_label[:, i]) > current_scores.per_label[value]:
                accepted.append(value)
                final[:, i] = per_label[:, i]
    rules = Postprocessing(largest_component_foreground=use_foreground, largest_component_labels=tuple(accepted))
    return PostprocessingChoice(rules, before, mean_dice_scores(final, labels), final)


def choose_postprocessing(
    predictions: Iterable[np.ndarray], references: Iterable[np.ndarray], foreground_labels: Sequence[int]
) -> tuple[Postprocessing, DiceScores, DiceScores]:
    """The rules to use, with the scores before and after them (per foreground label, and their mean).

    ``predictions`` and ``references`` are paired case by case; iterables let a caller load one case at a time.
    """
    per_case = [
        case_postprocessing_dice(prediction, reference, foreground_labels)
        for prediction, reference in zip(predictions, references, strict=True)
    ]
    choice = decide_postprocessing(per_case, foreground_labels)
    return choice.rules, choice.before, choice.after


@dataclass(frozen=True)
class _FileJob:
    input_file: Path
    output_file: Path
    rules: Postprocessing
    foreground_labels: tuple[int, ...]


def _postprocess_file(job: _FileJob) -> Path:
    segmentation, geometry = read_image(job.input_file)
    write_segmentation(apply_postprocessing(segmentation, job.rules, job.foreground_labels), geometry, job.output_file)
    return job.output_file


def postprocess_files(
    pairs: Sequence[tuple[Path, Path]],
    rules: Postprocessing,
    foreground_labels: Sequence[int],
    num_workers: int | None = None,
    show_progress: bool = True,
) -> list[Path]:
    """Postprocess each (input file, output file) pair; geometry kept, writes atomic."""
    jobs = [_FileJob(Path(i), Path(o), rules, tuple(int(v) for v in foreground_labels)) for i, o in pairs]
    return parallel_map(_postprocess_file, jobs, num_workers, desc="postprocess", show_progress=show_progress)


def postprocess_folder(
    input_dir: Path,
    output_dir: Path,
    rules: Postprocessing,
    foreground_labels: Sequence[int],
    file_ending: str,
    num_workers: int | None = None,
    show_progress: bool = True,
) -> list[Path]:
    """Postprocess every ``*<file_ending>`` segmentation of ``input_dir`` into ``output_dir`` (same names)."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise AutosegError(f"{input_dir}: no such folder of segmentations to postprocess")
    files = sorted(
        p for p in input_dir.iterdir() if p.is_file() and not p.name.startswith(".") and p.name.endswith(file_ending)
    )
    if not files:
        raise AutosegError(f"{input_dir}: no segmentations ending in {file_ending} to postprocess")
    pairs = [(f, output_dir / f.name) for f in files]
    return postprocess_files(pairs, rules, foreground_labels, num_workers, show_progress)


def postprocess_with_best(
    input_dir: Path,
    output_dir: Path,
    results_dataset_dir: Path,
    num_workers: int | None = None,
    show_progress: bool = True,
) -> list[Path]:
    """``autoseg postprocess IN -o OUT -m RESULTS``: the rules, labels and file ending of RESULTS/best.json."""
    best = load_best(results_dataset_dir)
    foreground = [v for v in sorted(best.labels.values()) if v != 0]
    return postprocess_folder(
        input_dir, output_dir, best.postprocessing, foreground, best.file_ending, num_workers, show_progress
    )
