"""Two input channels (T1 and T2) through every stage: plan, preprocess, train, find-best and predict."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_dataset

from autoseg.errors import AutosegError
from autoseg.io import read_image
from autoseg.paths import Paths
from autoseg.plan_and_train import plan_and_train
from autoseg.training.trainer import TrainOptions

QUICK = TrainOptions(fast_dev_run=True, num_workers=0, device="cpu", validation_mirroring=False, show_progress=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Paths]:
    root = tmp_path_factory.mktemp("multimodal")
    dataset = write_dataset(root / "Dataset030_T1T2", n_cases=5, shape=(16, 20, 18), channels=2)
    paths = Paths(root / "pre", root / "results")
    result = plan_and_train(dataset, paths, configurations=["3d_fullres"], folds=[0], options=QUICK, announce=str)
    assert result.best is not None and not result.failed
    return dataset, paths


def test_two_channels_are_planned_normalized_and_trained(trained: tuple[Path, Paths]) -> None:
    dataset, paths = trained
    plan = json.loads(paths.plan_file(dataset.name, "default").read_text())
    assert plan["channel_names"] == ["T1", "T2"]
    assert len(plan["foreground_intensity_per_channel"]) == 2
    image = np.load(next(paths.configuration_dir(dataset.name, "default_3d_fullres").glob("case*[0-9].npy")))
    assert image.shape[0] == 2  # both channels preprocessed side by side
    best = json.loads((paths.results / dataset.name / "best.json").read_text())
    assert best["channel_names"] == ["T1", "T2"]


def test_prediction_reads_both_channels_and_refuses_a_missing_one(trained: tuple[Path, Paths], tmp_path: Path) -> None:
    from autoseg.inference.predictor import predict_folder

    dataset, paths = trained
    images = tmp_path / "in"
    images.mkdir()
    for channel in ("0000", "0001"):
        shutil.copy(dataset / "imagesTr" / f"case01_{channel}.nii.gz", images)
    model = paths.results / dataset.name
    written = predict_folder(model, images, tmp_path / "out", device="cpu", cpu_bf16=False, show_progress=False)
    segmentation, geometry = read_image(written[0])
    _, reference = read_image(dataset / "labelsTr" / "case01.nii.gz")
    assert segmentation.shape == (16, 20, 18) and geometry.matches(reference, tolerance=1e-6) == []
    (images / "case01_0001.nii.gz").unlink()
    with pytest.raises(AutosegError, match="case01"):
        predict_folder(model, images, tmp_path / "out2", device="cpu", show_progress=False)
