"""Where autoseg keeps what it derives from a dataset: a flag, else an AUTOSEG_* variable, else an error.

Layout under the preprocessed root, per dataset (named after its folder)::

    <preprocessed>/<dataset>/fingerprint.json
    <preprocessed>/<dataset>/plans/<planner>.json
    <preprocessed>/<dataset>/<planner>_<configuration>/     one folder per configuration's data
    <preprocessed>/<dataset>/gt_segmentations/               copies of the training labels
    <preprocessed>/<dataset>/splits.json                     the cross-validation folds (user-editable)

and under the results root::

    <results>/<dataset>/<trainer>__<planner>__<configuration>/fold_<k>/
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from autoseg.errors import AutosegError


def _resolve_one(flag_value: str | Path | None, flag: str, variable: str, what: str) -> Path:
    if flag_value:
        return Path(flag_value)
    from_env = os.environ.get(variable)
    if from_env:
        return Path(from_env)
    raise AutosegError(f"no folder for {what}: pass {flag} DIR or set the environment variable {variable}")


@dataclass(frozen=True)
class Paths:
    preprocessed: Path
    results_root: Path | None = None

    @staticmethod
    def resolve(preprocessed: str | Path | None = None, results: str | Path | None = None) -> Paths:
        """The preprocessed root is always needed; the results root only by commands that call ``results``."""
        pre = _resolve_one(preprocessed, "--preprocessed", "AUTOSEG_PREPROCESSED", "preprocessed data")
        res = results or os.environ.get("AUTOSEG_RESULTS")
        return Paths(pre, Path(res) if res else None)

    @property
    def results(self) -> Path:
        if self.results_root is None:
            raise AutosegError(
                "no folder for results (trained models): pass --results DIR or set the environment variable"
                " AUTOSEG_RESULTS"
            )
        return self.results_root

    def dataset_dir(self, dataset: str) -> Path:
        return self.preprocessed / dataset

    def fingerprint_file(self, dataset: str) -> Path:
        return self.dataset_dir(dataset) / "fingerprint.json"

    def plan_file(self, dataset: str, planner: str) -> Path:
        return self.dataset_dir(dataset) / "plans" / f"{planner}.json"

    def configuration_dir(self, dataset: str, data_identifier: str) -> Path:
        return self.dataset_dir(dataset) / data_identifier

    def ground_truth_dir(self, dataset: str) -> Path:
        return self.dataset_dir(dataset) / "gt_segmentations"

    def splits_file(self, dataset: str) -> Path:
        return self.dataset_dir(dataset) / "splits.json"

    def model_dir(self, dataset: str, trainer: str, planner: str, configuration: str) -> Path:
        return self.results / dataset / f"{trainer}__{planner}__{configuration}"

    def fold_dir(self, dataset: str, trainer: str, planner: str, configuration: str, fold: int | str) -> Path:
        return self.model_dir(dataset, trainer, planner, configuration) / f"fold_{fold}"
