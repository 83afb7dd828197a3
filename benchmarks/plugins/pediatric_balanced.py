"""Benchmark plug-in: ``pediatric`` drawing the training cases of another tissue order (infants among adults) as a
third of the samples, registered as ``ped_balanced``."""

from typing import ClassVar

from autoseg.trainers.pediatric import PediatricTrainer

from autoseg.training.trainer import register_trainer


@register_trainer("ped_balanced")
class PediatricBalancedTrainer(PediatricTrainer):
    """The minority tissue order drawn as at least a third of the samples."""

    other_contrast_share: ClassVar[float | None] = 1 / 3
