"""The trainer base: the training recipe as class attributes and small hooks; ``fit`` runs it.

A variant is a subclass that changes attributes or overrides hooks, never ``__init__`` or ``fit``::

    @register_trainer("short_lowlr")
    class ShortLowLR(Trainer):
        \"\"\"100 epochs at a tenth of the learning rate.\"\"\"
        epochs = 100
        initial_lr = 1e-3

How the recipe is executed (devices, mixed precision, DDP, checkpoints, logs) lives in ``loop.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from autoseg.augment.params import AugmentationParams
from autoseg.errors import AutosegError
from autoseg.plan import Configuration, Plan
from autoseg.registry import Registry
from autoseg.training.progress import EpochRecord
from autoseg.training.schedules import PolyLR, Schedule


@dataclass(frozen=True)
class TrainingSetup:
    """What is trained, and where: derived from the dataset, the plan and the command line."""

    dataset: str
    plan: Plan
    configuration: Configuration
    fold: int
    trainer_name: str
    case_ids: tuple[str, ...]  # every training case of the dataset; the fold picks its share
    data_dir: Path  # the configuration's preprocessed cases
    splits_file: Path
    ground_truth_dir: Path  # the training labels in the original geometry, for whole-case validation
    file_ending: str
    output_dir: Path  # results/<dataset>/<trainer>__<planner>__<configuration>/fold_<k>
    dataset_description: Path | None = None  # dataset.json, copied beside the model so it predicts on its own


@dataclass(frozen=True)
class TrainOptions:
    """The knobs every trainer has on the command line; ``None`` keeps the trainer's class attribute."""

    epochs: int | None = None
    iterations_per_epoch: int | None = None
    val_iterations: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    num_workers: int | None = None
    seed: int = 0
    device: str | None = None
    # torch.compile the network: None = on for CUDA (where triton is installed), off elsewhere
    compile: bool | None = None
    # CUDA graphs for the compiled step (torch.compile's "reduce-overhead"): needs static shapes, CUDA only
    cuda_graphs: bool = False
    # where the training augmentation runs: "cpu" (worker processes) or "device" (torch ops on the batch's
    # device, the workers only cut patches); None = "device" on CUDA, "cpu" elsewhere
    augmentation: str | None = None
    # keep the fold's cases on the device and cut batches there, without workers (autoseg.data.resident):
    # "auto" (None) = with device augmentation on CUDA when they fit in a quarter of the free GPU memory
    cases_on_device: str | None = None
    fast_dev_run: bool = False
    resume: bool = False
    overwrite: bool = False
    save_probabilities: bool = False
    validation_mirroring: bool = True
    show_progress: bool = True
    early_stopping_patience: int | None = None
    early_stopping_min_epochs: int | None = None
    # Start from these weights (--pretrained): a checkpoint, fold, model, results folder or bundle; see
    # autoseg.training.pretrained. Ignored when resuming, where the checkpoint holds the weights.
    pretrained: Path | str | None = None

    def __post_init__(self) -> None:
        if self.augmentation not in (None, "cpu", "device"):
            raise AutosegError(
                f"augmentation (--augmentation) must be 'cpu' or 'device', got {self.augmentation!r}; leave it out"
                " for the default (device on CUDA, cpu elsewhere)"
            )
        if self.cases_on_device not in (None, "auto", "always", "never"):
            raise AutosegError(
                f"cases_on_device (--cases-on-device) must be 'auto', 'always' or 'never', got {self.cases_on_device!r}"
            )
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise AutosegError(
                f"early_stopping_patience (--early-stopping-patience) must be at least 1 epoch, got"
                f" {self.early_stopping_patience}; leave it out to train the whole budget"
            )
        if self.early_stopping_min_epochs is not None and self.early_stopping_min_epochs < 0:
            raise AutosegError(
                f"early_stopping_min_epochs (--early-stopping-min-epochs) must be 0 or more, got"
                f" {self.early_stopping_min_epochs}"
            )


class Trainer:
    """nnU-Net v2's default recipe: SGD with Nesterov momentum, polynomial decay, Dice + CE, deep supervision."""

    # Budget (nnU-Net v2 nnUNetTrainer: num_epochs 1000, num_iterations_per_epoch 250, num_val_iterations 50).
    epochs: ClassVar[int] = 1000
    iterations_per_epoch: ClassVar[int] = 250
    val_iterations: ClassVar[int] = 50
    # Optimiser (nnUNetTrainer.configure_optimizers).
    initial_lr: ClassVar[float] = 1e-2
    momentum: ClassVar[float] = 0.99
    weight_decay: ClassVar[float] = 3e-5
    nesterov: ClassVar[bool] = True
    grad_clip_norm: ClassVar[float] = 12.0
    # Sampling: a third of each batch is centred on foreground (oversample_foreground_percent 0.33).
    oversample_foreground: ClassVar[float] = 0.33
    # The pseudo Dice's moving average that selects checkpoint_best (nnU-Net: 0.9 old, 0.1 new).
    pseudo_dice_momentum: ClassVar[float] = 0.9
    # checkpoint_latest every this many epochs (nnU-Net: 50). An epoch of a brain plan is ~15-25 s on a
    # modern GPU and a checkpoint ~0.5 s, so 5 bounds the work lost to a kill at a minute or two.
    checkpoint_every: ClassVar[int] = 5
    deep_supervision: ClassVar[bool] = True
    # DDP's find_unused_parameters: a variant that freezes parameters after DDP wrapped the network (a frozen
    # encoder) needs it, at the cost of one graph traversal per step; the loop freezes what it knows before.
    ddp_find_unused_parameters: ClassVar[bool] = False
    # Early stopping on the pseudo Dice's moving average: off (None) unless a variant or
    # --early-stopping-patience sets it. The minimum is 5 time constants of the 0.9 moving average
    # (0.9^50 < 0.6 %), so the noisy first epochs cannot stop a run.
    early_stopping_patience: ClassVar[int | None] = None
    early_stopping_min_epochs: ClassVar[int] = 50
    augmentation: ClassVar[AugmentationParams] = AugmentationParams()

    def __init__(self, setup: TrainingSetup, options: TrainOptions | None = None) -> None:
        self.setup = setup
        self.options = options or TrainOptions()

    # -- the values this run uses: the command line wins over the class attributes ------------------------
    @property
    def num_epochs(self) -> int:
        return self.options.epochs or (2 if self.options.fast_dev_run else self.epochs)

    @property
    def num_iterations(self) -> int:
        return self.options.iterations_per_epoch or (2 if self.options.fast_dev_run else self.iterations_per_epoch)

    @property
    def num_val_iterations(self) -> int:
        return self.options.val_iterations or (2 if self.options.fast_dev_run else self.val_iterations)

    @property
    def lr(self) -> float:
        return self.options.lr if self.options.lr is not None else self.initial_lr

    @property
    def batch_size(self) -> int:
        return self.options.batch_size or self.setup.configuration.batch_size

    @property
    def stopping_patience(self) -> int | None:
        patience = self.options.early_stopping_patience
        return patience if patience is not None else self.early_stopping_patience

    @property
    def stopping_min_epochs(self) -> int:
        minimum = self.options.early_stopping_min_epochs
        return minimum if minimum is not None else self.early_stopping_min_epochs

    @property
    def num_classes(self) -> int:
        return len(self.setup.plan.labels)

    @property
    def num_input_channels(self) -> int:
        return len(self.setup.plan.channel_names)

    # -- hooks ---------------------------------------------------------------------------------------------
    def build_network(self) -> nn.Module:
        from autoseg.networks import build_network

        return build_network(
            self.setup.configuration.network, self.num_input_channels, self.num_classes, self.deep_supervision
        )

    def build_loss(self) -> nn.Module:
        """The loss of one output; the base wraps it in deep supervision."""
        from autoseg.losses import DiceCELoss

        return DiceCELoss(batch_dice=self.setup.configuration.batch_dice)

    def build_optimizer(self, network: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            network.parameters(),
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            nesterov=self.nesterov,
        )

    def load_pretrained(self, network: nn.Module) -> dict[str, Any] | None:
        """Load ``options.pretrained`` into the freshly built network (not called when resuming); returns what
        was loaded, for run.json, or None without --pretrained. A variant may load differently."""
        if self.options.pretrained is None:
            return None
        from autoseg.training.pretrained import load_pretrained

        setup = self.setup
        summary = load_pretrained(network, self.options.pretrained, setup.plan, setup.configuration)
        return summary.to_json()

    def build_schedule(self) -> Schedule:
        return PolyLR(self.lr)

    def train_augmentations(self) -> AugmentationParams:
        """The augmentation settings; a variant returns changed parameters (``dataclasses.replace``)."""
        return self.augmentation

    def epoch_augmentations(self, epoch: int) -> AugmentationParams:
        """The augmentation settings of ``epoch`` (0-based, of ``num_epochs``): ``train_augmentations()`` for
        every epoch unless a variant schedules them (a curriculum). Probabilities and ranges may change from
        epoch to epoch; what sizes the cut sample (the rotation ranges, ``sample_size_scale_range``) may not.
        A pure function of the epoch, so a resumed run augments as an uninterrupted one."""
        return self.train_augmentations()

    def case_weights(self, case_ids: Sequence[str]) -> Sequence[float] | None:
        """How often each of the fold's training cases ``case_ids`` is drawn, relative to the others; None
        (nnU-Net) draws every case equally often. Validation patches are always drawn uniformly."""
        return None

    def notes(self) -> dict[str, Any]:
        """What this trainer decided from the data (JSON values), written to run.json as ``trainer_notes``; the
        text values are also printed when training starts."""
        return {}

    def on_epoch_start(self, epoch: int) -> None:
        """Called before every epoch on every rank (also the first one after a resume): set what depends on
        the epoch only (a loss weight ramp, a frozen encoder), so a resumed run equals an uninterrupted one."""

    def on_epoch_end(self, record: EpochRecord) -> str | None:
        """Called after every epoch on every rank; return a reason to stop training early, else None."""
        return None

    def early_stopping_reason(self, records: Sequence[EpochRecord]) -> str | None:
        """Why to stop after ``records`` (every epoch so far, restored on resume), or None to go on."""
        patience = self.stopping_patience
        if patience is None:
            return None
        return early_stopping_reason(records, patience, self.stopping_min_epochs)

    def fit(self) -> Path:
        """Train, validate on the fold's whole held-out cases, and return the fold's output folder."""
        from autoseg.training.loop import fit

        return fit(self)


def early_stopping_reason(records: Sequence[EpochRecord], patience: int, min_epochs: int) -> str | None:
    """A reason when the moving-average pseudo Dice has not improved for ``patience`` epochs and at least
    ``min_epochs`` epochs have run; else None. Improving means exceeding every earlier value, as for
    checkpoint_best. A pure function of the records, so a resumed run stops exactly where a straight one does.
    """
    if not records or len(records) < min_epochs:
        return None
    best: float | None = None
    best_epoch = -1
    for record in records:
        value = record.ema_pseudo_dice
        if value is not None and (best is None or value > best):
            best, best_epoch = value, record.epoch
    if best is None:  # no pseudo Dice yet (no foreground seen): nothing to judge
        return None
    stale = records[-1].epoch - best_epoch
    if stale < patience:
        return None
    return (
        f"early stopping: moving-average pseudo Dice did not improve for {stale} epoch{'s' if stale != 1 else ''}"
        f" (best {best:.4f} at epoch {best_epoch})"
    )


TRAINERS: Registry[type[Trainer]] = Registry("trainer")


def register_trainer(name: str) -> Callable[[type[Trainer]], type[Trainer]]:
    """Class decorator: ``@register_trainer("name")`` makes a Trainer subclass available by name."""
    return TRAINERS.register(name)
