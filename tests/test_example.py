"""The shipped example dataset: layout, determinism, label sanity, geometry and safe writing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from autoseg import example
from autoseg.errors import AutosegError
from autoseg.io import read_image

NUM_TRAINING, NUM_TEST, SIZE, SEED = 4, 2, 32, 0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("example")
    return example.make_example_dataset(
        out_dir, num_training=NUM_TRAINING, num_test=NUM_TEST, size=SIZE, seed=SEED, show_progress=False
    )


def test_layout_and_dataset_json(dataset: Path) -> None:
    assert dataset.name == "Dataset001_BrainPhantom"
    training, test = example.case_ids(NUM_TRAINING, NUM_TEST)
    assert training == ["phantom_000", "phantom_001", "phantom_002", "phantom_003"]
    for split, ids in (("Tr", training), ("Ts", test)):
        assert sorted(p.name for p in (dataset / f"images{split}").iterdir()) == [f"{c}_0000.nii.gz" for c in ids]
        assert sorted(p.name for p in (dataset / f"labels{split}").iterdir()) == [f"{c}.nii.gz" for c in ids]
    spec = json.loads((dataset / "dataset.json").read_text())
    assert spec["channel_names"] == {"0": "T1"}
    assert spec["labels"] == {"background": 0, "csf": 1, "grey_matter": 2, "white_matter": 3}
    assert spec["numTraining"] == NUM_TRAINING
    assert spec["file_ending"] == ".nii.gz"
    assert spec["name"] and spec["description"]


def test_files_hold_the_generated_cases(dataset: Path) -> None:
    image, image_geometry = read_image(dataset / "imagesTr" / "phantom_001_0000.nii.gz")
    label, label_geometry = read_image(dataset / "labelsTr" / "phantom_001.nii.gz")
    expected_image, expected_label, geometry = example.make_case(1, SEED, SIZE)
    assert image.dtype == np.float32 and label.dtype == np.uint8
    np.testing.assert_array_equal(image, expected_image)
    np.testing.assert_array_equal(label, expected_label)
    assert not image_geometry.matches(geometry) and not label_geometry.matches(geometry)


def test_same_seed_same_bytes_other_seed_differs() -> None:
    first_image, first_label, first_geometry = example.make_case(3, seed=7, size=SIZE)
    again_image, again_label, again_geometry = example.make_case(3, seed=7, size=SIZE)
    assert first_image.tobytes() == again_image.tobytes()
    assert first_label.tobytes() == again_label.tobytes()
    assert first_geometry == again_geometry
    other_image, _, _ = example.make_case(3, seed=8, size=SIZE)
    assert other_image.shape != first_image.shape or not np.array_equal(other_image, first_image)


@pytest.mark.parametrize("index", range(12))
def test_labels_and_head(index: int) -> None:
    image, label, _ = example.make_case(index, SEED, SIZE)
    assert image.shape == label.shape
    counts = np.bincount(label.ravel(), minlength=4)
    assert len(counts) == 4 and (counts > 0).all(), counts
    assert counts[0] == counts.max()  # background (air, skull, scalp) dominates
    assert (image[label > 0] > 0).all()  # the whole brain is nonzero
    assert (image[label == 0] > 0).any()  # so is the unlabelled skull and scalp around it
    corners = image[np.ix_([0, -1], [0, -1], [0, -1])]
    assert (corners == 0).all()


def test_some_cases_are_thick_slice_stacks() -> None:
    spacings = [example.make_case(i, SEED, SIZE)[2].spacing_mm for i in range(24)]
    thick = [s for s in spacings if s[0] > s[1]]
    assert thick and len(thick) < len(spacings)
    for z, y, x in thick:
        assert y == x == example.IN_PLANE_SPACING_MM
        assert z / y in example.THICK_SLICE_STEPS
    assert len({tuple(example.make_case(i, SEED, SIZE)[0].shape) for i in range(6)}) > 1


def test_tiny_phantom_is_pure_and_complete() -> None:
    shape, spacing = (24, 24, 24), (2.0, 2.0, 2.0)
    image, label = example.make_phantom(shape, spacing, np.random.default_rng(5))
    again, _ = example.make_phantom(shape, spacing, np.random.default_rng(5))
    assert image.shape == label.shape == shape
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert set(np.unique(label)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(image, again)
    thick_image, _ = example.make_phantom((12, 24, 24), (4.0, 2.0, 2.0), np.random.default_rng(5))
    assert thick_image.shape == (12, 24, 24)


def test_contrast_regimes_are_mixed() -> None:
    contrasts = [example.sample_phantom_params(np.random.default_rng([1, i])).contrast for i in range(300)]
    inverted = contrasts.count("inverted") / len(contrasts)
    assert 0.25 < inverted < 0.42
    assert {"adult", "isointense", "inverted"} == set(contrasts)


def test_existing_dataset_needs_overwrite(tmp_path: Path) -> None:
    def make(overwrite: bool = False) -> Path:
        return example.make_example_dataset(
            tmp_path, num_training=2, num_test=1, size=24, show_progress=False, overwrite=overwrite
        )

    target = make()
    assert make() == target  # the same example again is reused, not an error
    marker = target / "marker.txt"
    marker.write_text("user data")
    with pytest.raises(AutosegError, match="Dataset001_BrainPhantom"):
        make()
    assert marker.exists()
    again = make(overwrite=True)
    assert again == target and not marker.exists()
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no staging or retired folder left


def test_crash_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_make_case = example.make_case

    def failing_make_case(index: int, seed: int = 0, size: int = 80, contrast: str | None = None) -> tuple:
        if index == 2:
            raise RuntimeError("simulated crash")
        return real_make_case(index, seed, size, contrast)

    monkeypatch.setattr(example, "make_case", failing_make_case)
    with pytest.raises(RuntimeError, match="simulated crash"):
        example.make_example_dataset(tmp_path, num_training=3, num_test=1, size=24, show_progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bad_size_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(AutosegError, match="size"):
        example.make_example_dataset(tmp_path, size=200, show_progress=False)


def test_one_contrast_regime_and_case_info(tmp_path: Path) -> None:
    """contrast= confines every case to one regime (and its age band); the case info says what was drawn."""
    infos = [example.make_case_with_info(i, SEED, 24, contrast="inverted")[3] for i in range(6)]
    assert {info.contrast for info in infos} == {"inverted"}
    low, high = example.HEAD_FILL_RANGE
    band = example.INVERTED_CONTRAST_FRACTION
    assert all(info.head_fill <= low + (high - low) * band + 0.1 for info in infos)  # infant heads (+ jitter)
    mixed = [example.make_case_with_info(i, SEED, 24)[3] for i in range(24)]
    assert len({info.contrast for info in mixed}) > 1
    assert any(info.slice_step > 1 for info in mixed) and any(info.ghosted for info in mixed)
    image, _, geometry = example.make_case(5, SEED, 24)  # make_case is make_case_with_info without the info
    again = example.make_case_with_info(5, SEED, 24)
    np.testing.assert_array_equal(image, again[0])
    assert geometry == again[2]
    adult = example.make_example_dataset(
        tmp_path, 2, 1, size=20, contrast="adult", dataset_name="Dataset002_AdultPhantom", show_progress=False
    )
    assert adult.name == "Dataset002_AdultPhantom"
    assert "adult grey/white contrast only" in json.loads((adult / "dataset.json").read_text())["description"]
    with pytest.raises(AutosegError, match="contrast"):
        example.make_example_dataset(tmp_path, 2, 1, size=20, contrast="neonatal", show_progress=False)
