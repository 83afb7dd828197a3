"""Cross-validation splits: k-fold over the sorted case ids, stored as ``splits.json`` beside the data.

The folds equal scikit-learn's ``KFold(n_splits, shuffle=True, random_state=seed)`` over the sorted case ids,
which is nnU-Net's rule, so that folds (and therefore cross-validation results) are comparable with it.
The file is the source of truth once written: a person may edit it (say, to keep siblings in one fold), and
every later run reads the edited folds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from autoseg import atomic
from autoseg.errors import AutosegError

Split = dict[str, list[str]]

ALL_FOLDS: Literal["all"] = "all"  # the fold name that trains (and validates) on every case
DEFAULT_N_FOLDS = 5  # nnU-Net's five-fold cross-validation
DEFAULT_SEED = 12345  # nnU-Net's KFold random_state; keeps our folds identical to nnU-Net's


def kfold_splits(case_ids: Sequence[str], n_folds: int = DEFAULT_N_FOLDS, seed: int = DEFAULT_SEED) -> list[Split]:
    """Split the sorted ``case_ids`` into ``n_folds`` folds; each fold is ``{"train": [...], "val": [...]}``.

    With fewer cases than folds (but at least two) every fold validates on one case (leave-one-out):
    nnU-Net would stop with scikit-learn's error instead, and a tiny pilot dataset should still train.
    """
    ids = sorted(case_ids)
    if len(set(ids)) != len(ids):
        duplicates = sorted({c for c in ids if ids.count(c) > 1})
        raise AutosegError(f"duplicate case ids cannot be split into folds: {', '.join(duplicates)}")
    if len(ids) < 2:
        raise AutosegError(
            f"cross-validation needs at least 2 training cases, the dataset has {len(ids)};"
            f" train with fold {ALL_FOLDS!r} instead"
        )
    if n_folds < 2:
        raise AutosegError(f"n_folds must be at least 2, got {n_folds}")
    n_folds = min(n_folds, len(ids))
    # scikit-learn's KFold: shuffle the positions with a legacy RandomState, then cut them into folds whose
    # sizes differ by at most one (the first n % k folds take the extra case).
    order = np.random.RandomState(seed).permutation(len(ids))
    fold_sizes = np.full(n_folds, len(ids) // n_folds, dtype=int)
    fold_sizes[: len(ids) % n_folds] += 1
    splits = []
    start = 0
    for size in fold_sizes:
        in_val = np.zeros(len(ids), dtype=bool)
        in_val[order[start : start + size]] = True
        start += size
        splits.append(
            {
                "train": [c for c, v in zip(ids, in_val) if not v],
                "val": [c for c, v in zip(ids, in_val) if v],
            }
        )
    return splits


def _invalid(path: Path, where: str, problem: str) -> AutosegError:
    return AutosegError(
        f"{path}: {where}: {problem}; fix the file by hand or delete it to create new splits from the dataset"
    )


def validate_splits(data: Any, case_ids: Sequence[str], path: Path) -> list[Split]:
    """Check splits read from ``path``: a list of folds, each with train and val lists of known case ids."""
    if not isinstance(data, list) or not data:
        raise _invalid(path, "top level", "expected a non-empty list of folds")
    known = set(case_ids)
    for index, fold in enumerate(data):
        where = f"fold {index}"
        if not isinstance(fold, dict) or set(fold) != {"train", "val"}:
            keys = sorted(fold) if isinstance(fold, dict) else type(fold).__name__
            raise _invalid(path, where, f"expected an object with exactly the keys 'train' and 'val', got {keys}")
        for key in ("train", "val"):
            cases = fold[key]
            if not isinstance(cases, list) or not all(isinstance(c, str) for c in cases):
                raise _invalid(path, f"{where}.{key}", "expected a list of case id strings")
            unknown = sorted(set(cases) - known)
            if unknown:
                raise _invalid(path, f"{where}.{key}", f"unknown case id(s) {', '.join(unknown[:5])}")
        if not fold["train"]:
            raise _invalid(path, f"{where}.train", "no training cases")
        overlap = sorted(set(fold["train"]) & set(fold["val"]))
        if overlap:
            raise _invalid(path, where, f"case(s) {', '.join(overlap[:5])} are in both train and val")
    return [{"train": list(f["train"]), "val": list(f["val"])} for f in data]


def load_or_create_splits(
    path: Path, case_ids: Sequence[str], n_folds: int = DEFAULT_N_FOLDS, seed: int = DEFAULT_SEED
) -> list[Split]:
    """Read ``path`` if it exists (validated against ``case_ids``), else make k-fold splits and write them."""
    path = Path(path)
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise AutosegError(f"{path}: not valid JSON ({exc}); fix it or delete it to create new splits") from None
        return validate_splits(data, case_ids, path)
    splits = kfold_splits(case_ids, n_folds, seed)
    atomic.write_json(path, splits)
    return splits


def fold_cases(splits: Sequence[Split], fold: int | Literal["all"], path: Path) -> tuple[list[str], list[str]]:
    """The (train, val) case ids of ``fold``; fold ``"all"`` trains and validates on every case in the splits.

    Validating on the training cases (fold "all") only checks that training ran; it measures nothing.
    """
    if fold == ALL_FOLDS:
        every = sorted({c for s in splits for key in ("train", "val") for c in s[key]})
        return every, list(every)
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < len(splits):
        raise AutosegError(
            f"{path}: has {len(splits)} fold(s) (0 to {len(splits) - 1}), so fold {fold!r} does not exist;"
            f" pick one of them or {ALL_FOLDS!r}"
        )
    return list(splits[fold]["train"]), list(splits[fold]["val"])
