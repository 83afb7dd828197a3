"""Soft Tversky loss alone (alpha 0.3, beta 0.7), registered as ``tversky``."""

from torch import nn

from autoseg.losses_robust import SoftTverskyLoss
from autoseg.training.trainer import Trainer, register_trainer


@register_trainer("tversky")
class TverskyTrainer(Trainer):
    """Small or thin structures where missed voxels cost more than extra ones: Tversky loss (alpha 0.3, beta 0.7)."""

    def build_loss(self) -> nn.Module:
        return SoftTverskyLoss(batch_dice=self.setup.configuration.batch_dice)
