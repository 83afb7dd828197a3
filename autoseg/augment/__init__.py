"""Training augmentation: its values (``AugmentationParams``) and the batchgenerators pipeline built from them."""

from autoseg.augment.params import AugmentationParams
from autoseg.augment.pipeline import (
    BatchAugmenter,
    ComposeAugmenter,
    SpatialSetup,
    spatial_setup,
    train_augmenter,
    train_transforms,
    validation_augmenter,
    validation_transforms,
)

__all__ = [
    "AugmentationParams",
    "BatchAugmenter",
    "ComposeAugmenter",
    "SpatialSetup",
    "spatial_setup",
    "train_augmenter",
    "train_transforms",
    "validation_augmenter",
    "validation_transforms",
]
