"""Shared fixtures: tiny synthetic datasets written in the nnU-Net raw layout."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from autoseg.io import Geometry, write_image

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def blob_case(
    shape: tuple[int, int, int], rng: np.random.Generator, channels: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """A head-like case: a nonzero ellipsoid with two nested labelled blobs inside, air around it."""
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = np.sqrt(zz**2 + yy**2 + xx**2)
    label = np.zeros(shape, np.uint8)
    label[r < 0.6] = 1
    label[r < 0.3] = 2
    image = np.zeros((channels, *shape), np.float32)
    for c in range(channels):
        image[c][r < 0.85] = 100 + 10 * c + rng.normal(0, 5, size=int((r < 0.85).sum()))
        image[c][label == 1] += 50
        image[c][label == 2] += 120 * (1 if c == 0 else -0.5)
    return image, label


def write_dataset(
    root: Path,
    n_cases: int = 3,
    shape: tuple[int, int, int] = (16, 20, 18),
    channels: int = 1,
    spacing: tuple[float, float, float] = (2.0, 1.0, 1.0),
    seed: int = 0,
    ending: str = ".nii.gz",
    labels: dict[str, int] | None = None,
) -> Path:
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    geometry = Geometry(spacing, (0.0, 0.0, 0.0), IDENTITY)
    for i in range(n_cases):
        image, label = blob_case(shape, rng, channels)
        for c in range(channels):
            write_image(image[c], geometry, root / "imagesTr" / f"case{i:02d}_{c:04d}{ending}")
        write_image(label, geometry, root / "labelsTr" / f"case{i:02d}{ending}")
    description = {
        "channel_names": {str(c): ("T1", "T2", "FLAIR")[c] for c in range(channels)},
        "labels": labels or {"background": 0, "outer": 1, "inner": 2},
        "numTraining": n_cases,
        "file_ending": ending,
    }
    (root / "dataset.json").write_text(json.dumps(description, indent=2))
    return root


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., Path]:
    counter = iter(range(1000))

    def _make(**kwargs: object) -> Path:
        return write_dataset(tmp_path / f"Dataset{next(counter):03d}_Test", **kwargs)  # type: ignore[arg-type]

    return _make
