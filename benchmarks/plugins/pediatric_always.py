"""Benchmark plug-in: ``pediatric`` that remaps the contrast whatever the training set holds (the trainer
shipped before the tissue-order switch), registered as ``pediatric_always``.

    python benchmarks/pediatric_effect.py ... --plugins benchmarks/plugins/pediatric_always.py \
        --trainers default pediatric_always
"""

from typing import ClassVar

from autoseg.trainers.pediatric import PediatricTrainer

from autoseg.training.trainer import register_trainer


@register_trainer("pediatric_always")
class PediatricAlwaysTrainer(PediatricTrainer):
    """The contrast remapping (p 0.2) also where the training set already mixes contrasts."""

    remap_off_from_other_contrast: ClassVar[float | None] = None
