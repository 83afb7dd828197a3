"""Fine-tuning a ``--pretrained`` model, registered as ``finetune``.

Without --pretrained it trains from scratch with these settings and says so on stderr, rather than refusing:
the smoke test runs every trainer without weights, and a lower rate with a frozen start is still a recipe.
Freezing sets ``requires_grad``: SGD skips parameters without a gradient (no step, no weight decay, no
momentum), and the state depends on the epoch only, so a resumed run freezes exactly as a straight one.
Under DDP the parameters that stop getting gradients need ``find_unused_parameters`` (set below).
"""

import sys
from typing import ClassVar

from torch import nn

from autoseg.training.pretrained import encoder_parameters
from autoseg.training.trainer import Trainer, register_trainer


@register_trainer("finetune")
class FinetuneTrainer(Trainer):
    """Fine-tune --pretrained weights: a tenth of the learning rate, the encoder frozen for the first epochs."""

    # A tenth of the default's 1e-2: the usual step down for fine-tuning, enough for re-initialised heads
    # without washing out the pretrained features in the first epochs.
    initial_lr: ClassVar[float] = 1e-3
    # The new heads first learn on features they cannot disturb: the encoder is frozen for this share of the
    # epochs (rounded; 100 of nnU-Net's 1000), or for freeze_encoder_epochs when a variant sets it.
    freeze_encoder_fraction: ClassVar[float] = 0.1
    freeze_encoder_epochs: ClassVar[int | None] = None
    ddp_find_unused_parameters: ClassVar[bool] = True

    @property
    def frozen_epochs(self) -> int:
        if self.freeze_encoder_epochs is not None:
            return self.freeze_encoder_epochs
        return round(self.freeze_encoder_fraction * self.num_epochs)

    def build_network(self) -> nn.Module:
        if self.options.pretrained is None:
            print("autoseg: warning: trainer finetune without --pretrained trains from scratch", file=sys.stderr)
        self.network = super().build_network()
        return self.network

    def on_epoch_start(self, epoch: int) -> None:
        for parameter in encoder_parameters(self.network):
            parameter.requires_grad_(epoch >= self.frozen_epochs)
