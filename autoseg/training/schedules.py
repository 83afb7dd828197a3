"""Learning-rate schedules: a pure function of the epoch, so that a resumed or extended run recomputes them.

A schedule is asked for the rate of each epoch instead of being stepped, which is why extending a finished
run with a larger ``--epochs`` simply continues the curve of the new length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from autoseg.errors import AutosegError


class Schedule(Protocol):
    def lr(self, epoch: int, epochs: int) -> float:
        """The learning rate of ``epoch`` (0-based) in a run of ``epochs`` epochs."""
        ...


@dataclass(frozen=True)
class PolyLR:
    """nnU-Net's polynomial decay ``initial · (1 − epoch/epochs)^exponent``, stepped once per epoch."""

    initial: float
    exponent: float = 0.9  # nnU-Net v2 PolyLRScheduler

    def lr(self, epoch: int, epochs: int) -> float:
        return self.initial * (1 - min(epoch, epochs) / epochs) ** self.exponent


@dataclass(frozen=True)
class WarmupCosineLR:
    """A linear warm-up to ``initial``, then cosine annealing to ``min_lr`` (reached at epoch ``epochs``).

    Warm-up (Goyal et al. 2017, "Accurate, Large Minibatch SGD": a linear ramp over the first 5 of 90
    epochs) lasts ``w = max(1, round(warmup_fraction · epochs))`` epochs: epoch ``e < w`` gets
    ``initial · (e + 1) / w``, so epoch ``w − 1`` is the first at ``initial``. From there the rate follows
    SGDR's cosine (Loshchilov & Hutter 2017) without restarts:
    ``min_lr + ½ (initial − min_lr)(1 + cos(π t))`` with ``t = (e − (w − 1)) / (epochs − (w − 1))``; like
    ``PolyLR`` it would reach its floor at ``epoch == epochs``, so the last epoch still learns a little.
    The warm-up is a fraction of the run, so a short run (``--fast-dev-run``) warms up as briefly.
    """

    initial: float
    warmup_fraction: float = 0.05  # 5 of 90 epochs in Goyal et al. 2017 (≈ 5.6 %)
    min_lr: float = 0.0  # SGDR's η_min; 0 like PolyLR's end

    def __post_init__(self) -> None:
        if not 0 <= self.warmup_fraction < 1:
            raise AutosegError(f"WarmupCosineLR.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0 <= self.min_lr <= self.initial:
            raise AutosegError(
                f"WarmupCosineLR.min_lr must be between 0 and the initial rate {self.initial}, got {self.min_lr}"
            )

    def warmup_epochs(self, epochs: int) -> int:
        return min(max(1, round(self.warmup_fraction * epochs)), epochs)

    def lr(self, epoch: int, epochs: int) -> float:
        warmup = self.warmup_epochs(epochs)
        epoch = min(epoch, epochs)
        if epoch < warmup:
            return self.initial * (epoch + 1) / warmup
        peak = warmup - 1  # the epoch at ``initial``, where the cosine starts
        t = (epoch - peak) / (epochs - peak)
        return self.min_lr + 0.5 * (self.initial - self.min_lr) * (1 + math.cos(math.pi * t))
