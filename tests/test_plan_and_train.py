"""plan-and-train end to end: two configurations x two folds, a rerun that skips, a resume, a failed fold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_dataset

from autoseg.cli import main
from autoseg.folds import FoldJob, fold_state, run_fold_jobs
from autoseg.paths import Paths
from autoseg.plan_and_train import plan_and_train, resolve_preset
from autoseg.training.trainer import TRAINERS, Trainer, TrainOptions, register_trainer

CONFIGS = ["2d", "3d_fullres"]
QUICK = TrainOptions(fast_dev_run=True, num_workers=0, device="cpu", validation_mirroring=False, show_progress=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, str]:
    """plan-and-train through the command line once: 2 configurations x folds 0 and 1, fast-dev-run."""
    root = tmp_path_factory.mktemp("plan_and_train")
    dataset = write_dataset(root / "Dataset020_Tiny", n_cases=5, shape=(16, 20, 18))
    pre, results = root / "pre", root / "results"
    argv = ["-q", "plan-and-train", str(dataset), "--preprocessed", str(pre), "--results", str(results),
            "-c", *CONFIGS, "-f", "0", "1", "--fast-dev-run", "--num-workers", "0", "--device", "cpu"]  # fmt: skip
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return dataset, pre, results, out.getvalue()


def model_dir(results: Path, config: str) -> Path:
    return results / "Dataset020_Tiny" / f"default__default__{config}"


def test_every_fold_trained_and_the_best_chosen(trained: tuple[Path, Path, Path, str]) -> None:
    _dataset, _pre, results, printed = trained
    for config in CONFIGS:
        folder = model_dir(results, config)
        assert (folder / "plan.json").is_file() and (folder / "dataset.json").is_file()
        for fold in (0, 1):
            run = json.loads((folder / f"fold_{fold}" / "run.json").read_text())
            assert run["status"] == "finished" and run["epochs"] == 2
            assert list((folder / f"fold_{fold}" / "validation").glob("*.npz")), "ensembles need probabilities"
    best = json.loads((results / "Dataset020_Tiny" / "best.json").read_text())
    assert best["folds"] == [0, 1] and best["cases_total"] == 5 and 0 < best["cases_scored"] < 5
    assert {c["name"] for c in best["candidates"]} >= {f"default__default__{c}" for c in CONFIGS}
    assert (results / "Dataset020_Tiny" / "report.md").is_file()
    assert "chosen:" in printed and "wall time: check" in printed and "find-best" in printed
    assert f"autoseg predict -i IN_DIR -o OUT_DIR -m {results / 'Dataset020_Tiny'}" in printed
    assert "scored on" in printed  # two of five folds: the coverage is said, not hidden


def test_rerun_skips_finished_folds(trained: tuple[Path, Path, Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    dataset, pre, results, _ = trained
    checkpoint = model_dir(results, "3d_fullres") / "fold_0" / "checkpoint_final.pt"
    before = checkpoint.stat().st_mtime_ns
    result = plan_and_train(
        dataset, Paths(pre, results), configurations=CONFIGS, folds=[0, 1], options=QUICK, announce=print
    )
    assert [o.status for o in result.outcomes] == ["skipped"] * 4
    assert checkpoint.stat().st_mtime_ns == before
    out = capsys.readouterr().out
    assert "reusing" in out and out.count("skipped") == 4


def test_interrupted_fold_is_resumed_and_new_fold_trained(trained: tuple[Path, Path, Path, str]) -> None:
    dataset, pre, results, _ = trained
    fold = model_dir(results, "3d_fullres") / "fold_1"
    run = json.loads((fold / "run.json").read_text())
    (fold / "run.json").write_text(json.dumps({**run, "status": "interrupted"}))
    assert fold_state(fold, 2) == "interrupted"
    result = plan_and_train(
        dataset, Paths(pre, results), configurations=["3d_fullres"], folds=[1, 2], options=QUICK, announce=print
    )
    assert [o.status for o in result.outcomes] == ["resumed", "trained"]
    assert fold_state(fold, 2) == "finished" and fold_state(fold.parent / "fold_2", 2) == "finished"
    assert fold_state(fold, 3) != "finished"  # a larger --epochs makes a finished fold due again


def test_a_failed_fold_does_not_lose_the_others(trained: tuple[Path, Path, Path, str], tmp_path: Path) -> None:
    dataset, pre, _results, _ = trained

    @register_trainer("test_fails_on_fold_1")
    class FailsOnFold1(Trainer):
        """Raises when asked to build the network of fold 1."""

        def build_network(self):  # type: ignore[no-untyped-def]
            if self.setup.fold == 1:
                raise RuntimeError("deliberate failure")
            return super().build_network()

    try:
        results = tmp_path / "results"
        result = plan_and_train(
            dataset, Paths(pre, results), configurations=["3d_fullres"], folds=[0, 1], trainer="test_fails_on_fold_1",
            options=QUICK, announce=lambda line: None,
        )  # fmt: skip
        statuses = {o.job.fold: o for o in result.outcomes}
        assert statuses[0].status == "trained" and statuses[1].status == "failed"
        assert statuses[1].log is not None and "deliberate failure" in statuses[1].log.read_text()
        assert result.best is not None and result.best.folds == (0,)  # find-best still runs on what finished
    finally:
        TRAINERS._items.pop("test_fails_on_fold_1", None)


def test_folds_side_by_side_in_subprocesses(trained: tuple[Path, Path, Path, str], tmp_path: Path) -> None:
    dataset, pre, _results, _ = trained
    paths = Paths(pre, tmp_path / "results")
    folder = paths.model_dir(dataset.name, "default", "default", "3d_fullres")
    jobs = [FoldJob("3d_fullres", f, folder / f"fold_{f}") for f in (0, 1)]
    outcomes = run_fold_jobs(jobs, dataset, paths, "default", "default", QUICK, 2, devices=["cpu", "cpu"])
    assert [o.status for o in outcomes] == ["trained", "trained"], [o.error for o in outcomes]
    for job in jobs:
        assert fold_state(job.folder, 2) == "finished" and (job.folder / "train.log").is_file()


def test_presets_give_way_to_explicit_options() -> None:
    configurations, folds, options = resolve_preset("quick", None, None, TrainOptions(epochs=7))
    assert configurations == ("3d_fullres", "2d") and folds == (0,)
    assert options.epochs == 7 and options.iterations_per_epoch == 40  # the preset has 6 epochs
    configurations, folds, options = resolve_preset(None, ["2d"], [3], TrainOptions())
    assert configurations == ["2d"] and folds == (3,) and options.epochs is None


def test_unknown_configuration_is_named(trained: tuple[Path, Path, Path, str], capsys: pytest.CaptureFixture[str]):
    dataset, pre, results, _ = trained
    code = main(["-q", "plan-and-train", str(dataset), "--preprocessed", str(pre), "--results", str(results),
                 "-c", "3d_lowres", "--fast-dev-run"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "no configuration 3d_lowres" in err and "2d, 3d_fullres" in err


def _input_folder(dataset: Path, target: Path, cases: tuple[str, ...] = ("case00", "case03")) -> Path:
    """A test folder made of training images: the layout `autoseg predict -i` reads."""
    import shutil

    target.mkdir()
    for case in cases:
        shutil.copy(dataset / "imagesTr" / f"{case}_0000.nii.gz", target)
    return target


def test_the_model_commands_from_the_command_line(
    trained: tuple[Path, Path, Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """find-best, predict (folder and bundle, --continue), ensemble, postprocess, export-model, import-model."""
    from autoseg.io import read_image

    dataset, pre, results, _ = trained
    model = results / "Dataset020_Tiny"
    common = ["--preprocessed", str(pre), "--results", str(results)]
    assert main(["-q", "find-best", str(dataset), *common, "-c", *CONFIGS, "-f", "0", "1"]) == 0
    assert "chosen:" in capsys.readouterr().out

    images = _input_folder(dataset, tmp_path / "in")
    out = tmp_path / "out"
    assert main(["-q", "predict", "-i", str(images), "-o", str(out), "-m", str(model), "--device", "cpu"]) == 0
    assert "2 case(s) written" in capsys.readouterr().out
    for case in ("case00", "case03"):
        segmentation, geometry = read_image(out / f"{case}.nii.gz")
        _, input_geometry = read_image(images / f"{case}_0000.nii.gz")
        assert geometry.matches(input_geometry, tolerance=1e-6) == [] and segmentation.shape == (16, 20, 18)
    assert main(["-q", "predict", "-i", str(images), "-o", str(out), "-m", str(model), "--continue"]) == 0
    assert "0 case(s) written" in capsys.readouterr().out

    bundle = tmp_path / "model.zip"
    assert main(["-q", "export-model", str(model), "-o", str(bundle)]) == 0
    from_bundle = tmp_path / "out_bundle"
    assert main(["-q", "predict", "-i", str(images), "-o", str(from_bundle), "-m", str(bundle), "--device", "cpu"]) == 0
    for case in ("case00", "case03"):
        a, _ = read_image(out / f"{case}.nii.gz")
        b, _ = read_image(from_bundle / f"{case}.nii.gz")
        assert (a == b).all(), case
    assert main(["-q", "import-model", str(bundle), "--results", str(tmp_path / "imported")]) == 0
    assert (tmp_path / "imported" / "Dataset020_Tiny" / "best.json").is_file()

    validation = [model / f"default__default__{c}" / "fold_0" / "validation" for c in CONFIGS]
    assert main(["-q", "ensemble", *map(str, validation), "-o", str(tmp_path / "ens")]) == 0
    assert sorted(p.name for p in (tmp_path / "ens").glob("*.nii.gz")) == sorted(
        p.name for p in validation[0].glob("*.nii.gz")
    )
    assert main(["-q", "postprocess", str(tmp_path / "ens"), "-o", str(tmp_path / "pp"), "-m", str(model)]) == 0
    assert len(list((tmp_path / "pp").glob("*.nii.gz"))) == len(list((tmp_path / "ens").glob("*.nii.gz")))
    capsys.readouterr()

    (images / "case03_0000.nii.gz").rename(images / "case03_0001.nii.gz")  # channel 0 missing, an extra one
    assert main(["-q", "predict", "-i", str(images), "-o", str(tmp_path / "bad"), "-m", str(model)]) == 2
    err = capsys.readouterr().err
    assert "case03" in err and not (tmp_path / "bad").exists()
