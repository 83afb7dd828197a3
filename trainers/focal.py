"""Focal loss (gamma 2) + soft Dice, 1:1, registered as ``focal``."""

from torch import nn

from autoseg.losses_robust import FocalDiceLoss
from autoseg.training.trainer import Trainer, register_trainer


@register_trainer("focal")
class FocalTrainer(Trainer):
    """Many easy background voxels drowning the hard ones: focal loss (gamma 2) + Dice instead of CE + Dice."""

    def build_loss(self) -> nn.Module:
        return FocalDiceLoss(batch_dice=self.setup.configuration.batch_dice)
