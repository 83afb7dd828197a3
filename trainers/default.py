"""nnU-Net v2's default recipe, registered as ``default``."""

from autoseg.training.trainer import Trainer, register_trainer

register_trainer("default")(Trainer)
