"""Learning-rate schedules: a pure function of the epoch, so that a resumed or extended run recomputes them.

A schedule is asked for the rate of each epoch instead of being stepped, which is why extending a finished
run with a larger ``--epochs`` simply continues the curve of the new length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


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
