"""nnU-Net's recipe plus grey/white contrast remapping (augment/pediatric.py), registered as ``pediatric``."""

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, ClassVar

from autoseg.augment.params import AugmentationParams
from autoseg.data.cases import PreprocessedCases
from autoseg.data.contrast import ContrastVariety, contrast_variety
from autoseg.training.trainer import Trainer, register_trainer


@register_trainer("pediatric")
class PediatricTrainer(Trainer):
    """Infant contrast, small heads or motion in test scans but not in training: grey/white contrast remapping.

    The remapping is left off when the training set already shows more than one tissue contrast; the last
    quarter of the epochs trains with nnU-Net's augmentation alone. Where the other contrast is rare (a few
    infants among adults), its cases are drawn as a quarter of the training samples instead."""

    # Of the pediatric transforms, the contrast remapping carries the gain (benchmarks/effects.md, adult-contrast
    # training, mixed test set): alone at p 0.2 with the final default quarter, at 80 epochs and two seeds it
    # raised the youngest third by 0.066 and motion cases by 0.019, clean cases -0.002. Bias field, motion,
    # ghosting, thick slices, wider scaling and elastic deformation added a cost on clean cases and no gain
    # there; they are the `pediatric_artefacts` trainer.
    augmentation: ClassVar[AugmentationParams] = dataclasses.replace(AugmentationParams(), p_contrast_remap=0.2)
    # The last quarter of the epochs trains with nnU-Net's own augmentation (better on every condition with
    # all the artefacts on, about even with the remapping alone).
    final_default_fraction: ClassVar[float] = 0.25
    # Where the training set already holds the other contrasts (mixed training data) the remapping cost Dice on
    # every condition at 20 to 80 epochs (benchmarks/effects.md). It is left off when at least this fraction
    # of the training cases orders the labels' mean intensities differently from the majority (autoseg.data.
    # contrast); the phantoms' mixed training set has 0.25, an adult-only one 0. None: always remap.
    remap_off_from_other_contrast: ClassVar[float | None] = 0.1
    # Where the remapping is off but fewer than this share of the training cases order the tissues differently
    # from the majority (a few infants among adults), those cases are drawn as this share of the samples. With 2
    # infants among 20 cases (benchmarks/effects.md, two seeds) that raised the youngest third by 0.023 at 40
    # epochs and 0.025 at 80, and cost the clean cases 0.010 at 40 and 0.002 at 80. None: every case equally often.
    other_contrast_share: ClassVar[float | None] = 0.25

    @functools.cached_property
    def contrast_variety(self) -> ContrastVariety | None:
        """The training set's tissue orders (every training case of the dataset, so every fold agrees)."""
        setup = self.setup
        cases = PreprocessedCases(setup.data_dir, setup.case_ids)
        return contrast_variety(cases, setup.case_ids, setup.plan.foreground_labels)

    def remaps_contrast(self) -> bool:
        if self.remap_off_from_other_contrast is None:
            return True
        variety = self.contrast_variety
        return variety is None or variety.other_fraction < self.remap_off_from_other_contrast

    def train_augmentations(self) -> AugmentationParams:
        if self.remaps_contrast():
            return self.augmentation
        return dataclasses.replace(self.augmentation, p_contrast_remap=0.0)

    def epoch_augmentations(self, epoch: int) -> AugmentationParams:
        if epoch >= round((1.0 - self.final_default_fraction) * self.num_epochs):
            return Trainer.augmentation
        return self.train_augmentations()

    def _rare_other_contrast(self) -> tuple[float, ContrastVariety] | None:
        """(share, variety) where the remapping is off and the dataset's cases in another order are fewer than
        ``other_contrast_share`` (decided on every training case of the dataset, so every fold agrees)."""
        share, variety = self.other_contrast_share, self.contrast_variety
        if share is None or variety is None or self.remaps_contrast() or variety.other_fraction >= share:
            return None
        return share, variety

    def draws_other_contrast_more_often(self) -> bool:
        return self._rare_other_contrast() is not None

    def case_weights(self, case_ids: Sequence[str]) -> Sequence[float] | None:
        rare = self._rare_other_contrast()
        if rare is None:
            return None
        share, variety = rare
        other = set(variety.other_order_cases)
        count_other = sum(c in other for c in case_ids)
        if count_other == 0 or count_other / len(case_ids) >= share:
            return None  # none of this fold's cases in another order, or already enough (all of them included)
        other_weight, majority_weight = share / count_other, (1.0 - share) / (len(case_ids) - count_other)
        return [other_weight if c in other else majority_weight for c in case_ids]

    def notes(self) -> dict[str, Any]:
        variety = self.contrast_variety
        if variety is None:
            return {"contrast_remap": "on: fewer than two foreground labels to order"}
        names = {v: k for k, v in self.setup.plan.labels.items()}
        threshold = self.remap_off_from_other_contrast
        rule = "always" if threshold is None else f"off from {threshold:.0%}"
        notes = {
            "contrast_remap": f"{'on' if self.remaps_contrast() else 'off'}: {variety.describe(names)}; {rule}",
            "other_contrast_cases": list(variety.other_order_cases),
        }
        if self.other_contrast_share is not None and not self.remaps_contrast():
            share = f"{self.other_contrast_share:.0%}"
            notes["other_contrast_share"] = (
                f"on: the cases in another order drawn as at least {share} of the training samples"
                if self.draws_other_contrast_more_often()
                else f"off: {variety.other_fraction:.0%} of the training cases in another order, at least {share}"
            )
        return notes
