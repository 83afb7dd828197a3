"""find-best, ensembles and postprocessing on hand-made predictions whose Dice is known by construction."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from autoseg import serialization
from autoseg.data.splits import kfold_splits
from autoseg.errors import AutosegError
from autoseg.evaluation.best import BestChoice, ModelRef, Postprocessing, candidate_name, load_best
from autoseg.evaluation.ensemble import ensemble_folders
from autoseg.evaluation.evaluate import evaluate_folder
from autoseg.evaluation.find_best import TIE_TOLERANCE, CandidateResult, choose_winner, find_best
from autoseg.evaluation.postprocessing import (
    DiceScores,
    apply_postprocessing,
    choose_postprocessing,
    keep_largest_component,
    postprocess_folder,
)
from autoseg.inference.export import ProbabilitiesInfo, load_probabilities
from autoseg.io import Geometry, read_image, write_image, write_segmentation

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
GEOMETRY = Geometry((2.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY)
LABELS = {"background": 0, "left": 1, "right": 2}
SHAPE = (10, 16, 16)
ENDING = ".nii.gz"
N_CASES = 6
N_FOLDS = 3
NO_RIGHT_CASE = "case05"  # its reference has no label 2: Dice of label 2 is skipped there (both empty)
STRAY_CASE = "case00"  # predictions of this case carry a stray label-1 cube far from everything

# The reference: a 4x5x5 "left" box (label 1) touching a 4x4x5 "right" box (label 2) face to face.
LEFT = (slice(2, 6), slice(3, 8), slice(3, 8))
RIGHT = (slice(2, 6), slice(8, 12), slice(3, 8))
LEFT_KEPT_BY_B = (slice(2, 6), slice(3, 8), slice(3, 6))  # 60 of the 100 left voxels
STRAY = (slice(7, 9), slice(13, 15), slice(12, 14))  # 8 voxels, no voxel touching the boxes


def _reference(case_id: str) -> np.ndarray:
    ref = np.zeros(SHAPE, np.uint8)
    ref[LEFT] = 1
    if case_id != NO_RIGHT_CASE:
        ref[RIGHT] = 2
    return ref


def _one_hot(ref: np.ndarray) -> np.ndarray:
    return np.stack([(ref == v).astype(np.float32) for v in sorted(LABELS.values())])


def _add_stray(probabilities: np.ndarray, case_id: str) -> np.ndarray:
    if case_id == STRAY_CASE:
        probabilities[(slice(None), *STRAY)] = np.array([0.0, 1.0, 0.0])[:, None, None, None]
    return probabilities


def model_a(case_id: str) -> np.ndarray:
    """Perfect "left"; the "right" box leans to background (0.6) and is lost: Dice 0 there."""
    p = _one_hot(_reference(case_id))
    right = _reference(case_id) == 2
    p[0][right], p[2][right] = 0.6, 0.4
    return _add_stray(p, case_id)


def model_b(case_id: str) -> np.ndarray:
    """Perfect "right"; 40 of the 100 "left" voxels lean to background (0.6): Dice 2·60/160 = 0.75 there."""
    p = _one_hot(_reference(case_id))
    lost = (_reference(case_id) == 1) & ~_mask(LEFT_KEPT_BY_B)
    p[0][lost], p[1][lost] = 0.6, 0.4
    return _add_stray(p, case_id)


def _mask(box: tuple[slice, ...]) -> np.ndarray:
    mask = np.zeros(SHAPE, bool)
    mask[box] = True
    return mask


def _write_probabilities(probabilities: np.ndarray, npz: Path, case_id: str, labels: dict[str, int]) -> None:
    """The format of autoseg.inference.export (written by hand, so the test does not trust our writer)."""
    npz.parent.mkdir(parents=True, exist_ok=True)
    stored = probabilities.astype(np.float16)
    np.savez_compressed(npz, probabilities=stored)
    info = ProbabilitiesInfo(
        ProbabilitiesInfo.SCHEMA_VERSION,
        case_id,
        "3d_fullres",
        labels,
        tuple(sorted(labels.values())),
        GEOMETRY,
        tuple(stored.shape),
        str(stored.dtype),
    )
    serialization.save(info, npz.with_name(f"{case_id}_probabilities.json"))


class Layout:
    """A preprocessed folder (gt_segmentations, splits.json) and a results folder built by hand."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.case_ids = [f"case{i:02d}" for i in range(N_CASES)]
        self.gt_dir = root / "pre" / "gt_segmentations"
        self.splits_file = root / "pre" / "splits.json"
        self.results = root / "results" / "Dataset001_Test"
        self.images_dir = root / "imagesTr"
        self.splits = kfold_splits(self.case_ids, N_FOLDS)
        self.splits_file.parent.mkdir(parents=True)
        self.splits_file.write_text(json.dumps(self.splits))
        rng = np.random.default_rng(0)
        for case_id in self.case_ids:
            write_segmentation(_reference(case_id), GEOMETRY, self.gt_dir / f"{case_id}{ENDING}")
            image = rng.normal(100, 10, SHAPE).astype(np.float32) + 50 * _reference(case_id)
            write_image(image, GEOMETRY, self.images_dir / f"{case_id}_0000{ENDING}")

    def add_model(
        self,
        trainer: str,
        probabilities_of: Callable[[str], np.ndarray],
        save_probabilities: bool = True,
        folds: tuple[int, ...] = tuple(range(N_FOLDS)),
    ) -> ModelRef:
        model = ModelRef(trainer, "default", "3d_fullres")
        for k in folds:
            fold_dir = self.results / model.folder / f"fold_{k}"
            (fold_dir / "validation").mkdir(parents=True)
            (fold_dir / "checkpoint_final.pt").write_bytes(b"")
            val = self.splits[k]["val"]
            (fold_dir / "run.json").write_text(json.dumps({"status": "finished", "val_cases": val}))
            for case_id in val:
                p = probabilities_of(case_id)
                seg = p.argmax(axis=0).astype(np.uint8)
                write_segmentation(seg, GEOMETRY, fold_dir / "validation" / f"{case_id}{ENDING}")
                if save_probabilities:
                    _write_probabilities(p, fold_dir / "validation" / f"{case_id}.npz", case_id, LABELS)
        return model

    def find_best(self, **kwargs: object) -> BestChoice:
        return find_best(
            self.results,
            self.gt_dir,
            self.splits_file,
            LABELS,
            ENDING,
            ("T1",),
            "Dataset001_Test",
            num_workers=1,
            show_progress=False,
            **kwargs,  # type: ignore[arg-type]
        )


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(tmp_path)


def _dice(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn)


def test_the_ensemble_of_two_complementary_models_wins_and_its_stray_cube_is_removed(layout: Layout) -> None:
    a = layout.add_model("a", model_a)
    b = layout.add_model("b", model_b)
    c = layout.add_model("c", model_a, save_probabilities=False)  # A's twin without probabilities
    best = layout.find_best(images_dir=layout.images_dir)

    assert best.members == (a, b)
    stray_left = _dice(100, 8, 0)  # the stray cube costs "left" some Dice in one case
    assert best.cross_validation_dice == pytest.approx(((stray_left + 5) / 6 + 1.0) / 2)
    assert best.postprocessing == Postprocessing(largest_component_foreground=True)
    assert best.postprocessed_dice == pytest.approx(1.0)
    assert (best.cases_scored, best.cases_total, best.folds) == (N_CASES, N_CASES, (0, 1, 2))

    scores = {candidate.name: candidate for candidate in best.candidates}
    assert set(scores) == {a.folder, b.folder, c.folder, candidate_name([a, b])}  # c cannot join ensembles
    a_left = (stray_left + 5) / 6
    assert scores[a.folder].dice_per_label["1"] == pytest.approx(a_left)
    assert scores[a.folder].dice_per_label["2"] == pytest.approx(0.0)  # 5 cases of 0, case05 skipped
    assert scores[a.folder].foreground_mean_dice == pytest.approx(a_left / 2)
    assert scores[c.folder].foreground_mean_dice == pytest.approx(a_left / 2)
    b_left = (_dice(60, 8, 40) + 5 * 0.75) / 6
    assert scores[b.folder].dice_per_label["1"] == pytest.approx(b_left)
    assert scores[b.folder].foreground_mean_dice == pytest.approx((b_left + 1.0) / 2)
    assert best.candidates[0].members == (a, b)  # best first

    assert load_best(layout.results) == best
    crossval = layout.results / "crossval" / candidate_name([a, b])
    for case_id in layout.case_ids:
        raw, _ = read_image(crossval / f"{case_id}{ENDING}")
        final, geometry = read_image(crossval / "postprocessed" / f"{case_id}{ENDING}")
        assert np.array_equal(final, _reference(case_id))
        assert raw[STRAY].all() == (case_id == STRAY_CASE)
        assert not geometry.matches(GEOMETRY)

    report = (layout.results / "report.md").read_text()
    assert f"**{candidate_name([a, b])}**" in report and "cannot join ensembles" in report
    assert "Chosen: keep the largest foreground component." in report
    assert len(list((layout.results / "report").glob("*.png"))) == 6  # 3 best, 3 worst


def test_scores_equal_evaluate_folder(layout: Layout, tmp_path: Path) -> None:
    layout.add_model("a", model_a)
    b = layout.add_model("b", model_b)
    best = layout.find_best()
    gathered = tmp_path / "b_all_folds"
    gathered.mkdir()
    for k in range(N_FOLDS):
        for f in (layout.results / b.folder / f"fold_{k}" / "validation").glob(f"*{ENDING}"):
            shutil.copy(f, gathered / f.name)
    summary = evaluate_folder(gathered, layout.gt_dir, LABELS, ENDING, num_workers=1, show_progress=False)
    ours = next(c for c in best.candidates if c.members == (b,))
    assert ours.foreground_mean_dice == pytest.approx(summary["foreground_mean"]["Dice"], abs=1e-12)
    for value in ("0", "1", "2"):
        assert ours.dice_per_label[value] == pytest.approx(summary["mean"][value]["Dice"], abs=1e-12)


def _two_regions_wrong(wrong: tuple[str, str]) -> Callable[[str], np.ndarray]:
    """Confident everywhere except two of three regions, where the wrong class gets 0.55: a pair of such
    models always shares a wrong region, all three together outvote every mistake."""
    regions = {"left": LEFT, "right": RIGHT, "corner": STRAY}
    wrong_class = {"left": 0, "right": 0, "corner": 1}

    def probabilities(case_id: str) -> np.ndarray:
        ref = _reference(case_id)
        ref[STRAY] = 0
        p = _one_hot(ref)
        for region in wrong:
            mask = _mask(regions[region]) & ((ref != 0) if region != "corner" else True)
            right_class = int(ref[regions[region]].max())
            p[:, mask] = 0.0
            p[wrong_class[region]][mask] = 0.55
            p[right_class][mask] += 0.45
        return p

    return probabilities


def test_greedy_selection_grows_to_three_members_when_only_all_three_are_right(layout: Layout) -> None:
    x = layout.add_model("x", _two_regions_wrong(("left", "right")))
    y = layout.add_model("y", _two_regions_wrong(("right", "corner")))
    z = layout.add_model("z", _two_regions_wrong(("left", "corner")))
    best = layout.find_best()
    assert best.members == (x, y, z)
    assert best.cross_validation_dice == pytest.approx(1.0)
    sizes = sorted(len(c.members) for c in best.candidates)
    assert sizes == [1, 1, 1, 2, 2, 2, 3]
    assert all(c.foreground_mean_dice < 1.0 for c in best.candidates if len(c.members) < 3)


def test_a_tie_goes_to_the_smaller_ensemble(layout: Layout) -> None:
    a = layout.add_model("a", model_a)
    b = layout.add_model("b", model_b)
    d = layout.add_model("d", model_a)  # A's twin: a+b+d, a+b and b+d predict the same
    best = layout.find_best()
    scores = {c.members: c.foreground_mean_dice for c in best.candidates}
    assert scores[(a, b, d)] == pytest.approx(scores[(a, b)])  # the greedy step was tried, and did not improve
    assert best.members == (a, b)


def _result(name: str, members: int, dice: float) -> CandidateResult:
    refs = tuple(ModelRef(f"{name}{i}", "p", "c") for i in range(members))
    return CandidateResult(refs, np.zeros((1, 2)), DiceScores({0: 1.0, 1: dice}, dice))


def test_choose_winner_tolerance() -> None:
    single, pair = _result("s", 1, 0.8), _result("e", 2, 0.8 + TIE_TOLERANCE / 2)
    assert choose_winner([pair, single]) is single
    better_pair = _result("e", 2, 0.8 + 3 * TIE_TOLERANCE)
    assert choose_winner([single, better_pair]) is better_pair


def test_only_fold_0_trained_is_scored_and_reported(layout: Layout) -> None:
    layout.add_model("a", model_a, folds=(0,))
    layout.add_model("b", model_b)  # folds 1 and 2 unused: a lacks them
    best = layout.find_best()
    assert best.folds == (0,)
    assert (best.cases_scored, best.cases_total) == (len(layout.splits[0]["val"]), N_CASES)
    report = (layout.results / "report.md").read_text()
    assert "Only 2 of the 6 training cases" in report and "not used" in report


def test_a_missing_prediction_names_the_case_and_the_fold(layout: Layout) -> None:
    a = layout.add_model("a", model_a)
    case_id = layout.splits[1]["val"][0]
    (layout.results / a.folder / "fold_1" / "validation" / f"{case_id}{ENDING}").unlink()
    with pytest.raises(AutosegError, match=rf"no prediction for 1 of the 2 cases that fold 1 holds out \({case_id}\)"):
        layout.find_best()


def test_a_case_predicted_by_two_folds_is_an_error_naming_both(layout: Layout) -> None:
    a = layout.add_model("a", model_a)
    case_id = layout.splits[2]["val"][0]
    validation = layout.results / a.folder / "fold_{}" / "validation"
    source = Path(str(validation).format(2)) / f"{case_id}{ENDING}"
    shutil.copy(source, Path(str(validation).format(0)) / source.name)
    with pytest.raises(AutosegError, match=rf"case {case_id} is predicted by two folds .*fold 0.*fold 2"):
        layout.find_best()


def test_changed_splits_are_caught(layout: Layout) -> None:
    layout.add_model("a", model_a)
    splits = json.loads(layout.splits_file.read_text())
    moved = splits[0]["val"].pop()
    splits[1]["val"].append(moved)
    splits[1]["train"].remove(moved)
    splits[0]["train"].append(moved)
    layout.splits_file.write_text(json.dumps(splits))
    with pytest.raises(AutosegError, match="splits changed after training"):
        layout.find_best()


# Postprocessing -------------------------------------------------------------------------------------------


def test_keep_largest_component_uses_full_connectivity_and_keeps_ties() -> None:
    mask = np.zeros((5, 5, 5), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True  # touching by a corner: one component, as in nnU-Net v2
    mask[4, 4, 0] = True
    kept = keep_largest_component(mask)
    assert kept[1, 1, 1] and kept[2, 2, 2] and not kept[4, 4, 0]
    ties = np.zeros((6, 6), bool)
    ties[0, 0] = ties[5, 5] = True
    assert np.array_equal(keep_largest_component(ties), ties)


def test_keep_largest_component_matches_nnunet() -> None:
    pytest.importorskip("nnunetv2")
    from nnunetv2.postprocessing.remove_connected_components import (
        remove_all_but_largest_component_from_segmentation,
    )

    rng = np.random.default_rng(3)
    seg = (rng.random((12, 14, 13)) > 0.8).astype(np.uint8) * rng.integers(1, 3, (12, 14, 13)).astype(np.uint8)
    for rules, nnunet_labels in ((Postprocessing(True), [1, 2]), (Postprocessing(False, (2,)), 2)):
        ours = apply_postprocessing(seg, rules, [1, 2])
        assert np.array_equal(ours, remove_all_but_largest_component_from_segmentation(seg, nnunet_labels))


def test_apply_postprocessing_removes_to_background_and_leaves_the_input_alone() -> None:
    seg = np.zeros(SHAPE, np.uint8)
    seg[LEFT], seg[RIGHT], seg[STRAY] = 1, 2, 2
    original = seg.copy()
    out = apply_postprocessing(seg, Postprocessing(True), [1, 2])
    assert np.array_equal(seg, original)
    expected = original.copy()
    expected[STRAY] = 0
    assert np.array_equal(out, expected)
    with pytest.raises(AutosegError, match=r"label\(s\) \[3\]"):
        apply_postprocessing(seg, Postprocessing(False, (3,)), [1, 2])


def test_a_stray_blob_is_removed() -> None:
    ref = _reference("case00")
    pred = ref.copy()
    pred[STRAY] = 1
    rules, before, after = choose_postprocessing([pred, ref], [ref, ref], [1, 2])
    assert rules == Postprocessing(largest_component_foreground=True)
    assert before.per_label[1] == pytest.approx((_dice(100, 8, 0) + 1) / 2)
    assert after.per_label == {1: 1.0, 2: 1.0} and after.foreground_mean == 1.0


def test_the_foreground_rule_is_rejected_when_a_label_gets_worse_and_the_label_rule_kept_where_it_helps() -> None:
    ref = _reference("case00")
    ref[9, 0, 0] = 2  # a one-voxel island of "right", far from the rest, predicted correctly
    pred = ref.copy()
    pred[STRAY] = 1
    pred[7:10, 12:15, 12:15] = 1  # a 27-voxel stray "left" cube (it covers STRAY)
    rules, before, after = choose_postprocessing([pred, ref], [ref, ref], [1, 2])
    # keeping the largest foreground component helps "left" a lot but costs "right" its island: rejected
    assert rules == Postprocessing(largest_component_foreground=False, largest_component_labels=(1,))
    assert before.per_label == {1: pytest.approx((_dice(100, 27, 0) + 1) / 2), 2: 1.0}
    assert after.per_label == {1: 1.0, 2: 1.0}


def test_postprocessing_that_only_hurts_is_rejected() -> None:
    ref = np.zeros(SHAPE, np.uint8)
    ref[LEFT] = 1
    ref[STRAY] = 1  # the reference itself has two components
    rules, before, after = choose_postprocessing([ref], [ref], [1])
    assert rules.is_identity and before == after


def test_postprocess_folder_keeps_geometry(tmp_path: Path) -> None:
    seg = _reference("case00")
    seg[STRAY] = 1
    write_segmentation(seg, GEOMETRY, tmp_path / "in" / f"c{ENDING}")
    (written,) = postprocess_folder(tmp_path / "in", tmp_path / "out", Postprocessing(True), [1, 2], ENDING, 1, False)
    out, geometry = read_image(written)
    assert np.array_equal(out, _reference("case00")) and not geometry.matches(GEOMETRY)


# Ensembles of probability files ---------------------------------------------------------------------------


def test_ensemble_folders_average_argmax_with_label_values(tmp_path: Path) -> None:
    labels = {"background": 0, "a": 2, "b": 5}  # channels are labels 0, 2, 5
    rng = np.random.default_rng(1)
    members = [rng.dirichlet(np.ones(3), size=(4, 5, 6)).transpose(3, 0, 1, 2) for _ in range(3)]
    folders = [tmp_path / f"m{i}" for i in range(3)]
    for folder, p in zip(folders, members):
        _write_probabilities(p, folder / "case.npz", "case", labels)
        write_segmentation(np.zeros((4, 5, 6), np.uint8), GEOMETRY, folder / f"case{ENDING}")
    (written,) = ensemble_folders(folders, tmp_path / "out", save_probabilities=True, num_workers=1)
    stored = [m.astype(np.float16).astype(np.float32) for m in members]
    expected_mean = (stored[0] + stored[1] + stored[2]) / 3
    expected = np.array([0, 2, 5])[expected_mean.argmax(axis=0)]
    out, geometry = read_image(written)
    assert written == tmp_path / "out" / f"case{ENDING}"
    assert np.array_equal(out, expected) and not geometry.matches(GEOMETRY)
    averaged, info = load_probabilities(tmp_path / "out" / "case.npz")
    assert np.allclose(averaged, expected_mean, atol=1e-3)
    assert info.channel_label_values == (0, 2, 5)


def test_ensemble_folders_refuse_different_cases_and_labels(tmp_path: Path) -> None:
    p = _one_hot(_reference("case00"))
    _write_probabilities(p, tmp_path / "m0" / "case00.npz", "case00", LABELS)
    _write_probabilities(p, tmp_path / "m0" / "case01.npz", "case01", LABELS)
    _write_probabilities(p, tmp_path / "m1" / "case00.npz", "case00", LABELS)
    with pytest.raises(AutosegError, match=r"1 case\(s\) only in .*m0 \(first: case01\)"):
        ensemble_folders([tmp_path / "m0", tmp_path / "m1"], tmp_path / "out", file_ending=ENDING)
    _write_probabilities(p, tmp_path / "m1" / "case01.npz", "case01", {"background": 0, "left": 1, "other": 3})
    with pytest.raises(AutosegError, match=r"case case01: .*channel label values \(0, 1, 3\)"):
        ensemble_folders([tmp_path / "m0", tmp_path / "m1"], tmp_path / "out", file_ending=ENDING, num_workers=1)
