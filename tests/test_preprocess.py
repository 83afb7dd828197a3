"""Preprocessing a dataset end to end: stored files, the way back to the original geometry, resuming."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import IDENTITY, blob_case

from autoseg import serialization
from autoseg.cli import main
from autoseg.dataset import load_case, load_dataset
from autoseg.io import Geometry, read_image, write_image
from autoseg.plan import Plan
from autoseg.preprocessing.case import CaseProperties, preprocess_case, restore_probabilities, restore_segmentation
from autoseg.preprocessing.run import case_files


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


def mixed_spacing_dataset(root: Path, spacings: list[tuple[float, float, float]], shape=(14, 30, 26)) -> Path:
    """Cases on different grids; the thick axis is the last one so the plan must transpose."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(1)
    for i, spacing in enumerate(spacings):
        image, label = blob_case(shape, rng)
        geometry = Geometry(spacing, (float(i), -3.0, 7.5), IDENTITY)
        write_image(image[0], geometry, root / "imagesTr" / f"c{i}_0000.nii.gz")
        write_image(label, geometry, root / "labelsTr" / f"c{i}.nii.gz")
    description = {
        "channel_names": {"0": "T2"},
        "labels": {"background": 0, "outer": 1, "inner": 2},
        "numTraining": len(spacings),
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(description))
    return root


@pytest.fixture
def preprocessed(tmp_path):
    # z and y at ~1 mm, x at 4 mm on a 26-voxel axis: x is the coarse axis and moves first
    root = mixed_spacing_dataset(
        tmp_path / "Dataset002_Mixed",
        [(1.0, 1.0, 4.0), (1.2, 1.0, 4.0), (0.9, 1.1, 5.0), (1.0, 1.0, 4.0)],
        shape=(40, 36, 8),
    )
    out = tmp_path / "pre"
    assert main(["-q", "plan-and-preprocess", str(root), "--preprocessed", str(out), "--num-workers", "2"]) == 0
    plan = serialization.load(Plan, out / root.name / "plans" / "default.json")
    return root, out / root.name, plan


def test_stored_files_and_transpose(preprocessed):
    _root, folder, plan = preprocessed
    assert plan.transpose_forward == (2, 0, 1) and plan.transpose_backward == (1, 2, 0)
    for name, configuration in plan.configurations.items():
        data_dir = folder / configuration.data_identifier
        assert json.loads((data_dir / "configuration.json").read_text())["spacing_mm"] == list(configuration.spacing_mm)
        for case in ("c0", "c1", "c2", "c3"):
            files = case_files(data_dir, case)
            image = np.load(files["image"], mmap_mode="r")
            label = np.load(files["label"], mmap_mode="r")
            locations = np.load(files["locations"])
            properties = serialization.load(CaseProperties, files["properties"])
            assert image.dtype == np.float32 and image.shape[0] == 1 and image.shape[1:] == label.shape
            assert label.dtype == np.int8 and set(np.unique(label)) <= {-1, 0, 1, 2}
            assert properties.shape_after_resampling == label.shape
            if name == "3d_fullres":
                assert np.allclose(properties.spacing_mm, configuration.spacing_mm)
            assert locations.dtype == np.int32 and locations.shape[1] == 4
            values = label[tuple(locations[:, 1:].T)]
            assert np.array_equal(values, locations[:, 0])
            assert set(locations[:, 0]) == {1, 2}
    assert sorted(p.name for p in (folder / "gt_segmentations").iterdir()) == [f"c{i}.nii.gz" for i in range(4)]


def test_round_trip_to_the_original_geometry(preprocessed):
    root, folder, plan = preprocessed
    spec = load_dataset(root)
    configuration = plan.configuration("3d_fullres")
    for case in spec.training:
        label, geometry = read_image(case.label_file)
        properties = serialization.load(
            CaseProperties, case_files(folder / configuration.data_identifier, case.case_id)["properties"]
        )
        assert properties.geometry.matches(geometry, tolerance=1e-6) == []
        stored = np.load(case_files(folder / configuration.data_identifier, case.case_id)["label"])
        restored = restore_segmentation(np.maximum(stored, 0), properties, plan, configuration)
        assert restored.shape == label.shape
        assert set(np.unique(restored)) == set(np.unique(label))
        for value in (1, 2):
            assert dice(restored == value, label == value) > 0.85, (case.case_id, value)
        one_hot = np.stack([(np.maximum(stored, 0) == k).astype(np.float32) for k in range(3)])
        probabilities = restore_probabilities(one_hot, properties, plan, configuration)
        assert probabilities.shape == (3, *label.shape)
        assert np.allclose(probabilities.sum(0), 1, atol=1e-4)
        assert dice(probabilities.argmax(0) == 2, label == 2) > 0.85


def test_identity_geometry_round_trip_is_exact(tmp_path):
    """Without resampling, preprocessing and its inverse give the label back voxel for voxel."""
    root = mixed_spacing_dataset(tmp_path / "Dataset003_Same", [(1.0, 1.0, 1.0)] * 3)
    out = tmp_path / "pre"
    assert (
        main(
            [
                "-q",
                "plan-and-preprocess",
                str(root),
                "--preprocessed",
                str(out),
                "-c",
                "3d_fullres",
                "--num-workers",
                "1",
            ]
        )
        == 0
    )
    plan = serialization.load(Plan, out / root.name / "plans" / "default.json")
    configuration = plan.configuration("3d_fullres")
    spec = load_dataset(root)
    image, label, geometry = load_case(spec, spec.training[0])
    result = preprocess_case(image, label, geometry, plan, configuration, "c0", seed=0)
    assert result.label is not None
    back = restore_segmentation(np.maximum(result.label, 0), result.properties, plan, configuration)
    assert np.array_equal(back, label)


def test_rerun_skips_finished_cases_and_redoes_incomplete_ones(preprocessed, tmp_path):
    root, folder, plan = preprocessed
    data_dir = folder / plan.configuration("3d_fullres").data_identifier
    before = {p.name: p.stat().st_mtime_ns for p in data_dir.iterdir()}
    (data_dir / "c1_seg.npy").unlink()
    (data_dir / "c2.npy").write_bytes(b"\x93NUMPY garbage")  # an unreadable array counts as unfinished
    (data_dir / ".c3.npy.k1ll3d.npy").write_bytes(b"half")  # a temporary left by a killed worker
    out = folder.parent
    assert (
        main(["-q", "preprocess", str(root), "--preprocessed", str(out), "-c", "3d_fullres", "--num-workers", "1"]) == 0
    )
    after = {p.name: p.stat().st_mtime_ns for p in data_dir.iterdir()}
    assert after["c0.npy"] == before["c0.npy"] and after["c3.json"] == before["c3.json"]
    assert after["c1.json"] != before["c1.json"] and "c1_seg.npy" in after
    assert np.load(data_dir / "c2.npy").dtype == np.float32
    assert not [p for p in data_dir.iterdir() if p.name.startswith(".")]


def test_changed_plan_redoes_the_folder(preprocessed):
    root, folder, plan = preprocessed
    plan_file = folder / "plans" / "default.json"
    data = json.loads(plan_file.read_text())
    data["configurations"]["3d_fullres"]["normalization"] = ["none"]
    plan_file.write_text(json.dumps(data))
    assert (
        main(
            [
                "-q",
                "preprocess",
                str(root),
                "--preprocessed",
                str(folder.parent),
                "-c",
                "3d_fullres",
                "--num-workers",
                "1",
            ]
        )
        == 0
    )
    data_dir = folder / plan.configuration("3d_fullres").data_identifier
    assert json.loads((data_dir / "configuration.json").read_text())["normalization"] == ["none"]
    image = np.load(data_dir / "c0.npy")
    assert image.max() > 50  # raw intensities, no z-score


def test_unknown_configuration_and_missing_plan(make_dataset, tmp_path, capsys):
    root = make_dataset()
    out = str(tmp_path / "pre")
    assert main(["-q", "preprocess", str(root), "--preprocessed", out]) == 2
    assert "no plan yet; run `autoseg plan" in capsys.readouterr().err
    assert main(["-q", "plan", str(root), "--preprocessed", out]) == 2
    assert "no fingerprint yet; run `autoseg fingerprint" in capsys.readouterr().err
    assert main(["-q", "fingerprint", str(root), "--preprocessed", out, "--num-workers", "1"]) == 0
    assert main(["-q", "plan", str(root), "--preprocessed", out]) == 0
    assert main(["-q", "preprocess", str(root), "--preprocessed", out, "-c", "3d_highres"]) == 2
    assert "has no configuration '3d_highres'" in capsys.readouterr().err
    assert not (tmp_path / "pre" / root.name / "default_3d_highres").exists()


def test_no_worker_leaves_temporary_files(preprocessed):
    _, folder, _ = preprocessed
    assert not [p for p in folder.rglob(".*") if p.is_file()]
    assert all(os.access(p, os.R_OK) for p in folder.rglob("*"))


def test_two_dimensional_images_get_only_a_2d_configuration(tmp_path):
    """2D files (as SimpleITK reads .mha slices) run through the 3D code as one-slice volumes."""
    import SimpleITK as sitk

    root = tmp_path / "Dataset005_Flat"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        image = np.zeros((60, 50), np.float32)
        image[10:50, 8:44] = rng.normal(100, 5, (40, 36))
        label = np.zeros((60, 50), np.uint8)
        label[20:35, 15:30] = 1
        for array, folder, name in ((image, "imagesTr", f"c{i}_0000"), (label, "labelsTr", f"c{i}")):
            itk = sitk.GetImageFromArray(array)
            itk.SetSpacing((0.5, 0.7))
            sitk.WriteImage(itk, str(root / folder / f"{name}.mha"))
    description = {
        "channel_names": {"0": "MRI"},
        "labels": {"background": 0, "spot": 1},
        "numTraining": 3,
        "file_ending": ".mha",
    }
    (root / "dataset.json").write_text(json.dumps(description))
    out = tmp_path / "pre"
    assert main(["-q", "plan-and-preprocess", str(root), "--preprocessed", str(out), "--num-workers", "1"]) == 0
    plan = serialization.load(Plan, out / root.name / "plans" / "default.json")
    assert list(plan.configurations) == ["2d"]
    assert plan.configuration("2d").spacing_mm == (0.7, 0.5)
    folder = out / root.name / "default_2d"
    stored = np.load(folder / "c0_seg.npy")
    properties = serialization.load(CaseProperties, folder / "c0.json")
    back = restore_segmentation(np.maximum(stored, 0), properties, plan, plan.configuration("2d"))
    write_image(back, properties.geometry, tmp_path / "c0_back.mha")
    written = sitk.ReadImage(str(tmp_path / "c0_back.mha"))
    assert written.GetDimension() == 2 and written.GetSpacing() == (0.5, 0.7)
    original = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "labelsTr" / "c0.mha")))
    assert np.array_equal(sitk.GetArrayFromImage(written), original)


def test_msd_multimodal_4d_case(tmp_path):
    """An MSD case keeps its modalities in one 4D file; each becomes a channel."""
    import SimpleITK as sitk

    root = tmp_path / "Task01_Brain"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    training = []
    for i in range(3):
        image, label = blob_case((12, 20, 18), rng, channels=2)
        channels = [sitk.GetImageFromArray(c) for c in image]
        for c in channels:
            c.SetSpacing((1.0, 1.0, 2.0))
        sitk.WriteImage(sitk.JoinSeries(channels), str(root / "imagesTr" / f"b{i}.nii.gz"))
        write_image(label, Geometry((2.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY), root / "labelsTr" / f"b{i}.nii.gz")
        training.append({"image": f"./imagesTr/b{i}.nii.gz", "label": f"./labelsTr/b{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({
        "modality": {"0": "FLAIR", "1": "T1w"}, "labels": {"0": "background", "1": "edema", "2": "tumour"},
        "numTraining": 3, "training": training, "test": [],
    }))  # fmt: skip
    out = tmp_path / "pre"
    assert main(["-q", "check", str(root), "--num-workers", "1"]) == 0
    assert main(["-q", "plan-and-preprocess", str(root), "--preprocessed", str(out), "--num-workers", "1",
                 "-c", "3d_fullres"]) == 0  # fmt: skip
    stored = np.load(out / root.name / "default_3d_fullres" / "b0.npy")
    assert stored.shape[0] == 2
    fingerprint = json.loads((out / root.name / "fingerprint.json").read_text())
    assert fingerprint["channel_names"] == ["FLAIR", "T1w"]
    assert len(fingerprint["foreground_intensity_per_channel"]) == 2
