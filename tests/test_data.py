"""Training data: splits, reading preprocessed cases, patch sampling and the multi-process batch loader."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from autoseg import atomic, serialization
from autoseg.augment import spatial_setup, train_augmenter, validation_augmenter
from autoseg.data import PatchSampler, PreprocessedCases, fold_cases, kfold_splits, load_or_create_splits
from autoseg.data.loader import BatchLoader
from autoseg.data.resident import ResidentCases, ResidentLoader, resident_bytes
from autoseg.errors import AutosegError
from autoseg.io import Geometry
from autoseg.preprocessing.case import CaseProperties
from autoseg.preprocessing.run import case_files

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def write_case(folder: Path, case_id: str, image: np.ndarray, seg: np.ndarray, max_locations: int = 50) -> None:
    """A preprocessed case as preprocessing stores it, with locations sampled from ``seg``."""
    rng = np.random.default_rng(len(case_id))
    rows = []
    for value in sorted(int(v) for v in np.unique(seg) if v > 0):
        voxels = np.argwhere(seg == value)
        voxels = voxels[rng.permutation(len(voxels))[:max_locations]]
        rows.append(np.column_stack([np.full(len(voxels), value), voxels]))
    locations = np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, 4), np.int32)
    files = case_files(folder, case_id)
    atomic.save_npy(files["image"], image.astype(np.float32))
    atomic.save_npy(files["label"], seg.astype(np.int8))
    atomic.save_npy(files["locations"], locations)
    shape = tuple(int(s) for s in seg.shape)
    properties = CaseProperties(
        schema_version=CaseProperties.SCHEMA_VERSION,
        case_id=case_id,
        geometry=Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY),
        shape_before_crop=shape,
        bbox=tuple((0, s) for s in shape),
        shape_after_crop=shape,
        spacing_after_crop_mm=(1.0, 1.0, 1.0),
        spacing_mm=(1.0, 1.0, 1.0),
        shape_after_resampling=shape,
        class_location_counts={str(int(v)): int((locations[:, 0] == v).sum()) for v in np.unique(locations[:, 0])},
    )
    serialization.save(properties, files["properties"])


def blob_case(shape: tuple[int, int, int], rng: np.random.Generator, channels: int = 2) -> tuple[np.ndarray, ...]:
    """Two nested labelled blobs, -1 in a corner (outside the nonzero mask), image = label + channel offset."""
    seg = np.zeros(shape, np.int8)
    centre = [rng.integers(s // 3, 2 * s // 3) for s in shape]
    box = tuple(slice(c - 3, c + 3) for c in centre)
    seg[box] = 1
    seg[tuple(slice(c - 1, c + 1) for c in centre)] = 2
    seg[:2, :2, :2] = -1
    image = np.stack([seg.astype(np.float32) + 10 * c for c in range(channels)])
    return image, seg


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    out = tmp_path / "default_3d_fullres"
    for i, shape in enumerate([(20, 24, 22), (18, 26, 24), (22, 20, 20)]):
        write_case(out, f"case{i:02d}", *blob_case(shape, rng))
    return out


# --- splits -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_cases", [2, 3, 5, 6, 11, 23])
def test_kfold_equals_sklearn(n_cases):
    model_selection = pytest.importorskip("sklearn.model_selection")
    ids = [f"case{i:03d}" for i in reversed(range(n_cases))]  # given unsorted: the folds use the sorted order
    ours = kfold_splits(ids)
    ordered = sorted(ids)
    kfold = model_selection.KFold(n_splits=min(5, n_cases), shuffle=True, random_state=12345)
    expected = [
        {"train": [ordered[i] for i in train], "val": [ordered[i] for i in val]} for train, val in kfold.split(ordered)
    ]
    assert ours == expected
    assert sorted(c for s in ours for c in s["val"]) == ordered  # every case validated exactly once


def test_kfold_rejects_too_few_or_duplicate_cases():
    with pytest.raises(AutosegError, match="at least 2 training cases.*'all'"):
        kfold_splits(["only"])
    with pytest.raises(AutosegError, match="duplicate case ids.*a"):
        kfold_splits(["a", "b", "a"])
    assert len(kfold_splits(["a", "b", "c"])) == 3  # fewer cases than folds: leave one out


def test_splits_file_round_trip_and_manual_edits(tmp_path):
    ids = [f"c{i}" for i in range(7)]
    path = tmp_path / "splits.json"
    created = load_or_create_splits(path, ids)
    assert json.loads(path.read_text()) == created and len(created) == 5
    assert load_or_create_splits(path, ids) == created
    edited = [{"train": ["c0", "c1"], "val": ["c2"]}, {"train": ["c2"], "val": ["c0", "c1"]}]
    path.write_text(json.dumps(edited))
    assert load_or_create_splits(path, ids) == edited  # the file wins over the rule once written


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"train": []}, "top level: expected a non-empty list"),
        ([{"train": ["c0"], "val": ["c1"]}, {"train": ["c0"], "val": ["c9"]}], r"fold 1\.val: unknown case id\(s\) c9"),
        ([{"train": ["c0"], "validation": ["c1"]}], "fold 0: expected an object with exactly the keys"),
        ([{"train": "c0", "val": ["c1"]}], r"fold 0\.train: expected a list of case id strings"),
        ([{"train": ["c0", "c1"], "val": ["c1"]}], "c1 are in both train and val"),
        ([{"train": [], "val": ["c1"]}], r"fold 0\.train: no training cases"),
    ],
)
def test_bad_splits_file_names_file_and_entry(tmp_path, content, message):
    path = tmp_path / "splits.json"
    path.write_text(json.dumps(content))
    with pytest.raises(AutosegError, match=message) as info:
        load_or_create_splits(path, ["c0", "c1", "c2"])
    assert str(path) in str(info.value) and "delete it" in str(info.value)


def test_invalid_json_splits(tmp_path):
    path = tmp_path / "splits.json"
    path.write_text("[{")
    with pytest.raises(AutosegError, match="not valid JSON"):
        load_or_create_splits(path, ["c0", "c1"])


def test_fold_cases_and_fold_beyond_range(tmp_path):
    path = tmp_path / "splits.json"
    ids = [f"c{i}" for i in range(6)]
    splits = load_or_create_splits(path, ids)
    train, val = fold_cases(splits, 2, path)
    assert (train, val) == (splits[2]["train"], splits[2]["val"])
    assert fold_cases(splits, "all", path) == (ids, ids)
    with pytest.raises(AutosegError, match=r"has 5 fold\(s\) \(0 to 4\), so fold 5 does not exist") as info:
        fold_cases(splits, 5, path)
    assert str(path) in str(info.value)


# --- case access --------------------------------------------------------------------------------------------


def test_cases_read_lazily_and_pickle(folder):
    cases = PreprocessedCases(folder, ["case00", "case01"])
    assert isinstance(cases.image("case00"), np.memmap) and cases.image("case00").shape == (2, 20, 24, 22)
    assert cases.seg("case01").shape == (18, 26, 24)
    assert cases.properties("case00").case_id == "case00"
    clone = pickle.loads(pickle.dumps(cases))
    assert np.array_equal(clone.locations("case01"), cases.locations("case01"))
    with pytest.raises(KeyError, match="case02"):
        cases.image("case02")


def test_missing_or_broken_case_says_preprocess(folder):
    message = r"case\(s\) case07 are missing or incomplete; run `autoseg preprocess`"
    with pytest.raises(AutosegError, match=message) as info:
        PreprocessedCases(folder, ["case00", "case07"])
    assert str(folder) in str(info.value)
    (folder / "case01_seg.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(AutosegError, match="cannot read the label of case case01.*autoseg preprocess"):
        PreprocessedCases(folder, ["case01"]).seg("case01")


# --- sampling ------------------------------------------------------------------------------------------------


def contains_foreground(label: np.ndarray) -> bool:
    return bool((label > 0).any())


def test_sampler_shapes_types_and_labels(folder):
    cases = PreprocessedCases(folder, ["case00", "case01", "case02"])
    sampler = PatchSampler(cases, cases.case_ids, (8, 10, 12), (12, 14, 16), batch_size=4)
    image, label, keys = sampler.sample(np.random.default_rng(0))
    assert image.shape == (4, 2, 12, 14, 16) and image.dtype == np.float32
    assert label.shape == (4, 1, 12, 14, 16) and label.dtype == np.int16
    assert len(keys) == 4 and set(keys) <= set(cases.case_ids)
    assert set(np.unique(label)) <= {-1, 0, 1, 2}
    inside = label >= 0
    assert np.array_equal(image[:, :1][inside], label[inside].astype(np.float32))  # image and label aligned


def test_case_weights_set_how_often_each_case_is_drawn(folder):
    cases = PreprocessedCases(folder, ["case00", "case01", "case02"])
    ids = cases.case_ids

    def drawn(weights):
        sampler = PatchSampler(cases, ids, (8, 8, 8), (8, 8, 8), batch_size=4, case_weights=weights)
        rng = np.random.default_rng(0)
        picks = [case for _ in range(300) for case, _, _ in sampler.place(rng)]
        return {case: picks.count(case) / len(picks) for case in ids}

    share = drawn([0.0, 1.0, 3.0])
    assert share["case00"] == 0.0
    assert share["case02"] == pytest.approx(0.75, abs=0.04) and share["case01"] == pytest.approx(0.25, abs=0.04)
    uniform = drawn(None)
    assert all(v == pytest.approx(1 / 3, abs=0.04) for v in uniform.values())
    for bad in ([1.0, 1.0], [1.0, -1.0, 1.0], [0.0, 0.0, 0.0], [1.0, float("nan"), 1.0]):
        with pytest.raises(ValueError, match="case_weights"):
            PatchSampler(cases, ids, (8, 8, 8), (8, 8, 8), batch_size=2, case_weights=bad)


def test_stored_minus_one_becomes_background(folder):
    cases = PreprocessedCases(folder, ["case00"])
    sampler = PatchSampler(cases, ["case00"], (20, 24, 22), (20, 24, 22), batch_size=1, oversample_foreground=0)
    _, label, _ = sampler.sample(np.random.default_rng(0))  # the patch is the whole case: no padding
    assert label.min() == 0 and label[0, 0, 0, 0, 0] == 0 and cases.seg("case00")[0, 0, 0] == -1


def test_oversampling_rule_and_forced_patches_hold_foreground(tmp_path):
    rng = np.random.default_rng(3)
    # a large case with one tiny lesion: a uniformly placed patch rarely sees it
    seg = np.zeros((40, 40, 40), np.int8)
    seg[33:35, 4:6, 30:32] = 1
    write_case(tmp_path, "tiny", rng.normal(size=(1, 40, 40, 40)), seg)
    cases = PreprocessedCases(tmp_path, ["tiny"])
    sampler = PatchSampler(cases, ["tiny"], (8, 8, 8), (12, 12, 12), batch_size=3, oversample_foreground=0.33)
    assert [sampler.is_forced(i) for i in range(3)] == [False, False, True]
    unforced_hits = 0
    for seed in range(15):
        _, label, _ = sampler.sample(np.random.default_rng(seed))
        final = label[:, :, 2:10, 2:10, 2:10]  # the centre that the spatial transform keeps
        assert contains_foreground(final[2])
        unforced_hits += contains_foreground(label[0]) + contains_foreground(label[1])
    assert unforced_hits < 10  # out of 30 uniformly placed samples
    always = PatchSampler(cases, ["tiny"], (8, 8, 8), (12, 12, 12), batch_size=4, oversample_foreground=1.0)
    for seed in range(5):
        _, label, _ = always.sample(np.random.default_rng(seed))
        assert all(contains_foreground(label[b, :, 2:10, 2:10, 2:10]) for b in range(4))


def test_case_without_foreground_is_sampled_uniformly(tmp_path):
    write_case(tmp_path, "empty", np.ones((1, 10, 10, 10)), np.zeros((10, 10, 10)))
    cases = PreprocessedCases(tmp_path, ["empty"])
    sampler = PatchSampler(cases, ["empty"], (6, 6, 6), (8, 8, 8), batch_size=2, oversample_foreground=1.0)
    image, label, _ = sampler.sample(np.random.default_rng(0))
    assert image.shape == (2, 1, 8, 8, 8) and not contains_foreground(label)


def test_padding_where_case_is_smaller_than_patch(tmp_path):
    seg = np.ones((4, 6, 6), np.int8)
    write_case(tmp_path, "small", np.full((1, 4, 6, 6), 5.0), seg)
    cases = PreprocessedCases(tmp_path, ["small"])
    sampler = PatchSampler(cases, ["small"], (8, 8, 8), (10, 10, 10), batch_size=2)
    for seed in range(5):
        image, label, _ = sampler.sample(np.random.default_rng(seed))
        assert (label == 1).sum() == 2 * seg.size  # the whole case is inside every sample
        assert np.array_equal(label == -1, image == 0)  # padded: label -1, image 0
        assert (label == -1).any()


def test_sampler_refuses_cases_with_different_channels(tmp_path):
    rng = np.random.default_rng(0)
    write_case(tmp_path, "two", *blob_case((12, 12, 12), rng, channels=2))
    write_case(tmp_path, "one", *blob_case((12, 12, 12), rng, channels=1))
    cases = PreprocessedCases(tmp_path, ["one", "two"])
    sampler = PatchSampler(cases, ["one", "two"], (8, 8, 8), (8, 8, 8), batch_size=6)
    with pytest.raises(AutosegError, match="channels"):
        sampler.sample(np.random.default_rng(1))  # six draws from two cases: both come up


def test_2d_sampling(folder):
    cases = PreprocessedCases(folder, ["case00", "case01", "case02"])
    sampler = PatchSampler(cases, cases.case_ids, (12, 12), (16, 14), batch_size=3, oversample_foreground=1.0)
    image, label, keys = sampler.sample(np.random.default_rng(1))
    assert image.shape == (3, 2, 16, 14) and label.shape == (3, 1, 16, 14) and len(keys) == 3
    assert all(contains_foreground(label[b, :, 2:14, 1:13]) for b in range(3))
    inside = label >= 0
    assert np.array_equal(image[:, :1][inside], label[inside].astype(np.float32))


# --- loader --------------------------------------------------------------------------------------------------


def make_loader(folder: Path, num_workers: int, seed: int = 0) -> BatchLoader:
    patch = (8, 10, 12)
    setup = spatial_setup(patch)
    cases = PreprocessedCases(folder, ["case00", "case01", "case02"])
    sampler = PatchSampler(cases, cases.case_ids, patch, setup.sample_size, batch_size=2)
    augmenter = train_augmenter(patch, setup)
    return BatchLoader(sampler, augmenter, iterations_per_epoch=3, num_workers=num_workers, seed=seed)


def collect(loader: BatchLoader, epoch: int, start: int = 0) -> list[dict]:
    return list(loader.epoch(epoch, start))


def test_loader_batches_do_not_depend_on_workers(folder):
    with make_loader(folder, 0) as in_process, make_loader(folder, 2) as workers:
        for epoch in (0, 1):
            a, b = collect(in_process, epoch), collect(workers, epoch)
            assert len(a) == len(b) == 3
            for x, y in zip(a, b):
                assert x["keys"] == y["keys"]
                assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
        first = a[0]
        assert first["image"].dtype == torch.float32 and first["image"].shape == (2, 2, 8, 10, 12)
        assert first["label"].dtype == torch.int16 and first["label"].shape == (2, 8, 10, 12)
        resumed = collect(workers, 1, start=2)  # resuming mid-epoch gives the same last batch
        assert len(resumed) == 1 and torch.equal(resumed[0]["image"], a[2]["image"])


def test_loader_epochs_and_seeds_differ(folder):
    with make_loader(folder, 0) as loader:
        zero, one = collect(loader, 0), collect(loader, 1)
        assert not any(torch.equal(x["image"], y["image"]) for x in zero for y in one)
        assert all(torch.equal(x["image"], y["image"]) for x, y in zip(zero, collect(loader, 0)))
    with make_loader(folder, 0, seed=1) as other:
        assert not torch.equal(collect(other, 0)[0]["image"], zero[0]["image"])


# --- cases kept on the device ----------------------------------------------------------------------------


def _resident_and_workers(folder: Path, patch: tuple[int, ...], compact: bool) -> tuple[ResidentLoader, BatchLoader]:
    setup = spatial_setup(patch)
    cases = PreprocessedCases(folder, ["case00", "case01", "case02"])
    sampler = PatchSampler(cases, cases.case_ids, patch, setup.sample_size, batch_size=3, oversample_foreground=0.5)
    resident = ResidentCases(cases, cases.case_ids, torch.device("cpu"), compact)
    return (
        ResidentLoader(sampler, resident, iterations_per_epoch=4, seed=7, rank=1),
        BatchLoader(sampler, validation_augmenter(), 4, num_workers=0, seed=7, rank=1, compact=compact),
    )


@pytest.mark.parametrize("patch", [(8, 10, 12), (12, 12)])
@pytest.mark.parametrize("compact", [False, True])
def test_resident_batches_equal_the_workers_batches(folder, patch, compact):
    """Same placements from the same generator, cut from cases on the device: voxel for voxel the workers'
    batch (padding with 0 / -1 included), also when both send float16 images and int8 labels."""
    resident, workers = _resident_and_workers(folder, patch, compact)
    device = torch.device("cpu")
    padded = 0
    for epoch, start in ((0, 0), (3, 2)):
        pairs = list(zip(resident.epoch(epoch, start), workers.epoch(epoch, start), strict=True))
        assert len(pairs) == 4 - start
        for on_device, from_workers in pairs:
            assert on_device["keys"] == from_workers["keys"]
            image, label = resident.to_device(on_device, device)
            expected_image, expected_label = workers.to_device(from_workers, device)
            assert image.dtype == torch.float32 and label.dtype == torch.int16
            assert torch.equal(image, expected_image) and torch.equal(label, expected_label)
            padded += int((label == -1).sum())
    assert padded > 0  # the samples stick out of the cases: the padding was compared too
    workers.close()


def test_resident_cases_hold_compact_copies(folder):
    cases = PreprocessedCases(folder, ["case00", "case01", "case02"])
    full = ResidentCases(cases, cases.case_ids, torch.device("cpu"), compact=False)
    small = ResidentCases(cases, cases.case_ids, torch.device("cpu"), compact=True)
    assert full.images["case00"].dtype == torch.float32 and small.images["case00"].dtype == torch.float16
    assert small.labels["case00"].dtype == torch.int8 and int(small.labels["case00"].min()) == 0  # -1 stored: 0
    assert full.nbytes == resident_bytes(cases, cases.case_ids, compact=False)
    assert small.nbytes == resident_bytes(cases, cases.case_ids, compact=True) < full.nbytes / 1.9
