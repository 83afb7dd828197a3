"""Benchmark plug-in: ``pediatric`` with only the non-monotone contrast curves (the ones that can swap or invert
tissue classes), at half the probability so that as many samples get one, registered as ``ped_non_monotone``."""

import dataclasses
from typing import ClassVar

from autoseg.trainers.pediatric import PediatricTrainer

from autoseg.augment.params import AugmentationParams
from autoseg.training.trainer import register_trainer


@register_trainer("ped_non_monotone")
class PediatricNonMonotoneTrainer(PediatricTrainer):
    """Remapping at p 0.1, every curve non-monotone (the shipped 0.2 with half of them monotone)."""

    augmentation: ClassVar[AugmentationParams] = dataclasses.replace(
        PediatricTrainer.augmentation, p_contrast_remap=0.1, contrast_remap_p_non_monotone=1.0
    )
