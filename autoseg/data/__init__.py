"""Training data: cross-validation splits, case access, patch sampling; batch loading in ``autoseg.data.loader``.

The loader imports torch, so it is not imported here: ``from autoseg.data.loader import BatchLoader``.
"""

from autoseg.data.cases import PreprocessedCases
from autoseg.data.sampling import PatchSampler
from autoseg.data.splits import fold_cases, kfold_splits, load_or_create_splits

__all__ = ["PatchSampler", "PreprocessedCases", "fold_cases", "kfold_splits", "load_or_create_splits"]
