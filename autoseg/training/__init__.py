"""Training: the trainer base and its hooks, the loop, checkpoints, schedules.

``Trainer``, ``register_trainer``, ``TrainOptions`` and ``TRAINERS`` are what a plug-in needs.
"""

from autoseg.training.trainer import TRAINERS, Trainer, TrainingSetup, TrainOptions, register_trainer

__all__ = ["TRAINERS", "TrainOptions", "Trainer", "TrainingSetup", "register_trainer"]
