"""Every pediatric acquisition artefact and infant head geometry (augment/pediatric.py), registered as
``pediatric_artefacts``."""

import dataclasses
from typing import ClassVar

from autoseg.trainers.pediatric import PediatricTrainer

from autoseg.augment.params import AugmentationParams
from autoseg.augment.pipeline import spatial_setup
from autoseg.training.trainer import register_trainer


@register_trainer("pediatric_artefacts")
class PediatricArtefactsTrainer(PediatricTrainer):
    """Bias fields, ghosts or thick slices in test scans but not in training: every pediatric artefact.

    Bias field, k-space ghosting and motion, contrast remapping, thick slices, heads scaled down to 0.6 and
    elastic deformation; the last quarter of the epochs trains with nnU-Net's augmentation alone."""

    # `pediatric`'s contrast remapping (p 0.2) plus the other artefacts and the infant geometry
    augmentation: ClassVar[AugmentationParams] = dataclasses.replace(
        PediatricTrainer.augmentation,
        p_bias_field=0.3,
        p_motion=0.1,
        p_ghosting=0.1,
        p_thick_slice=0.2,
        # batchgenerators multiplies the sampling coordinates by the scale, so > 1 shows more of the image and
        # shrinks the anatomy: 1 / 0.6 lets a head shrink to 0.6 of its size (an infant's head against an
        # adult's); 0.7 keeps nnU-Net's zoom-in. Strong zoom-out reaches past the cut sample (sized for
        # sample_size_scale_range): that border is image 0 and label -1, which the loss ignores.
        p_scaling=0.3,
        scaling_range=(0.7, 1.0 / 0.6),
        # with AugmentationParams' elastic_alpha and elastic_sigma (nnU-Net v1's 3D values): displacement about
        # 1-2.5 voxels RMS (6 at most) at 64^3
        p_elastic=0.2,
    )
    # nnU-Net v1's 2D values: with alpha 900 a 2D field would move ~17 voxels RMS; 200 gives ~3-4
    elastic_alpha_2d: ClassVar[tuple[float, float]] = (0.0, 200.0)

    def train_augmentations(self) -> AugmentationParams:
        params = super().train_augmentations()  # the remapping off where the training set mixes contrasts
        patch = self.setup.configuration.patch_size
        if len(patch) == 2 or spatial_setup(patch, params).do_dummy_2d:
            return dataclasses.replace(params, elastic_alpha=self.elastic_alpha_2d)
        return params
