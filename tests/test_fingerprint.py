"""Fingerprint values on hand-made cases, determinism, and the CLI writing fingerprint.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from conftest import IDENTITY

from autoseg import serialization
from autoseg.cli import main
from autoseg.dataset import load_dataset
from autoseg.fingerprint import Fingerprint, extract_fingerprint
from autoseg.io import Geometry, write_image


def hand_made_dataset(root: Path) -> Path:
    """Two cases on a 10×12×14 grid: a nonzero box [2:8, 3:10, 4:12]; class 1 as two separate
    blobs, class 2 as one; every foreground voxel has intensity 7 (case 0) or 9 (case 1)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    geometry = Geometry((3.0, 1.0, 0.5), (0.0, 0.0, 0.0), IDENTITY)
    for i, value in enumerate((7.0, 9.0)):
        image = np.zeros((10, 12, 14), np.float32)
        image[2:8, 3:10, 4:12] = 1.0
        label = np.zeros((10, 12, 14), np.uint8)
        label[3:5, 4:6, 5:7] = 1
        label[6:8, 8:10, 9:11] = 1
        label[3:4, 7:9, 9:12] = 2
        image[label > 0] = value
        write_image(image, geometry, root / "imagesTr" / f"c{i}_0000.nii.gz")
        write_image(label, geometry, root / "labelsTr" / f"c{i}.nii.gz")
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "T1"},
                "labels": {"background": 0, "spots": 1, "bar": 2},
                "numTraining": 2,
                "file_ending": ".nii.gz",
            }
        )
    )
    return root


def test_values_on_a_hand_made_case(tmp_path):
    spec = load_dataset(hand_made_dataset(tmp_path / "Dataset001_Hand"))
    fp = extract_fingerprint(spec, num_workers=1, foreground_samples_total=10_000, show_progress=False)
    case = fp.cases[0]
    assert case.case_id == "c0"
    assert case.spacing_mm == (3.0, 1.0, 0.5)
    assert case.shape_before_crop == (10, 12, 14)
    assert case.shape_after_crop == (6, 7, 8)
    assert case.bbox == ((2, 8), (3, 10), (4, 12))
    assert np.isclose(case.relative_size_after_crop, 6 * 7 * 8 / (10 * 12 * 14))
    assert case.class_voxel_counts == {"background": 10 * 12 * 14 - 16 - 6, "spots": 16, "bar": 6}
    assert case.class_component_counts == {"spots": 2, "bar": 1}
    stats = fp.foreground_intensity_per_channel[0]
    # equal samples per case from constant foregrounds of 7 and 9
    assert (stats.min, stats.max) == (7.0, 9.0)
    assert np.isclose(stats.mean, 8.0) and np.isclose(stats.std, 1.0)
    assert stats.percentile_00_5 == 7.0 and stats.percentile_99_5 == 9.0
    assert fp.median_relative_size_after_crop == case.relative_size_after_crop
    assert fp.labels == {"background": 0, "spots": 1, "bar": 2}


def test_same_seed_same_file_and_workers_do_not_matter(make_dataset, tmp_path):
    root = make_dataset(n_cases=4)
    out = tmp_path / "pre"
    assert main(["-q", "fingerprint", str(root), "--preprocessed", str(out), "--num-workers", "1"]) == 0
    first = (out / root.name / "fingerprint.json").read_bytes()
    assert main(["-q", "fingerprint", str(root), "--preprocessed", str(out), "--num-workers", "2"]) == 0
    assert (out / root.name / "fingerprint.json").read_bytes() == first
    assert main(["-q", "fingerprint", str(root), "--preprocessed", str(out), "--seed", "3"]) == 0
    assert (out / root.name / "fingerprint.json").read_bytes() != first
    fp = serialization.load(Fingerprint, out / root.name / "fingerprint.json")
    assert len(fp.cases) == 4 and fp.seed == 3
