"""Benchmark plug-in: ``pediatric`` with nnU-Net's augmentation alone for the last half of the epochs instead of
the last quarter, registered as ``ped_half_taper``."""

from typing import ClassVar

from autoseg.trainers.pediatric import PediatricTrainer

from autoseg.training.trainer import register_trainer


@register_trainer("ped_half_taper")
class PediatricHalfTaperTrainer(PediatricTrainer):
    """The contrast remapping for the first half of the epochs only."""

    final_default_fraction: ClassVar[float] = 0.5
