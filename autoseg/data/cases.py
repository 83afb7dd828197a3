"""Read access to a preprocessed folder: memory-mapped images and labels, cached locations and properties.

Arrays are opened on every call and not kept: an open memory map holds a file descriptor, and a large
dataset would exhaust the process's limit. Opening costs a header read (well under a millisecond), small next
to cropping and augmenting a patch. Only properties are cached, and that cache is dropped when the object is
pickled, so a loader can hand it to spawned worker processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from autoseg import serialization
from autoseg.errors import AutosegError
from autoseg.preprocessing.case import CaseProperties
from autoseg.preprocessing.run import case_files


class PreprocessedCases:
    """The cases ``case_ids`` of one preprocessed configuration folder."""

    def __init__(self, folder: Path, case_ids: Sequence[str]) -> None:
        self.folder = Path(folder)
        self.case_ids = list(case_ids)
        missing = [c for c in self.case_ids if not all(p.is_file() for p in case_files(self.folder, c).values())]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise AutosegError(
                f"{self.folder}: case(s) {shown} are missing or incomplete; run `autoseg preprocess` for this"
                " dataset and configuration first"
            )
        self._known = set(self.case_ids)
        self._properties: dict[str, CaseProperties] = {}

    def __len__(self) -> int:
        return len(self.case_ids)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_properties"] = {}  # the receiver reads what it needs itself
        return state

    def _unreadable(self, case_id: str, what: str, reason: object) -> AutosegError:
        return AutosegError(
            f"{self.folder}: cannot read the {what} of case {case_id} ({reason}); run `autoseg preprocess` again"
            " to redo incomplete cases"
        )

    def _array(self, case_id: str, key: str, mmap: bool) -> np.ndarray:
        if case_id not in self._known:
            raise KeyError(f"case {case_id!r} is not one of the {len(self.case_ids)} cases opened in {self.folder}")
        path = case_files(self.folder, case_id)[key]
        try:
            array: np.ndarray = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise self._unreadable(case_id, key, exc) from None
        return array

    def image(self, case_id: str) -> np.ndarray:
        """(C, z, y, x) float32, memory-mapped read-only."""
        return self._array(case_id, "image", mmap=True)

    def seg(self, case_id: str) -> np.ndarray:
        """(z, y, x) int8/int16 labels, memory-mapped read-only; -1 marks voxels outside the nonzero mask."""
        return self._array(case_id, "label", mmap=True)

    def locations(self, case_id: str) -> np.ndarray:
        """(N, 4) int32 rows of (label value, z, y, x): sampled voxels of each foreground class."""
        locations = self._array(case_id, "locations", mmap=False)
        if locations.ndim != 2 or locations.shape[1] != 4:
            raise self._unreadable(case_id, "locations", f"shape {locations.shape}, expected (N, 4)")
        return locations

    def properties(self, case_id: str) -> CaseProperties:
        cached = self._properties.get(case_id)
        if cached is None:
            if case_id not in self._known:
                raise KeyError(f"case {case_id!r} is not one of the {len(self.case_ids)} cases opened in {self.folder}")
            try:
                cached = serialization.load(CaseProperties, case_files(self.folder, case_id)["properties"])
            except serialization.SchemaError as exc:
                raise self._unreadable(case_id, "properties", exc) from None
            self._properties[case_id] = cached
        return cached
