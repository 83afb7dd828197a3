"""Atomic writes: write to a temporary file in the target folder, then rename over the target.

A crash or a kill therefore leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


@contextmanager
def atomic_path(target: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it is renamed onto ``target``.

    ``suffix`` keeps the ending that a writer dispatches on (``.nii.gz`` for SimpleITK, ``.npy``).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_with(target: str | os.PathLike[str], writer: Callable[[Path], Any], suffix: str = "") -> None:
    """Call ``writer(tmp_path)`` and move the result onto ``target`` atomically."""
    with atomic_path(target, suffix) as tmp:
        writer(tmp)


def write_text(target: str | os.PathLike[str], text: str) -> None:
    write_with(target, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(target: str | os.PathLike[str], data: Any) -> None:
    write_text(target, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_npy(target: str | os.PathLike[str], array: np.ndarray) -> None:
    def _save(path: Path) -> None:
        with open(path, "wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)

    write_with(target, _save, suffix=".npy")
