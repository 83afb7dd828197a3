"""Dice + CE + a boundary loss whose weight ramps up over training, registered as ``boundary``."""

from typing import ClassVar

from torch import nn

from autoseg.losses_robust import BoundaryDiceCELoss, boundary_weight_at
from autoseg.training.trainer import Trainer, register_trainer


@register_trainer("boundary")
class BoundaryTrainer(Trainer):
    """Highly unbalanced foreground where region losses stall: Dice + CE + boundary loss ramped up per epoch."""

    # Kervadec et al. 2019 move 0.01 of the weight to the boundary term after each epoch ("rebalance");
    # here Dice + CE keeps weight 1 and the boundary weight grows by that step, capped at 1 (epoch 100).
    boundary_weight_step: ClassVar[float] = 0.01
    boundary_weight_max: ClassVar[float] = 1.0

    def build_loss(self) -> nn.Module:
        self.boundary_loss = BoundaryDiceCELoss(batch_dice=self.setup.configuration.batch_dice)
        return self.boundary_loss

    def on_epoch_start(self, epoch: int) -> None:
        weight = boundary_weight_at(epoch, self.boundary_weight_step, self.boundary_weight_max)
        self.boundary_loss.boundary_weight = weight
