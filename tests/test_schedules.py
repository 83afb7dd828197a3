"""Learning-rate schedules and early stopping: hand-checked values, the flags, and an early stop end to end."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
from conftest import write_dataset

from autoseg.cli import build_parser, main, train_options
from autoseg.errors import AutosegError
from autoseg.folds import FoldJob, _train_argv
from autoseg.paths import Paths
from autoseg.pipeline import plan_and_preprocess
from autoseg.training.progress import EpochRecord
from autoseg.training.schedules import PolyLR, WarmupCosineLR
from autoseg.training.trainer import TRAINERS, TrainOptions, early_stopping_reason

CONFIG = "3d_fullres"


def test_warmup_cosine_by_hand() -> None:
    # 11 epochs, warm-up round(0.2 · 11) = 2 epochs: 0.005, 0.01; then the cosine from epoch 1 over 10 epochs.
    s = WarmupCosineLR(0.01, warmup_fraction=0.2)
    assert s.warmup_epochs(11) == 2
    assert s.lr(0, 11) == pytest.approx(0.005)
    assert s.lr(1, 11) == pytest.approx(0.01)  # end of warm-up: the full rate
    assert s.lr(2, 11) == pytest.approx(0.005 * (1 + math.cos(math.pi / 10)))  # 0.0097553
    assert s.lr(6, 11) == pytest.approx(0.005)  # midway, t = 5/10: half the rate
    assert s.lr(10, 11) == pytest.approx(0.005 * (1 - math.cos(math.pi / 10)))  # last epoch, 0.00024472
    assert s.lr(11, 11) == pytest.approx(0.0)
    floored = WarmupCosineLR(0.01, warmup_fraction=0.2, min_lr=0.001)
    assert floored.lr(6, 11) == pytest.approx(0.0055)  # 0.001 + 0.009 / 2
    assert floored.lr(11, 11) == pytest.approx(0.001)


def test_warmup_cosine_short_runs_and_defaults() -> None:
    s = WarmupCosineLR(0.01)  # 5 %: 50 warm-up epochs of 1000, at least one
    assert s.warmup_epochs(1000) == 50 and s.warmup_epochs(2) == 1 and s.warmup_epochs(1) == 1
    assert s.lr(0, 1000) == pytest.approx(0.0002) and s.lr(49, 1000) == pytest.approx(0.01)
    assert s.lr(0, 2) == pytest.approx(0.01) and s.lr(1, 2) == pytest.approx(0.005)  # fast-dev-run: no ramp
    rates = [s.lr(e, 1000) for e in range(1000)]
    assert all(a < b for a, b in itertools.pairwise(rates[:50]))  # rising to epoch 49
    assert all(a > b for a, b in itertools.pairwise(rates[49:]))  # falling from there
    assert PolyLR(0.01).lr(0, 1000) == pytest.approx(0.01)  # the default is untouched
    with pytest.raises(AutosegError, match="warmup_fraction"):
        WarmupCosineLR(0.01, warmup_fraction=1.0)
    with pytest.raises(AutosegError, match="min_lr"):
        WarmupCosineLR(0.01, min_lr=0.1)


def register_cosine_warmup() -> None:
    """Registers it until pyproject's entry points list it; imported late, as test_cli's `list trainers`
    check expects `default` to sort first."""
    import autoseg.trainers.cosine_warmup  # noqa: F401


def test_cosine_warmup_is_registered_with_a_docstring() -> None:
    register_cosine_warmup()
    trainer = TRAINERS.get("cosine_warmup")
    assert trainer.__doc__ and "\n" not in trainer.__doc__.strip()


def records(ema: list[float | None]) -> list[EpochRecord]:
    return [EpochRecord(i, 1.0, 1.0, (v,), v, v, 0.01, 1.0, False) for i, v in enumerate(ema)]


def test_early_stopping_rule_by_hand() -> None:
    ema = [0.1, 0.3, 0.5, 0.5, 0.4, 0.45]  # best 0.5 at epoch 2; an equal value is no improvement
    assert early_stopping_reason(records(ema[:5]), patience=3, min_epochs=0) is None  # 2 epochs without
    reason = early_stopping_reason(records(ema), patience=3, min_epochs=0)
    assert reason == (
        "early stopping: moving-average pseudo Dice did not improve for 3 epochs (best 0.5000 at epoch 2)"
    )
    assert early_stopping_reason(records(ema), patience=3, min_epochs=7) is None  # too few epochs yet
    assert early_stopping_reason(records(ema), patience=4, min_epochs=0) is None
    assert early_stopping_reason(records([None, None, None]), patience=1, min_epochs=0) is None  # nothing to judge
    assert early_stopping_reason([], patience=1, min_epochs=0) is None
    with pytest.raises(AutosegError, match="--early-stopping-patience"):
        TrainOptions(early_stopping_patience=0)
    with pytest.raises(AutosegError, match="--early-stopping-min-epochs"):
        TrainOptions(early_stopping_min_epochs=-1)


FLAGS = ["--early-stopping-patience", "7", "--early-stopping-min-epochs", "30"]


@pytest.mark.parametrize("command", [["train", "D", "3d_fullres", "0"], ["plan-and-train", "D"]])
def test_flags_reach_train_options(command: list[str]) -> None:
    options = train_options(build_parser().parse_args(["-q", *command, *FLAGS]))
    assert options.early_stopping_patience == 7 and options.early_stopping_min_epochs == 30
    default = train_options(build_parser().parse_args(["-q", *command]))
    assert default.early_stopping_patience is None and default.early_stopping_min_epochs is None


def test_subprocess_argv_carries_the_early_stopping_options(tmp_path: Path) -> None:
    options = TrainOptions(epochs=9, early_stopping_patience=7, early_stopping_min_epochs=30, show_progress=False)
    job = FoldJob(CONFIG, 2, tmp_path)
    argv = _train_argv(job, tmp_path, Paths(tmp_path / "p", tmp_path / "r"), "default", "default", options, "cpu", ())
    assert argv[argv.index("--early-stopping-patience") + 1] == "7"
    parsed = train_options(build_parser().parse_args(argv[argv.index("-q") :]))
    assert parsed.early_stopping_patience == 7 and parsed.early_stopping_min_epochs == 30 and parsed.epochs == 9
    plain = _train_argv(job, tmp_path, Paths(tmp_path / "p", tmp_path / "r"), "default", "default",
                        TrainOptions(), "cpu", ())  # fmt: skip
    assert not any(a.startswith("--early-stopping") for a in plain)


def test_early_stop_writes_final_checkpoint_validation_and_reason(tmp_path: Path) -> None:
    """At lr 0 the network never changes, so the averaged pseudo Dice stops improving within a few epochs."""
    register_cosine_warmup()
    dataset = write_dataset(tmp_path / "Dataset011_Tiny", n_cases=5, shape=(16, 20, 18))
    pre, results = tmp_path / "pre", tmp_path / "results"
    plan_and_preprocess(dataset, Paths(pre), configurations=[CONFIG], num_workers=1, show_progress=False)
    argv = ["-q", "train", str(dataset), CONFIG, "0", "--preprocessed", str(pre), "--results", str(results),
            "--trainer", "cosine_warmup", "--epochs", "20", "--iterations-per-epoch", "2", "--val-iterations", "1",
            "--num-workers", "0", "--no-tta", "--device", "cpu", "--lr", "0",
            "--early-stopping-patience", "1", "--early-stopping-min-epochs", "2"]  # fmt: skip
    assert main(argv) == 0
    fold = results / dataset.name / f"cosine_warmup__default__{CONFIG}" / "fold_0"
    run = json.loads((fold / "run.json").read_text())
    log = [json.loads(line) for line in (fold / "log.jsonl").read_text().splitlines()]
    assert run["status"] == "finished" and run["epochs"] == 20
    assert 2 <= run["epochs_done"] == len(log) < 20
    assert run["stop_reason"].startswith("early stopping: moving-average pseudo Dice did not improve for 1 epoch (")
    expected = early_stopping_reason([EpochRecord(**{**r, "pseudo_dice": tuple(r["pseudo_dice"])}) for r in log], 1, 2)
    assert run["stop_reason"] == expected
    assert (fold / "checkpoint_final.pt").is_file() and (fold / "validation" / "summary.json").is_file()
    from autoseg.folds import fold_state

    assert fold_state(fold, 20) == "finished"  # the budget counts, not the epochs trained
    # Resumed with the same rule it trains no further epoch: the rule is read from the restored log.
    assert main([*argv, "--resume"]) == 0
    again = json.loads((fold / "run.json").read_text())
    assert again["epochs_done"] == run["epochs_done"] and again["stop_reason"] == run["stop_reason"]
    assert len((fold / "log.jsonl").read_text().splitlines()) == len(log)
