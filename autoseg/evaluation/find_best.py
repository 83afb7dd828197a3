"""``autoseg find-best``: choose the model or ensemble, and its postprocessing, by cross-validation.

1. Gather every fold's validation predictions per model (``crossval_cases``): each training case of the folds
   used must be predicted exactly once, by the fold that held it out (``splits.json``).
2. Score the candidates on the same cases, from per-case confusion counts in memory: every model alone (its
   segmentation files), every pair of models with stored probabilities (as nnU-Net), then a greedy forward
   selection of larger ensembles seeded with the best of those: add the member that most improves the
   foreground-mean Dice, stop when nothing improves by more than ``TIE_TOLERANCE``. Ensembles average the
   stored probabilities (``ensemble.average_probabilities``, members sorted, so the files written later
   are exactly the argmax that was scored). One case's arrays are in memory at a time per worker.
3. The best foreground-mean Dice wins; candidates within ``TIE_TOLERANCE`` of it go to the fewest members.
4. Postprocessing is chosen on the winner's cross-validation predictions (``postprocessing.py``).
5. Written under ``<results>/<dataset>/``: ``best.json``, ``report.md`` + ``report/*.png``, an ensemble's
   cross-validation predictions (not postprocessed) in ``crossval/<candidate>/`` and, when postprocessing
   was chosen, the winner's postprocessed ones in ``crossval/<candidate>/postprocessed/``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg import serialization
from autoseg.errors import AutosegError
from autoseg.evaluation.best import BestChoice, CandidateScore, ModelRef, candidate_name, save_best
from autoseg.evaluation.crossval import CrossValidation, CrossValidationCase, crossval_cases
from autoseg.evaluation.ensemble import average_probabilities, ensemble_case
from autoseg.evaluation.postprocessing import (
    CasePostprocessingDice,
    DiceScores,
    case_postprocessing_dice,
    decide_postprocessing,
    dice_per_label,
    label_indices,
    mean_dice_scores,
    postprocess_files,
)
from autoseg.evaluation.report import CaseRow, ReportContent, write_report
from autoseg.inference.export import ProbabilitiesInfo, load_probabilities, probabilities_files
from autoseg.io import Geometry, read_image
from autoseg.parallel import available_cores, parallel_map

# Foreground-mean Dice differences below this are noise (float16 probabilities, a handful of voxels), not a
# better model: a larger ensemble must beat a smaller one by more than this to be chosen or to grow.
TIE_TOLERANCE = 1e-4
# Workers that load probabilities hold one case each: every member's float16 probabilities, their float32
# average and a few voxel-sized index arrays (a 14-label CT of 512x512x300 voxels: about 4 GB per member).
# By default no more of them start than fit into this fraction of the memory available.
MEMORY_FRACTION = 0.5
# Bytes per voxel besides the probabilities: the argmax (intp), the confusion-count pairs (intp), label indices.
_INDEX_BYTES_PER_VOXEL = 18
# Up to this many models with probabilities, the first pass scores every subset (at most 11 ensembles) instead of
# loading every case's probabilities again for each greedy step: loading (zlib) costs more than scoring.
ALL_SUBSETS_UP_TO = 4
CROSSVAL_DIR = "crossval"
POSTPROCESSED_DIR = "postprocessed"

Members = tuple[ModelRef, ...]


@dataclass(frozen=True)
class CandidateResult:
    members: Members
    case_dice: np.ndarray  # (cases, labels): each case's Dice per label value, NaN where both are empty
    scores: DiceScores

    @property
    def name(self) -> str:
        return candidate_name(self.members)


def find_best(
    results_dataset_dir: Path,
    ground_truth_dir: Path,
    splits_file: Path,
    labels: dict[str, int],
    file_ending: str,
    channel_names: Sequence[str],
    dataset: str,
    *,
    models: Sequence[ModelRef] | None = None,
    folds: Sequence[int] | None = None,
    checkpoint: str = "checkpoint_final.pt",
    images_dir: Path | None = None,
    num_workers: int | None = None,
    show_progress: bool = True,
) -> BestChoice:
    """Choose, write ``best.json``, the report and the winner's cross-validation predictions; return the choice.

    ``models`` default to every model folder with a finished fold; ``folds`` to the folds all of them
    finished. ``images_dir`` (imagesTr) gives the report's overlays. When the folds do not cover every
    training case the choice says so (``cases_scored < cases_total``).
    """
    results_dataset_dir = Path(results_dataset_dir)
    crossval = crossval_cases(
        results_dataset_dir, Path(ground_truth_dir), Path(splits_file), file_ending, models, folds, checkpoint
    )
    label_values = tuple(sorted(int(v) for v in labels.values()))
    results = search_candidates(crossval, label_values, num_workers, show_progress)
    winner = choose_winner(results)

    predictions = _winner_predictions(winner, crossval, results_dataset_dir, file_ending, num_workers, show_progress)
    foreground = tuple(v for v in label_values if v != 0)
    jobs = [_PostprocessingJob(predictions[c.case_id], c.reference, foreground) for c in crossval.cases]
    per_case = parallel_map(_postprocessing_case, jobs, num_workers, "choose postprocessing", show_progress)
    choice = decide_postprocessing(per_case, foreground)
    final = predictions
    if not choice.rules.is_identity:
        out_dir = results_dataset_dir / CROSSVAL_DIR / winner.name / POSTPROCESSED_DIR
        final = {case_id: out_dir / path.name for case_id, path in predictions.items()}
        pairs = [(predictions[case_id], final[case_id]) for case_id in predictions]
        postprocess_files(pairs, choice.rules, foreground, num_workers, show_progress)

    best = BestChoice(
        schema_version=BestChoice.SCHEMA_VERSION,
        dataset=dataset,
        members=winner.members,
        folds=crossval.folds,
        checkpoint=checkpoint,
        postprocessing=choice.rules,
        file_ending=file_ending,
        labels=dict(labels),
        channel_names=tuple(channel_names),
        cross_validation_dice=winner.scores.foreground_mean,
        postprocessed_dice=choice.after.foreground_mean,
        cases_scored=len(crossval.cases),
        cases_total=crossval.cases_total,
        candidates=tuple(_candidate_score(r) for r in results),
    )
    save_best(best, results_dataset_dir)
    before = winner.case_dice[:, [label_values.index(v) for v in foreground]]
    rows = tuple(
        CaseRow(
            case_id=case.case_id,
            fold=case.fold,
            foreground_mean_before=_nanmean(before[i]),
            dice_after=tuple(float(d) for d in choice.case_dice_after[i]),
            foreground_mean_after=_nanmean(choice.case_dice_after[i]),
            prediction_file=final[case.case_id],
            reference_file=case.reference,
        )
        for i, case in enumerate(crossval.cases)
    )
    content = ReportContent(
        choice=best,
        before=choice.before,
        after=choice.after,
        rows=rows,
        notes=crossval.notes,
        predictions_location=_predictions_location(winner, crossval, choice.rules.is_identity),
    )
    write_report(content, results_dataset_dir, images_dir)
    return best


def search_candidates(
    crossval: CrossValidation, label_values: tuple[int, ...], num_workers: int | None, show_progress: bool
) -> list[CandidateResult]:
    """Every candidate scored (see the module docstring), best first.

    With few models the first pass over the cases also scores every larger subset the greedy search might
    ask for, while their probabilities are loaded anyway; only the subsets the search visits become candidates.
    """
    pool = crossval.ensemble_models
    sizes = range(2, len(pool) + 1) if len(pool) <= ALL_SUBSETS_UP_TO else (2,)
    subsets = [members for size in sizes for members in itertools.combinations(pool, size)]
    num_workers = probability_workers(crossval, num_workers)
    scored = _score(crossval, label_values, crossval.models, subsets, num_workers, show_progress, "score models")
    candidates = {members: result for members, result in scored.items() if len(members) <= 2}
    if len(pool) >= 2:
        current = choose_winner([candidates[m] for m in candidates if set(m) <= set(pool)]).members
        while len(current) < len(pool):
            options = [tuple(sorted((*current, m))) for m in pool if m not in current]
            new = [o for o in options if o not in scored]
            desc = f"score ensembles of {len(current) + 1}"
            scored.update(_score(crossval, label_values, (), new, num_workers, show_progress, desc))
            candidates.update({o: scored[o] for o in options})
            best = max(options, key=lambda o: scored[o].scores.foreground_mean)
            if scored[best].scores.foreground_mean <= scored[current].scores.foreground_mean + TIE_TOLERANCE:
                break
            current = best
    return sorted(candidates.values(), key=lambda r: (-r.scores.foreground_mean, len(r.members), r.name))


def choose_winner(results: Sequence[CandidateResult]) -> CandidateResult:
    """The best foreground-mean Dice; among those within ``TIE_TOLERANCE`` of it, the fewest members."""
    top = max(r.scores.foreground_mean for r in results)
    close = [r for r in results if r.scores.foreground_mean >= top - TIE_TOLERANCE]
    return min(close, key=lambda r: (len(r.members), -r.scores.foreground_mean, r.name))


def probability_workers(crossval: CrossValidation, num_workers: int | None) -> int | None:
    """``num_workers`` if given; else as many as fit the largest case in memory, at most one per core."""
    if num_workers is not None or not crossval.ensemble_models:
        return num_workers
    info_files = [probabilities_files(c.probabilities[crossval.ensemble_models[0]])[1] for c in crossval.cases]
    largest = max(serialization.load(ProbabilitiesInfo, f).shape for f in info_files)
    channels, voxels = largest[0], int(np.prod(largest[1:]))
    per_case = voxels * (channels * (2 * len(crossval.ensemble_models) + 4) + _INDEX_BYTES_PER_VOXEL)
    available = _available_memory_bytes()
    if available is None:
        return num_workers
    return max(1, min(available_cores(), int(MEMORY_FRACTION * available) // per_case))


def _available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


@dataclass(frozen=True)
class _ScoreJob:
    case: CrossValidationCase
    label_values: tuple[int, ...]
    singles: Members  # scored from their segmentation files
    ensembles: tuple[Members, ...]  # scored from their averaged probabilities


def _score(
    crossval: CrossValidation,
    label_values: tuple[int, ...],
    singles: Sequence[ModelRef],
    ensembles: Sequence[Members],
    num_workers: int | None,
    show_progress: bool,
    desc: str,
) -> dict[Members, CandidateResult]:
    if not singles and not ensembles:
        return {}
    jobs = [_ScoreJob(case, label_values, tuple(singles), tuple(ensembles)) for case in crossval.cases]
    per_case = parallel_map(_score_case, jobs, num_workers, desc, show_progress)
    if not any(has_foreground for _, has_foreground in per_case):
        raise AutosegError(
            f"none of the {len(per_case)} references scored has any foreground label"
            f" {[v for v in label_values if v != 0]}; there is nothing to choose between"
        )
    stacked = np.stack([dice for dice, _ in per_case])  # (cases, candidates, labels)
    keys: list[Members] = [(m,) for m in singles] + [tuple(e) for e in ensembles]
    return {
        key: CandidateResult(key, stacked[:, i], mean_dice_scores(stacked[:, i], label_values))
        for i, key in enumerate(keys)
    }


def _score_case(job: _ScoreJob) -> tuple[np.ndarray, bool]:
    """Dice per label of every candidate on one case, and whether the reference has any foreground."""
    case, n = job.case, len(job.label_values)
    reference, geometry = read_image(case.reference)
    reference_index = label_indices(reference, job.label_values)
    rows = []
    for model in job.singles:
        prediction = _read_prediction(case.segmentations[model], case.reference, reference.shape, geometry)
        rows.append(dice_per_label(label_indices(prediction, job.label_values), reference_index, n))
    needed = sorted({m for members in job.ensembles for m in members})
    probabilities = {m: _read_probabilities(case.probabilities[m], job.label_values, reference.shape) for m in needed}
    for members in job.ensembles:
        # the channels are the label values in ascending order (checked), so the argmax is the label position
        average = average_probabilities([probabilities[m] for m in sorted(members)])
        rows.append(dice_per_label(average.argmax(axis=0), reference_index, n))
    has_foreground = bool(np.isin(reference, [v for v in job.label_values if v != 0]).any())
    return np.stack(rows), has_foreground


def _read_prediction(path: Path, reference_file: Path, shape: tuple[int, ...], geometry: Geometry) -> np.ndarray:
    prediction, prediction_geometry = read_image(path)
    if prediction.shape != shape:
        raise AutosegError(
            f"{path}: shape {prediction.shape} differs from its reference {reference_file} {shape};"
            " predictions must be in the original image grid"
        )
    differing = geometry.matches(prediction_geometry)
    if differing:
        raise AutosegError(f"{path}: geometry ({', '.join(differing)}) differs from its reference {reference_file}")
    return prediction


def _read_probabilities(npz: Path, label_values: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    probabilities, info = load_probabilities(npz)
    if tuple(info.channel_label_values) != label_values:
        raise AutosegError(
            f"{npz}: probability channels are labels {info.channel_label_values}, the dataset's labels are"
            f" {label_values}; was the model trained on another version of the dataset?"
        )
    if probabilities.shape[1:] != shape:
        raise AutosegError(f"{npz}: probabilities of shape {probabilities.shape} for a reference of shape {shape}")
    return probabilities


def _winner_predictions(
    winner: CandidateResult,
    crossval: CrossValidation,
    results_dataset_dir: Path,
    file_ending: str,
    num_workers: int | None,
    show_progress: bool,
) -> dict[str, Path]:
    """Case id -> the winner's cross-validation prediction; an ensemble's are written to crossval/<name>/."""
    if len(winner.members) == 1:
        return {case.case_id: case.segmentations[winner.members[0]] for case in crossval.cases}
    out_dir = results_dataset_dir / CROSSVAL_DIR / winner.name
    jobs = [
        _EnsembleJob(tuple(case.probabilities[m] for m in winner.members), out_dir / f"{case.case_id}{file_ending}")
        for case in crossval.cases
    ]
    workers = probability_workers(crossval, num_workers)
    written = parallel_map(_ensemble_case, jobs, workers, "write ensemble", show_progress)
    return {case.case_id: path for case, path in zip(crossval.cases, written)}


@dataclass(frozen=True)
class _EnsembleJob:
    npz_files: tuple[Path, ...]
    output_file: Path


def _ensemble_case(job: _EnsembleJob) -> Path:
    return ensemble_case(job.npz_files, job.output_file)


@dataclass(frozen=True)
class _PostprocessingJob:
    prediction: Path
    reference: Path
    foreground_labels: tuple[int, ...]


def _postprocessing_case(job: _PostprocessingJob) -> CasePostprocessingDice:
    prediction, _ = read_image(job.prediction)
    reference, _ = read_image(job.reference)
    return case_postprocessing_dice(prediction, reference, job.foreground_labels)


def _candidate_score(result: CandidateResult) -> CandidateScore:
    return CandidateScore(
        name=result.name,
        members=result.members,
        foreground_mean_dice=result.scores.foreground_mean,
        dice_per_label={str(v): None if np.isnan(d) else d for v, d in result.scores.per_label.items()},
    )


def _nanmean(values: np.ndarray) -> float:
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else float("nan")


def _predictions_location(winner: CandidateResult, crossval: CrossValidation, identity: bool) -> str:
    if len(winner.members) == 1:
        raw = f"`{winner.name}/fold_<k>/validation/` (folds {', '.join(map(str, crossval.folds))})"
    else:
        raw = f"`{CROSSVAL_DIR}/{winner.name}/` (averaged probabilities, not postprocessed)"
    if identity:
        return f"{raw}; no postprocessing was chosen"
    return f"{raw}; postprocessed: `{CROSSVAL_DIR}/{winner.name}/{POSTPROCESSED_DIR}/`"
