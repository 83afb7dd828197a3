"""Benchmark plug-in: ``pediatric`` drawing the training cases of another tissue order (infants among adults) as a
quarter of the samples, registered as ``ped_balanced_quarter``.

The shipped ``pediatric`` has the same rule today (``other_contrast_share = 0.25``); this file fixes the share, so
the commands in benchmarks/effects.md measure the same trainer if the shipped default changes."""

from typing import ClassVar

from autoseg.trainers.pediatric import PediatricTrainer

from autoseg.training.trainer import register_trainer


@register_trainer("ped_balanced_quarter")
class PediatricBalancedQuarterTrainer(PediatricTrainer):
    """The minority tissue order drawn as at least a quarter of the samples."""

    other_contrast_share: ClassVar[float | None] = 1 / 4
