"""Named sets of plan-and-train defaults (``--preset``); imported by ``autoseg --help``, so no torch here."""

from __future__ import annotations

from dataclasses import dataclass

ALL_FOLDS = (0, 1, 2, 3, 4)


@dataclass(frozen=True)
class Preset:
    """A named set of defaults; every explicit option on the command line wins over it."""

    description: str
    configurations: tuple[str, ...] | None = None  # None: every configuration of the plan
    folds: tuple[int, ...] = ALL_FOLDS
    epochs: int | None = None  # None: the trainer's (1000)
    iterations_per_epoch: int | None = None
    val_iterations: int | None = None


PRESETS: dict[str, Preset] = {
    "full": Preset("every configuration, 5 folds, the trainer's full budget (a GPU wants days for it)"),
    # Sized on 2 CPU cores for the example dataset (README): 3d_fullres and 2d, one fold each, a few short
    # epochs. Measured there: ~60 s per 3d_fullres epoch and ~26 s per 2d epoch, so the README's main job
    # (training, find-best, predicting the 6 test cases) takes about 10 minutes, within the 15 we promise.
    "quick": Preset(
        "a laptop-CPU run: 3d_fullres and 2d, fold 0, 6 epochs of 40 iterations",
        configurations=("3d_fullres", "2d"),
        folds=(0,),
        epochs=6,
        iterations_per_epoch=40,
        val_iterations=10,
    ),
}
