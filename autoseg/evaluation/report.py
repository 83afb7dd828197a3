"""``report.md``: what find-best chose and why, for a person; with overlays of the best and worst cases.

The overlays (``report/best_<i>_<case>.png``, ``report/worst_<i>_<case>.png``) show the axial slice with the
most foreground (reference or prediction) of the first image channel, the reference outlined solid and the
winner's final (postprocessed) prediction dashed, one colour per label. They are drawn on a bare Agg
canvas, so no matplotlib backend or global pyplot state is touched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg import atomic
from autoseg.evaluation.best import BestChoice, Postprocessing
from autoseg.evaluation.postprocessing import DiceScores
from autoseg.io import read_image

REPORT_FILE = "report.md"
REPORT_IMAGES_DIR = "report"
# How many of the best and of the worst cases get an overlay image: enough to see a pattern, few enough
# that the report stays quick to write and to read.
OVERLAY_CASES = 3
# Intensity window of the overlays: percentiles of the slice, so one bright artefact cannot wash it out.
WINDOW_PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class CaseRow:
    """One case of the winner's cross-validation: Dice per foreground label after postprocessing."""

    case_id: str
    fold: int
    foreground_mean_before: float
    dice_after: tuple[float, ...]  # per foreground label, ascending label value; NaN when both are empty
    foreground_mean_after: float
    prediction_file: Path  # the final (postprocessed, if any rule was chosen) prediction
    reference_file: Path


@dataclass(frozen=True)
class ReportContent:
    choice: BestChoice
    before: DiceScores  # the winner's scores before postprocessing (foreground labels)
    after: DiceScores  # and after
    rows: tuple[CaseRow, ...]
    notes: tuple[str, ...]  # models or folds left out, models that cannot join ensembles, coverage
    predictions_location: str  # where the winner's cross-validation predictions are


def report_file(results_dataset_dir: Path) -> Path:
    return Path(results_dataset_dir) / REPORT_FILE


def write_report(content: ReportContent, results_dataset_dir: Path, images_dir: Path | None = None) -> Path:
    """Write ``report.md`` (and the overlays when ``images_dir`` holds the training images); return its path."""
    results_dataset_dir = Path(results_dataset_dir)
    overlays = _write_overlays(content, results_dataset_dir / REPORT_IMAGES_DIR, images_dir)
    path = report_file(results_dataset_dir)
    atomic.write_text(path, "\n".join(_markdown(content, overlays)) + "\n")
    return path


def describe_postprocessing(rules: Postprocessing, labels: dict[str, int]) -> str:
    """One line, e.g. "keep the largest foreground component, then the largest of: liver"."""
    names = {value: name for name, value in labels.items()}
    steps = []
    if rules.largest_component_foreground:
        steps.append("keep the largest foreground component")
    if rules.largest_component_labels:
        kept = ", ".join(names.get(v, str(v)) for v in rules.largest_component_labels)
        steps.append(f"keep the largest component of: {kept}")
    return ", then ".join(steps) if steps else "none"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


def _names(choice: BestChoice) -> dict[int, str]:
    return {value: name for name, value in choice.labels.items()}


def _markdown(content: ReportContent, overlays: list[tuple[str, str]]) -> list[str]:
    choice = content.choice
    names = _names(choice)
    values = sorted(names)
    foreground = [v for v in values if v != 0]
    kind = "a single model" if len(choice.members) == 1 else f"an ensemble of {len(choice.members)} models"
    lines = [
        f"# find-best: {choice.dataset}",
        "",
        f"Chosen: **{choice.name}** ({kind}), folds {', '.join(map(str, choice.folds))}, `{choice.checkpoint}`.",
        "",
        f"Cross-validation foreground-mean Dice {_fmt(choice.cross_validation_dice)},"
        f" after postprocessing {_fmt(choice.postprocessed_dice)}.",
        "",
        f"Coverage: {choice.cases_scored} of {choice.cases_total} training cases scored"
        + ("." if choice.cases_scored == choice.cases_total else " (**not all folds were used**)."),
        "",
        "## Candidates",
        "",
        "Mean Dice over cases (cases where prediction and reference are both empty skipped), best first.",
        "",
        "| candidate | members | foreground mean | " + " | ".join(names[v] for v in values) + " |",
        "|---|---|---|" + "---|" * len(values),
    ]
    for candidate in choice.candidates:
        marker = " **(chosen)**" if candidate.members == choice.members else ""
        per_label = " | ".join(_fmt(candidate.dice_per_label.get(str(v))) for v in values)
        lines.append(
            f"| {candidate.name}{marker} | {len(candidate.members)} | {_fmt(candidate.foreground_mean_dice)} |"
            f" {per_label} |"
        )
    lines += [
        "",
        "## Postprocessing",
        "",
        f"Chosen: {describe_postprocessing(choice.postprocessing, choice.labels)}.",
        "",
        "| label | Dice before | Dice after |",
        "|---|---|---|",
    ]
    lines += [
        f"| {names[v]} | {_fmt(content.before.per_label[v])} | {_fmt(content.after.per_label[v])} |" for v in foreground
    ]
    lines.append(
        f"| foreground mean | {_fmt(content.before.foreground_mean)} | {_fmt(content.after.foreground_mean)} |"
    )
    lines += ["", "## Cross-validation predictions of the winner", "", content.predictions_location]
    if content.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in content.notes]
    if overlays:
        lines += ["", "## Best and worst cases", "", "Reference solid, prediction dashed.", ""]
        lines += [f"![{title}]({image})" for title, image in overlays]
    lines += [
        "",
        "## Per case (winner, after postprocessing)",
        "",
        "| case | fold | foreground mean before | foreground mean after | "
        + " | ".join(names[v] for v in foreground)
        + " |",
        "|---|---|---|---|" + "---|" * len(foreground),
    ]
    for row in content.rows:
        per_label = " | ".join(_fmt(d) for d in row.dice_after)
        lines.append(
            f"| {row.case_id} | {row.fold} | {_fmt(row.foreground_mean_before)} | {_fmt(row.foreground_mean_after)} |"
            f" {per_label} |"
        )
    return lines


def _ranked(rows: Sequence[CaseRow]) -> tuple[list[CaseRow], list[CaseRow]]:
    """The best and the worst cases by foreground-mean Dice after postprocessing (cases without one skipped)."""
    scored = sorted((r for r in rows if not math.isnan(r.foreground_mean_after)), key=lambda r: r.foreground_mean_after)
    count = min(OVERLAY_CASES, len(scored) // 2 or len(scored))
    best = scored[::-1][:count]
    worst = [r for r in scored[:count] if r not in best]
    return best, worst


def _write_overlays(content: ReportContent, out_dir: Path, images_dir: Path | None) -> list[tuple[str, str]]:
    if images_dir is None or not Path(images_dir).is_dir():
        return []
    for old in out_dir.glob("*.png") if out_dir.is_dir() else []:
        if old.name.startswith(("best_", "worst_")):  # from an earlier run; its cases may have changed
            old.unlink()
    best, worst = _ranked(content.rows)
    foreground = [v for v in sorted(content.choice.labels.values()) if v != 0]
    names = _names(content.choice)
    written = []
    for kind, rows in (("best", best), ("worst", worst)):
        for i, row in enumerate(rows, start=1):
            image_file = _image_file(Path(images_dir), row.case_id, content.choice.file_ending)
            if image_file is None:
                continue
            png = out_dir / f"{kind}_{i}_{row.case_id}.png"
            title = f"{kind} {i}: {row.case_id} (foreground-mean Dice {_fmt(row.foreground_mean_after)})"
            if write_overlay(image_file, row.reference_file, row.prediction_file, png, foreground, names, title):
                written.append((title, f"{REPORT_IMAGES_DIR}/{png.name}"))
    return written


def _image_file(images_dir: Path, case_id: str, file_ending: str) -> Path | None:
    """The first channel: nnU-Net's ``CASE_0000<ending>``, else the Decathlon's 4D ``CASE<ending>``."""
    for candidate in (images_dir / f"{case_id}_0000{file_ending}", images_dir / f"{case_id}{file_ending}"):
        if candidate.is_file():
            return candidate
    return None


def write_overlay(
    image_file: Path,
    reference_file: Path,
    prediction_file: Path,
    output_png: Path,
    foreground_labels: Sequence[int],
    label_names: dict[int, str],
    title: str,
) -> bool:
    """Draw one slice with reference and prediction outlines; False (nothing written) if the image does not fit."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    image, geometry = read_image(image_file)
    reference, _ = read_image(reference_file)
    prediction, _ = read_image(prediction_file)
    if image.ndim == 4:  # a Decathlon 4D image (channel, z, y, x)
        image = image[0]
    if image.shape != reference.shape or prediction.shape != reference.shape:
        return False
    in_any = np.isin(reference, foreground_labels) | np.isin(prediction, foreground_labels)
    z = int(np.argmax(in_any.reshape(in_any.shape[0], -1).sum(axis=1))) if in_any.any() else image.shape[0] // 2
    plane = image[z].astype(np.float32)
    low, high = np.percentile(plane, WINDOW_PERCENTILES)
    spacing = geometry.spacing_mm
    figure = Figure(figsize=(4.5, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.imshow(plane, cmap="gray", vmin=low, vmax=high if high > low else low + 1, aspect=spacing[1] / spacing[2])
    handles = []
    for i, value in enumerate(foreground_labels):
        colour = f"C{i % 10}"
        for mask, style in ((reference[z] == value, "solid"), (prediction[z] == value, "dashed")):
            if mask.any() and not mask.all() and min(mask.shape) > 1:
                axes.contour(mask, levels=[0.5], colors=[colour], linestyles=style, linewidths=1.0)
        handles.append(Line2D([], [], color=colour, label=label_names.get(value, str(value))))
    axes.legend(handles=handles, loc="lower right", fontsize=6, framealpha=0.6)
    axes.set_title(f"{title}\nslice {z}", fontsize=8)
    axes.set_axis_off()
    atomic.write_with(output_png, lambda tmp: figure.savefig(tmp, format="png", dpi=100), suffix=".png")
    return True
