"""Metrics on hand-made masks, a brute-force check of the surface distances, and evaluate_folder end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from autoseg.errors import AutosegError
from autoseg.evaluation import case_metrics, evaluate_folder
from autoseg.evaluation.metrics import (
    confusion,
    dice,
    hausdorff95,
    iou,
    normalized_surface_dice,
    surface_distances,
)
from autoseg.io import Geometry, write_segmentation

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _box(shape: tuple[int, ...], *ranges: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[tuple(slice(a, b) for a, b in ranges)] = True
    return mask


def test_confusion_dice_iou_of_a_shifted_cube() -> None:
    ref = _box((20, 20, 20), (4, 12), (4, 12), (4, 12)).astype(np.uint8)
    pred = _box((20, 20, 20), (4, 12), (4, 12), (6, 14)).astype(np.uint8)
    tp, fp, fn, tn = confusion(pred, ref, 1)
    # an 8-voxel cube moved 2 voxels along x keeps 8 * 8 * 6 voxels in common
    assert (tp, fp, fn) == (8 * 8 * 6, 8 * 8 * 2, 8 * 8 * 2)
    assert tn == 20**3 - tp - fp - fn
    assert dice(tp, fp, fn) == pytest.approx(2 * 384 / (2 * 384 + 128 + 128))
    assert iou(tp, fp, fn) == pytest.approx(384 / 640)
    assert confusion(pred, ref, 0) == (tn, fn, fp, tp)


def test_hausdorff_and_nsd_of_two_single_voxels_with_anisotropic_spacing() -> None:
    spacing = (2.5, 0.8, 1.0)
    ref = _box((8, 8, 8), (3, 4), (3, 4), (3, 4))
    pred = _box((8, 8, 8), (4, 5), (5, 6), (3, 4))
    distance = math.sqrt((1 * 2.5) ** 2 + (2 * 0.8) ** 2)
    assert hausdorff95(pred, ref, spacing) == pytest.approx(distance)
    assert normalized_surface_dice(pred, ref, spacing, tolerance_mm=distance - 0.01) == 0.0
    assert normalized_surface_dice(pred, ref, spacing, tolerance_mm=distance + 0.01) == 1.0


def test_hausdorff_and_nsd_of_two_offset_plates() -> None:
    # one-voxel-thick plates, every voxel on the surface: the reference at z = 4, x in 4..7; the prediction one
    # slice (2 mm) higher, x in 6..9. Per y column the distances are 2 mm where x overlaps, then sqrt(4 + 1)
    # and sqrt(4 + 4) for the voxels one and two columns past the other plate's edge; the same both ways.
    spacing = (2.0, 1.0, 1.0)
    ref = _box((10, 12, 14), (4, 5), (4, 8), (4, 8))
    pred = _box((10, 12, 14), (5, 6), (4, 8), (6, 10))
    one_way = [2.0] * 8 + [math.sqrt(5)] * 4 + [math.sqrt(8)] * 4
    pred_to_ref, ref_to_pred = surface_distances(pred, ref, spacing)
    assert sorted(pred_to_ref) == pytest.approx(sorted(one_way))
    assert sorted(ref_to_pred) == pytest.approx(sorted(one_way))
    assert hausdorff95(pred, ref, spacing) == pytest.approx(float(np.percentile(one_way + one_way, 95)))
    # tolerance 2.5 mm: only the 2 mm and sqrt(5) mm distances count, 12 of 16 on either side
    assert normalized_surface_dice(pred, ref, spacing, tolerance_mm=2.5) == pytest.approx(24 / 32)
    assert normalized_surface_dice(pred, ref, spacing, tolerance_mm=1.9) == 0.0


def test_nsd_and_hausdorff_of_identical_masks() -> None:
    mask = _box((12, 12, 12), (2, 9), (3, 8), (1, 11))
    assert normalized_surface_dice(mask, mask, (3.0, 0.5, 0.5), tolerance_mm=0.1) == 1.0
    assert hausdorff95(mask, mask, (3.0, 0.5, 0.5)) == 0.0


def test_hausdorff_of_concentric_spheres_is_their_radius_difference() -> None:
    spacing = (2.0, 1.0, 1.0)
    shape = (20, 40, 40)
    z, y, x = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)], indexing="ij")
    radius = np.sqrt(z**2 + y**2 + x**2)
    inner, outer = radius <= 8.0, radius <= 12.0
    # 4 mm apart; surface voxels sit up to about half a voxel off the ideal spheres
    assert hausdorff95(outer, inner, spacing) == pytest.approx(4.0, abs=1.0)
    assert normalized_surface_dice(outer, inner, spacing, tolerance_mm=1.0) < 0.1
    assert normalized_surface_dice(outer, inner, spacing, tolerance_mm=6.0) == 1.0


def _brute_force_surface(mask: np.ndarray) -> np.ndarray:
    """Voxels with a 6-neighbour outside the mask, the outside of the array counting as outside."""
    padded = np.pad(mask, 1)
    surface = np.zeros_like(mask)
    for axis in range(3):
        for step in (-1, 1):
            neighbour = np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
            surface |= mask & ~neighbour
    return surface


def test_surface_distances_agree_with_brute_force_on_random_blobs() -> None:
    rng = np.random.default_rng(0)
    spacing = (2.5, 0.9, 1.2)
    for _ in range(3):
        pred = rng.random((9, 11, 10)) < 0.35
        ref = rng.random((9, 11, 10)) < 0.35
        pred_points = np.argwhere(_brute_force_surface(pred)) * spacing
        ref_points = np.argwhere(_brute_force_surface(ref)) * spacing
        pairwise = cdist(pred_points, ref_points)
        pred_to_ref, ref_to_pred = pairwise.min(axis=1), pairwise.min(axis=0)
        pooled = np.concatenate([pred_to_ref, ref_to_pred])
        assert hausdorff95(pred, ref, spacing) == pytest.approx(float(np.percentile(pooled, 95)), rel=1e-9)
        # 1.7 mm: no voxel offset lies exactly there (1.5 mm would: 0.9 and 1.2 make a 3-4-5 triangle)
        expected_nsd = float(np.mean(pooled <= 1.7))
        assert normalized_surface_dice(pred, ref, spacing, tolerance_mm=1.7) == pytest.approx(expected_nsd)


def test_a_2d_image_has_an_outline_as_its_surface() -> None:
    # stored as one slice with nnU-Net's fake slice spacing; the 999 mm must not matter
    ref = _box((1, 10, 10), (0, 1), (3, 7), (3, 7))
    pred = _box((1, 10, 10), (0, 1), (2, 8), (2, 8))
    # outlines: the grown square's 20 pixels lie 1 mm from the other (its 4 corners sqrt(2) mm), the small
    # square's 12 pixels all 1 mm away
    pred_to_ref, ref_to_pred = surface_distances(pred, ref, (999.0, 1.0, 1.0))
    assert sorted(pred_to_ref) == pytest.approx([1.0] * 16 + [math.sqrt(2)] * 4)
    assert sorted(ref_to_pred) == pytest.approx([1.0] * 12)
    expected = float(np.percentile([1.0] * 16 + [math.sqrt(2)] * 4 + [1.0] * 12, 95))
    assert hausdorff95(pred, ref, (999.0, 1.0, 1.0)) == pytest.approx(expected)


def test_empty_masks() -> None:
    empty = np.zeros((6, 6, 6), bool)
    blob = _box((6, 6, 6), (1, 3), (1, 3), (1, 3))
    assert math.isnan(dice(0, 0, 0)) and math.isnan(iou(0, 0, 0))
    assert math.isnan(hausdorff95(empty, empty, (1.0, 1.0, 1.0)))
    assert math.isnan(normalized_surface_dice(empty, empty, (1.0, 1.0, 1.0), 1.0))
    assert hausdorff95(blob, empty, (1.0, 1.0, 1.0)) == math.inf
    assert hausdorff95(empty, blob, (1.0, 1.0, 1.0)) == math.inf
    assert normalized_surface_dice(empty, blob, (1.0, 1.0, 1.0), 1.0) == 0.0
    assert dice(*confusion(blob.astype(int), empty.astype(int), 1)[:3]) == 0.0


def test_case_metrics_reports_every_metric_per_label() -> None:
    ref = np.zeros((10, 10, 10), np.uint8)
    ref[2:6, 2:6, 2:6] = 1
    pred = ref.copy()
    pred[2:6, 2:6, 6] = 2  # a false-positive slab of label 2, which the reference lacks
    spacing = (2.0, 0.5, 1.0)
    metrics = case_metrics(pred, ref, [0, 1, 2], spacing, tolerance_mm=1.0)
    assert set(metrics) == {0, 1, 2}
    one = metrics[1]
    assert (one["TP"], one["FP"], one["FN"], one["TN"]) == (64, 0, 0, 1000 - 64)
    assert one["Dice"] == one["IoU"] == one["NSD"] == 1.0
    assert one["HD95_mm"] == 0.0
    assert one["volume_pred_mm3"] == one["volume_ref_mm3"] == 64 * 2.0 * 0.5 * 1.0
    two = metrics[2]
    assert (two["n_pred"], two["n_ref"], two["Dice"], two["NSD"]) == (16, 0, 0.0, 0.0)
    assert two["HD95_mm"] == math.inf
    assert math.isnan(metrics[0]["HD95_mm"]) and metrics[0]["Dice"] == pytest.approx(2 * 920 / (2 * 920 + 16))


GEOMETRY = Geometry((2.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY)
SHAPE = (12, 12, 12)


def _label_map(*boxes: tuple[int, tuple[tuple[int, int], ...]]) -> np.ndarray:
    seg = np.zeros(SHAPE, np.uint8)
    for value, ranges in boxes:
        seg[tuple(slice(a, b) for a, b in ranges)] = value
    return seg


CUBE_1 = ((2, 6), (2, 6), (2, 6))
CUBE_1_SHIFTED = ((2, 6), (2, 6), (3, 7))
CUBE_2 = ((7, 10), (7, 10), (7, 10))


def _write_folders(root: Path, with_dataset_json: bool = True) -> tuple[Path, Path]:
    gt_dir, pred_dir = root / "dataset" / "labelsTr", root / "predictions"
    cases = {
        # (reference, prediction)
        "case_a": (_label_map((1, CUBE_1), (2, CUBE_2)), _label_map((1, CUBE_1), (2, CUBE_2))),
        "case_b": (_label_map((1, CUBE_1)), _label_map((1, CUBE_1_SHIFTED))),
        "case_c": (_label_map((1, CUBE_1), (2, CUBE_2)), _label_map((1, CUBE_1))),
    }
    for case_id, (ref, pred) in cases.items():
        write_segmentation(ref, GEOMETRY, gt_dir / f"{case_id}.nii.gz")
        write_segmentation(pred, GEOMETRY, pred_dir / f"{case_id}.nii.gz")
    if with_dataset_json:
        description = {"labels": {"background": 0, "outer": 1, "inner": 2}, "file_ending": ".nii.gz"}
        (root / "dataset" / "dataset.json").write_text(json.dumps(description))
    return gt_dir, pred_dir


def _strict_json(path: Path) -> dict:
    def refuse(constant: str) -> None:
        raise ValueError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_evaluate_folder_writes_summary_with_means_that_skip_nan(tmp_path: Path) -> None:
    gt_dir, pred_dir = _write_folders(tmp_path)
    summary = evaluate_folder(pred_dir, gt_dir, num_workers=2, show_progress=False)
    written = _strict_json(pred_dir / "summary.json")
    assert written == summary
    assert summary["labels"] == {"background": 0, "outer": 1, "inner": 2}
    assert [case["case"] for case in summary["metric_per_case"]] == ["case_a", "case_b", "case_c"]

    # label 1: Dice 1, then a 4-voxel cube moved by one voxel (48 shared of 64), then 1 again
    dice_1 = (1.0 + 2 * 48 / (2 * 48 + 16 + 16) + 1.0) / 3
    # label 2: Dice 1, absent from both in case_b (NaN, skipped), missed entirely in case_c
    dice_2 = (1.0 + 0.0) / 2
    assert summary["metric_per_case"][1]["metrics"]["2"]["Dice"] is None
    assert summary["mean"]["1"]["Dice"] == pytest.approx(dice_1)
    assert summary["mean"]["2"]["Dice"] == pytest.approx(dice_2)
    assert summary["foreground_mean"]["Dice"] == pytest.approx((dice_1 + dice_2) / 2)
    assert summary["mean"]["1"]["TP"] == pytest.approx((64 + 48 + 64) / 3)
    # the missed structure's HD95 is infinite, so its mean has no finite value
    assert summary["metric_per_case"][2]["metrics"]["2"]["HD95_mm"] is None
    assert summary["mean"]["2"]["HD95_mm"] is None
    assert summary["mean"]["1"]["HD95_mm"] is not None
    assert summary["mean"]["0"]["HD95_mm"] is None


def test_evaluate_folder_without_dataset_json_uses_the_values_found(tmp_path: Path) -> None:
    gt_dir, pred_dir = _write_folders(tmp_path, with_dataset_json=False)
    output = tmp_path / "elsewhere" / "scores.json"
    summary = evaluate_folder(pred_dir, gt_dir, output_file=output, num_workers=1, show_progress=False)
    assert summary["labels"] == {"0": 0, "1": 1, "2": 2}
    assert output.is_file() and not (pred_dir / "summary.json").exists()

    only_one = evaluate_folder(pred_dir, gt_dir, labels={"outer": 1}, num_workers=1, show_progress=False)
    assert set(only_one["mean"]) == {"1"}
    assert only_one["foreground_mean"]["Dice"] == pytest.approx(only_one["mean"]["1"]["Dice"])


def test_missing_prediction_is_named(tmp_path: Path) -> None:
    gt_dir, pred_dir = _write_folders(tmp_path)
    (pred_dir / "case_b.nii.gz").unlink()
    with pytest.raises(AutosegError, match=r"predictions.*case_b"):
        evaluate_folder(pred_dir, gt_dir, num_workers=1, show_progress=False)


def test_mismatched_geometry_and_shape_are_refused(tmp_path: Path) -> None:
    gt_dir, pred_dir = _write_folders(tmp_path)
    moved = Geometry((2.0, 1.0, 1.0), (5.0, 0.0, 0.0), IDENTITY)
    write_segmentation(_label_map((1, CUBE_1)), moved, pred_dir / "case_a.nii.gz")
    with pytest.raises(AutosegError, match=r"case_a.*origin"):
        evaluate_folder(pred_dir, gt_dir, num_workers=1, show_progress=False)
    write_segmentation(np.zeros((12, 12, 11), np.uint8), GEOMETRY, pred_dir / "case_a.nii.gz")
    with pytest.raises(AutosegError, match=r"case_a.*shape"):
        evaluate_folder(pred_dir, gt_dir, num_workers=1, show_progress=False)


def test_file_ending_defaults_to_the_most_common_one(tmp_path: Path) -> None:
    gt_dir, pred_dir = _write_folders(tmp_path)
    write_segmentation(_label_map((1, CUBE_1)), GEOMETRY, gt_dir / "stray.nrrd")
    summary = evaluate_folder(pred_dir, gt_dir, num_workers=1, show_progress=False)
    assert summary["file_ending"] == ".nii.gz" and len(summary["metric_per_case"]) == 3
    with pytest.raises(AutosegError, match="stray"):
        evaluate_folder(pred_dir, gt_dir, file_ending=".nrrd", num_workers=1, show_progress=False)
    with pytest.raises(AutosegError, match="not supported"):
        evaluate_folder(pred_dir, gt_dir, file_ending=".png", num_workers=1, show_progress=False)


def test_evaluate_folder_on_a_subset_of_cases(tmp_path: Path) -> None:
    from autoseg.errors import AutosegError
    from autoseg.evaluation.evaluate import evaluate_folder
    from autoseg.io import Geometry, write_image

    geometry = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    cube = np.zeros((8, 8, 8), np.uint8)
    cube[2:6, 2:6, 2:6] = 1
    for case in ("a", "b", "c"):
        write_image(cube, geometry, gt / f"{case}.nii.gz")
    write_image(cube, geometry, pred / "b.nii.gz")  # only the held-out case is predicted
    summary = evaluate_folder(pred, gt, labels={"background": 0, "cube": 1}, case_ids=["b"], show_progress=False)
    assert [c["case"] for c in summary["metric_per_case"]] == ["b"]
    assert summary["foreground_mean"]["Dice"] == 1.0
    with pytest.raises(AutosegError, match="no reference for zz"):
        evaluate_folder(pred, gt, labels={"background": 0, "cube": 1}, case_ids=["zz"], show_progress=False)
