"""Soft Dice alone, no cross-entropy, registered as ``dice_only``."""

from torch import nn

from autoseg.losses import SoftDiceLoss
from autoseg.training.trainer import Trainer, register_trainer


@register_trainer("dice_only")
class DiceOnlyTrainer(Trainer):
    """Ablation, or metrics that only reward overlap: soft Dice alone, without cross-entropy."""

    def build_loss(self) -> nn.Module:
        return SoftDiceLoss(batch_dice=self.setup.configuration.batch_dice)
