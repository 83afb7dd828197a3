"""Each kind of broken dataset produces its own clear message, naming the case and the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import IDENTITY

from autoseg.check import check_dataset
from autoseg.cli import main
from autoseg.dataset import DatasetError, load_dataset
from autoseg.io import Geometry, read_image, write_image


def problems_of(root: Path) -> list[str]:
    _, problems = check_dataset(root, num_workers=1, show_progress=False)
    return [str(p) for p in problems]


def only_problem(root: Path, *fragments: str) -> str:
    problems = problems_of(root)
    assert len(problems) == 1, problems
    for fragment in fragments:
        assert fragment in problems[0], problems[0]
    return problems[0]


def relabel(root: Path, case: str, array: np.ndarray, geometry: Geometry | None = None) -> None:
    path = root / "labelsTr" / f"{case}.nii.gz"
    _, g = read_image(path)
    write_image(array, geometry or g, path)


def test_clean_dataset_has_no_problems(make_dataset):
    assert problems_of(make_dataset()) == []


def test_missing_channel_file(make_dataset):
    root = make_dataset(channels=2)
    (root / "imagesTr" / "case01_0001.nii.gz").unlink()
    only_problem(root, "case case01", "case01_0001.nii.gz", "channel 1 (T2) is missing")


def test_missing_label_file(make_dataset):
    root = make_dataset()
    (root / "labelsTr" / "case02.nii.gz").unlink()
    only_problem(root, "case case02", "label file is missing", "labelsTr/case02.nii.gz")


def test_files_matching_no_case(make_dataset):
    root = make_dataset()
    shutil.copy(root / "imagesTr" / "case00_0000.nii.gz", root / "imagesTr" / "stray.nii.gz")
    shutil.copy(root / "labelsTr" / "case00.nii.gz", root / "labelsTr" / "orphan.nii.gz")
    problems = problems_of(root)
    assert len(problems) == 2
    assert any("stray.nii.gz" in p and "matches no case" in p for p in problems)
    assert any("orphan.nii.gz" in p and "label file matches no case" in p for p in problems)


def test_channel_beyond_channel_names(make_dataset):
    root = make_dataset()
    shutil.copy(root / "imagesTr" / "case00_0000.nii.gz", root / "imagesTr" / "case00_0003.nii.gz")
    only_problem(root, "case00_0003.nii.gz", "matches no case", "channel_names")


def test_shape_mismatch(make_dataset):
    root = make_dataset()
    relabel(root, "case01", np.zeros((16, 20, 17), np.uint8))
    only_problem(root, "case case01", "case01.nii.gz", "shape (16, 20, 17)", "differs")


@pytest.mark.parametrize("field", ["spacing_mm", "origin", "direction"])
def test_geometry_mismatch(make_dataset, field):
    root = make_dataset()
    label, g = read_image(root / "labelsTr" / "case00.nii.gz")
    changed = {
        "spacing_mm": Geometry((2.0, 1.0, 1.5), g.origin, g.direction),
        "origin": Geometry(g.spacing_mm, (0.0, 5.0, 0.0), g.direction),
        "direction": Geometry(g.spacing_mm, g.origin, (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)),
    }[field]
    relabel(root, "case00", label, changed)
    only_problem(root, "case case00", "case00.nii.gz", field.replace("_mm", ""), "differs")


def test_small_geometry_differences_are_tolerated(make_dataset):
    root = make_dataset()
    label, g = read_image(root / "labelsTr" / "case00.nii.gz")
    relabel(root, "case00", label, Geometry((2.0, 1.0, 1.0 + 1e-6), (1e-5, 0.0, 0.0), g.direction))
    assert problems_of(root) == []


def test_undeclared_label_value(make_dataset):
    root = make_dataset()
    label, _ = read_image(root / "labelsTr" / "case02.nii.gz")
    label[0, 0, 0] = 5
    relabel(root, "case02", label)
    only_problem(root, "case case02", "label values [5] are not declared")


def test_non_integer_labels(make_dataset):
    root = make_dataset()
    label, _ = read_image(root / "labelsTr" / "case00.nii.gz")
    relabel(root, "case00", label.astype(np.float32) * 0.5)
    only_problem(root, "case case00", "non-integer")


def test_nan_and_inf_voxels(make_dataset):
    # .mha keeps non-finite values; SimpleITK's NIfTI reader already turns them into 0 when reading.
    root = make_dataset(ending=".mha")
    path = root / "imagesTr" / "case01_0000.mha"
    image, g = read_image(path)
    image[3, 3, 3] = np.nan
    image[4, 4, 4] = np.inf
    write_image(image, g, path)
    only_problem(root, "case case01", "case01_0000.mha", "2 NaN or infinite")


def test_truncated_file(make_dataset):
    root = make_dataset()
    path = root / "imagesTr" / "case00_0000.nii.gz"
    path.write_bytes(path.read_bytes()[:200])
    only_problem(root, "case case00", "case00_0000.nii.gz", "cannot be read")


def test_garbage_file(make_dataset):
    root = make_dataset()
    (root / "labelsTr" / "case01.nii.gz").write_bytes(b"not an image at all")
    only_problem(root, "case case01", "case01.nii.gz", "cannot be read")


def test_num_training_mismatch(make_dataset):
    root = make_dataset()
    description = json.loads((root / "dataset.json").read_text())
    description["numTraining"] = 7
    (root / "dataset.json").write_text(json.dumps(description))
    only_problem(root, "numTraining is 7 but 3 training cases were found")


def test_empty_dataset(make_dataset):
    root = make_dataset()
    for p in list((root / "imagesTr").iterdir()) + list((root / "labelsTr").iterdir()):
        p.unlink()
    only_problem(root, "no training cases found")


def test_wrong_file_ending(make_dataset):
    root = make_dataset()
    image, g = read_image(root / "imagesTr" / "case00_0000.nii.gz")
    write_image(image, g, root / "imagesTr" / "case09_0000.nii")
    only_problem(root, "case09_0000.nii", "wrong file ending '.nii'", "'.nii.gz'")


def test_4d_image_where_3d_expected(make_dataset):
    root = make_dataset()
    path = root / "imagesTr" / "case00_0000.nii.gz"
    image = sitk.JoinSeries([sitk.ReadImage(str(path))] * 2)
    sitk.WriteImage(image, str(path))
    problem = only_problem(root, "case case00", "case00_0000.nii.gz", "4D image", "3D image is expected")
    assert "one file per channel" in problem


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda d: d.pop("channel_names"), "'channel_names' is missing"),
        (lambda d: d.pop("file_ending"), "'file_ending' is missing"),
        (lambda d: d.update(labels={"tumour": 1}), "background as 0"),
        (lambda d: d.update(labels={"background": 0, "a": 1, "b": 1}), "share one integer"),
        (lambda d: d.update(labels={"background": 0, "a": [1, 2]}), "region"),
        (lambda d: d.update(file_ending=".png"), "not supported"),
        (lambda d: d.update(numTraining="3"), "must be an integer"),
        (lambda d: d.update(channel_names={"1": "T1"}), "without gaps"),
    ],
)
def test_bad_dataset_json(make_dataset, edit, fragment):
    root = make_dataset()
    description = json.loads((root / "dataset.json").read_text())
    edit(description)
    (root / "dataset.json").write_text(json.dumps(description))
    with pytest.raises(DatasetError, match=fragment):
        load_dataset(root)


def test_missing_and_invalid_dataset_json(make_dataset):
    root = make_dataset()
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_dataset(root)
    (root / "dataset.json").unlink()
    with pytest.raises(DatasetError, match="dataset.json: missing"):
        load_dataset(root)


def test_all_problems_are_reported_at_once(make_dataset, capsys):
    root = make_dataset()
    (root / "labelsTr" / "case02.nii.gz").unlink()
    label, _ = read_image(root / "labelsTr" / "case00.nii.gz")
    label[0, 0, 0] = 9
    relabel(root, "case00", label)
    assert len(problems_of(root)) == 2
    assert main(["-q", "check", str(root), "--num-workers", "1"]) == 1
    err = capsys.readouterr().err
    assert "2 problem(s)" in err and "case02" in err and "case00" in err and "Traceback" not in err


def test_commands_refuse_a_broken_dataset_without_writing(make_dataset, tmp_path, capsys):
    root = make_dataset()
    (root / "labelsTr" / "case01.nii.gz").unlink()
    out = tmp_path / "pre"
    assert main(["-q", "plan-and-preprocess", str(root), "--preprocessed", str(out), "--num-workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autoseg: error:") and "case01" in err and "Traceback" not in err
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


def test_content_problem_stops_fingerprint_without_writing(make_dataset, tmp_path, capsys):
    root = make_dataset()
    label, _ = read_image(root / "labelsTr" / "case00.nii.gz")
    label[1, 1, 1] = 4
    relabel(root, "case00", label)
    out = tmp_path / "pre"
    assert main(["-q", "fingerprint", str(root), "--preprocessed", str(out), "--num-workers", "1"]) == 2
    assert "label values [4]" in capsys.readouterr().err
    assert not list(out.rglob("*.json")) if out.exists() else True


def test_msd_layout(tmp_path):
    root = tmp_path / "Task02_Heart"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    geometry = Geometry((2.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY)
    training = []
    for i in range(2):
        write_image(np.full((8, 9, 10), 5.0, np.float32), geometry, root / "imagesTr" / f"la_{i:03d}.nii.gz")
        write_image(np.ones((8, 9, 10), np.uint8), geometry, root / "labelsTr" / f"la_{i:03d}.nii.gz")
        training.append({"image": f"./imagesTr/la_{i:03d}.nii.gz", "label": f"./labelsTr/la_{i:03d}.nii.gz"})
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "name": "LeftAtrium",
                "modality": {"0": "MRI"},
                "labels": {"0": "background", "1": "left atrium"},
                "numTraining": 2,
                "numTest": 0,
                "training": training,
                "test": [],
            }
        )
    )
    spec = load_dataset(root)
    assert spec.layout == "msd" and spec.labels == {"background": 0, "left atrium": 1}
    assert [c.case_id for c in spec.training] == ["la_000", "la_001"]
    assert problems_of(root) == []


def test_datasets_json_example_loads(tmp_path):
    """The documented example must stay loadable: it becomes a real dataset's description here."""
    example = Path(__file__).parents[1] / "datasets.json.example"
    from conftest import write_dataset

    root = write_dataset(
        tmp_path / "Dataset009_Example",
        n_cases=2,
        channels=2,
        labels={"background": 0, "csf": 1, "grey_matter": 2},
    )
    shutil.copy(example, root / "dataset.json")
    spec = load_dataset(root)
    assert spec.channel_names == ("T1", "T2")
    assert spec.labels["white_matter"] == 3
    assert problems_of(root) == []


def test_every_missing_dataset_json_field_is_named(make_dataset):
    root = make_dataset()
    (root / "dataset.json").write_text("{}")
    with pytest.raises(DatasetError, match="fields channel_names, labels, numTraining, file_ending are missing"):
        load_dataset(root)
