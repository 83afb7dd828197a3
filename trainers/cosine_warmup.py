"""Linear warm-up, then cosine annealing, registered as ``cosine_warmup``."""

from typing import ClassVar

from autoseg.training.schedules import Schedule, WarmupCosineLR
from autoseg.training.trainer import Trainer, register_trainer


@register_trainer("cosine_warmup")
class CosineWarmupTrainer(Trainer):
    """Warm-up then cosine decay: for a higher --lr, large batches, or a new network unstable at the start."""

    # The first 5 % of epochs ramp linearly up to the rate (Goyal et al. 2017: 5 of 90 epochs); the cosine
    # (Loshchilov & Hutter 2017, SGDR without restarts) then anneals to 0 like the default's PolyLR.
    warmup_fraction: ClassVar[float] = 0.05
    min_lr: ClassVar[float] = 0.0

    def build_schedule(self) -> Schedule:
        return WarmupCosineLR(self.lr, self.warmup_fraction, self.min_lr)
