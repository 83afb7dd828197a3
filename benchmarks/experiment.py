"""What the effect benchmarks share: running autoseg commands, scoring a test folder, grouping cases.

Each step is the command a user would type, run in its own process (``python -m autoseg ...``), so the
benchmarks measure the product as shipped. Imported by ``pediatric_effect.py`` and ``finetune_effect.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from autoseg.example import CaseInfo

AUTOSEG = [sys.executable, "-m", "autoseg", "-q"]


PLUGINS: list[str] = []  # plug-in files given to every command (``--plugins``), e.g. a trainer variant to compare


def run(*args: str) -> float:
    """Run one ``autoseg`` command; returns its wall time in seconds (a failure stops the benchmark)."""
    command = [*AUTOSEG, *(a for plugin in PLUGINS for a in ("--plugins", plugin)), *args]
    print("$", " ".join(command[2:]), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started


def train_fold(
    raw: Path, pre: Path, results: Path, trainer: str, budget: Sequence[str], planner: str = "default",
    extra: Sequence[str] = (),
) -> float:  # fmt: skip
    """Train fold 0 of ``3d_fullres`` with ``trainer``; returns the seconds it took (NaN when ``REUSE`` found
    the same run finished)."""
    fold = results / raw.name / f"{trainer}__{planner}__3d_fullres" / "fold_0"
    if REUSE and _finished_with(fold, budget):
        print(f"reusing {fold}", flush=True)
        return float("nan")
    return run("train", str(raw), "3d_fullres", "0", "--trainer", trainer, "--planner", planner,
               "--preprocessed", str(pre), "--results", str(results), "--overwrite", *budget, *extra)  # fmt: skip


REUSE = False  # --reuse: keep a fold that finished with the same budget instead of training it again


def _finished_with(fold: Path, budget: Sequence[str]) -> bool:
    """The fold finished, and its run.json has the epochs, iterations and seed ``budget`` asks for."""
    try:
        record = json.loads((fold / "run.json").read_text())
    except (OSError, ValueError):
        return False
    wanted = dict(zip(budget[::2], budget[1::2]))
    return (
        record.get("status") == "finished"
        and str(record.get("epochs")) == wanted.get("--epochs")
        and str(record.get("iterations_per_epoch")) == wanted.get("--iterations-per-epoch")
        and ("--seed" not in wanted or str(record.get("seed")) == wanted["--seed"])
    )


def predict_and_score(
    raw: Path, pre: Path, results: Path, out: Path, trainer: str, planner: str = "default", test: Path | None = None
) -> Path:
    """find-best over this trainer's fold 0, predict ``imagesTs`` of ``test`` (default: ``raw``) with it, score
    against its ``labelsTs``."""
    test = test or raw
    run("find-best", str(raw), "--preprocessed", str(pre), "--results", str(results), "--trainer", trainer,
        "--planner", planner, "-c", "3d_fullres", "-f", "0")  # fmt: skip
    run("predict", "-i", str(test / "imagesTs"), "-o", str(out), "-m", str(results / raw.name), "--fp32")
    run("evaluate", str(out), str(test / "labelsTs"))
    return out / "summary.json"


def foreground_dice_per_case(summary_file: Path) -> dict[str, float]:
    """Case id -> mean Dice over the foreground labels, from an ``autoseg evaluate`` summary."""
    summary = json.loads(summary_file.read_text())
    foreground = [str(v) for v in summary["labels"].values() if v != 0]
    per_case = {}
    for case in summary["metric_per_case"]:
        values = [case["metrics"][v]["Dice"] for v in foreground]
        values = [v for v in values if v is not None]  # a label absent from both: no Dice (null)
        per_case[case["case"]] = sum(values) / len(values) if values else float("nan")
    return per_case


def condition_groups(infos: dict[str, CaseInfo]) -> list[tuple[str, Callable[[CaseInfo], bool]]]:
    """The test-set conditions the effect benchmarks report: (name, membership) in table order. The youngest
    third is the third of ``infos`` with the smallest heads."""
    fills = sorted(info.head_fill for info in infos.values())
    youngest = fills[len(fills) // 3 - 1] if len(fills) >= 3 else fills[0]
    return [
        ("all", lambda i: True),
        ("clean (adult, still, thin)", lambda i: i.clean),
        ("inverted contrast", lambda i: i.contrast == "inverted"),
        ("isointense contrast", lambda i: i.contrast == "isointense"),
        ("youngest third", lambda i: i.head_fill <= youngest),
        ("motion ghosts", lambda i: i.ghosted),
        ("thick slices", lambda i: i.slice_step > 1),
    ]


def group_means(
    dice: dict[str, float], infos: dict[str, CaseInfo], groups: Sequence[tuple[str, Callable[[CaseInfo], bool]]]
) -> list[tuple[str, int, float]]:
    """(group name, number of cases, mean foreground Dice) for every group that has a case."""
    rows = []
    for name, member in groups:
        values = [dice[c] for c, info in infos.items() if member(info) and c in dice]
        if values:
            rows.append((name, len(values), sum(values) / len(values)))
    return rows


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(h) for h in header]] + [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for i, row in enumerate(cells):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
