"""Does a training set already hold more than one tissue contrast? The order of the labelled classes' mean
intensities, case by case.

Adult T1 brains order CSF < grey matter < white matter; infant T1 brains swap grey and white matter, and at
6-12 months the two are about equal, so their order flips from case to case. A training set whose cases
disagree on that order already teaches the network more than one contrast; the ``pediatric`` trainer then
leaves its contrast remapping off (benchmarks/effects.md: in distribution the remapping cost Dice).

The means come from the class locations sampled at preprocessing (``*_locations.npy``), at most
``MAX_VOXELS_PER_CLASS`` per class and case, read from the memory-mapped image: a few milliseconds a case.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from autoseg.data.cases import PreprocessedCases

MAX_VOXELS_PER_CLASS = 2000

Order = tuple[int, ...]  # foreground label values from the darkest to the brightest mean intensity


@dataclass(frozen=True)
class ContrastVariety:
    """Per channel, the most common order of the classes, and the cases that show another one."""

    cases: int
    majority_orders: tuple[Order, ...]  # one per input channel
    other_order_cases: tuple[str, ...]  # cases whose order differs in at least one channel

    @property
    def other_fraction(self) -> float:
        return len(self.other_order_cases) / self.cases if self.cases else 0.0

    def describe(self, names: dict[int, str] | None = None) -> str:
        def shown(order: Order) -> str:
            return " < ".join(names.get(v, str(v)) if names else str(v) for v in order)

        channels = "; ".join(f"channel {c}: {shown(o)}" for c, o in enumerate(self.majority_orders))
        return (
            f"{len(self.other_order_cases)} of {self.cases} training cases order the mean intensities of the"
            f" labels differently from the majority ({channels})"
        )


def case_orders(image: np.ndarray, locations: np.ndarray, classes: Sequence[int]) -> tuple[Order, ...]:
    """Per channel of ``image`` (C, *spatial), the ``classes`` present in ``locations`` ((N, 1 + ndim) rows of
    label value and coordinates) sorted by their mean intensity (ties keep the label order)."""
    points: dict[int, tuple[np.ndarray, ...]] = {}
    for value in classes:
        rows = locations[locations[:, 0] == value, 1:]
        if len(rows):
            rows = rows[:: max(1, len(rows) // MAX_VOXELS_PER_CLASS)]
            points[int(value)] = tuple(rows.T)
    orders = []
    for channel in image:
        means = {value: float(np.mean(channel[where], dtype=np.float64)) for value, where in points.items()}
        orders.append(tuple(sorted(means, key=lambda v: (means[v], v))))
    return tuple(orders)


def _agrees(order: Order, majority: Order) -> bool:
    """``order`` (maybe missing classes that a case lacks) is ``majority`` restricted to its classes."""
    return tuple(v for v in majority if v in order) == order


def contrast_variety(
    cases: PreprocessedCases, case_ids: Sequence[str], classes: Sequence[int]
) -> ContrastVariety | None:
    """The tissue orders of ``case_ids``; None when fewer than two foreground ``classes`` can be ordered."""
    if len(classes) < 2:
        return None
    per_case = {c: case_orders(cases.image(c), cases.locations(c), classes) for c in case_ids}
    complete = [o for o in per_case.values() if all(len(channel) == len(classes) for channel in o)]
    if not complete:
        return None
    channels = len(complete[0])
    majority = tuple(Counter(o[ch] for o in complete).most_common(1)[0][0] for ch in range(channels))
    others = tuple(c for c, o in per_case.items() if not all(_agrees(o[ch], majority[ch]) for ch in range(channels)))
    return ContrastVariety(len(per_case), majority, others)
