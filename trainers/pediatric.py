"""nnU-Net's recipe plus grey/white contrast remapping (augment/pediatric.py), registered as ``pediatric``."""

import dataclasses
from typing import ClassVar

from autoseg.augment.params import AugmentationParams
from autoseg.training.trainer import Trainer, register_trainer


@register_trainer("pediatric")
class PediatricTrainer(Trainer):
    """Infant contrast, small heads or motion in test scans but not in training: grey/white contrast remapping.

    The last quarter of the epochs trains with nnU-Net's augmentation alone."""

    # Of the pediatric transforms, the contrast remapping carries the gain (benchmarks/effects.md, adult-contrast
    # training, mixed test set): alone at p 0.2 with the final default quarter, at 80 epochs it raised the
    # youngest third by 0.065, motion cases by 0.019 and inverted contrast by 0.098 with clean cases unchanged
    # (0.9355 both). Bias field, motion, ghosting, thick slices, wider scaling and elastic deformation added a
    # cost on clean cases and no gain there; they are the `pediatric_artefacts` trainer.
    augmentation: ClassVar[AugmentationParams] = dataclasses.replace(AugmentationParams(), p_contrast_remap=0.2)
    # The last quarter of the epochs trains with nnU-Net's own augmentation (better on every condition with
    # all the artefacts on, about even with the remapping alone).
    final_default_fraction: ClassVar[float] = 0.25

    def epoch_augmentations(self, epoch: int) -> AugmentationParams:
        if epoch >= round((1.0 - self.final_default_fraction) * self.num_epochs):
            return Trainer.augmentation
        return self.train_augmentations()
