"""Benchmark plug-in: ``pediatric_always`` with the contrast remapping at p 0.1, registered as ``ped_remap_p10``."""

import dataclasses
from typing import ClassVar

from autoseg.trainers.pediatric import PediatricTrainer

from autoseg.augment.params import AugmentationParams
from autoseg.training.trainer import register_trainer


@register_trainer("ped_remap_p10")
class PediatricRemapP10Trainer(PediatricTrainer):
    """Half the remapping probability, whatever the training set holds."""

    augmentation: ClassVar[AugmentationParams] = dataclasses.replace(AugmentationParams(), p_contrast_remap=0.1)
    remap_off_from_other_contrast: ClassVar[float | None] = None
