"""Training one fold end to end on CPU: files written, resume equality, interrupts, DDP, every trainer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_dataset

from autoseg.cli import main
from autoseg.errors import AutosegError
from autoseg.paths import Paths
from autoseg.pipeline import plan_and_preprocess, train
from autoseg.training import checkpoint as ckpt
from autoseg.training.trainer import TRAINERS, TrainOptions

CONFIG = "3d_fullres"
# Small enough for 2 CPU cores: 3 iterations of batch 2 on a 16x20x18 patch take well under a second.
# On the CPU everywhere (also on a GPU machine), so that the bit-for-bit resume checks are deterministic.
QUICK = {
    "iterations_per_epoch": 3,
    "val_iterations": 1,
    "num_workers": 0,
    "validation_mirroring": False,
    "device": "cpu",
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 5-case dataset, planned and preprocessed once for the whole module."""
    root = tmp_path_factory.mktemp("training")
    dataset = write_dataset(root / "Dataset010_Tiny", n_cases=5, shape=(16, 20, 18))
    pre = root / "preprocessed"
    plan_and_preprocess(dataset, Paths(pre), configurations=[CONFIG], num_workers=1, show_progress=False)
    return dataset, pre


def paths_for(prepared: tuple[Path, Path], tmp_path: Path) -> Paths:
    return Paths(prepared[1], tmp_path / "results")


def run_fold(prepared: tuple[Path, Path], paths: Paths, fold: int = 0, trainer: str = "default", **kw: object) -> Path:
    options = TrainOptions(**{**QUICK, "show_progress": False, **kw})  # type: ignore[arg-type]
    return train(prepared[0], paths, CONFIG, fold, trainer=trainer, options=options)


def network_state(folder: Path, name: str = "checkpoint_final.pt") -> dict[str, torch.Tensor]:
    state, _ = ckpt.load_checkpoint(folder / name)
    return state["network"]


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_fast_dev_run_writes_every_file(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    results = tmp_path / "results"
    code = main(
        ["-q", "train", str(prepared[0]), CONFIG, "1", "--preprocessed", str(prepared[1]), "--results", str(results),
         "--fast-dev-run", "--num-workers", "0", "--device", "cpu"]
    )  # fmt: skip
    assert code == 0
    fold = results / prepared[0].name / f"default__default__{CONFIG}" / "fold_1"
    for name in ("run.json", "log.jsonl", "progress.png", "checkpoint_latest.pt", "checkpoint_final.pt"):
        assert (fold / name).is_file(), name
    run = json.loads((fold / "run.json").read_text())
    assert run["status"] == "finished" and run["epochs"] == 2 and run["iterations_per_epoch"] == 2
    assert run["mirror_axes"] == [0, 1, 2] and run["device"] == "cpu" and run["precision"] == "float32"
    assert len((fold / "log.jsonl").read_text().splitlines()) == 2
    predictions = sorted((fold / "validation").glob("*.nii.gz"))
    assert len(predictions) == 1  # fold 1 of 5 cases holds out one case
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert "foreground_mean" in summary
    splits = json.loads((prepared[1] / prepared[0].name / "splits.json").read_text())
    assert [p.name.split(".")[0] for p in predictions] == splits[1]["val"]


def test_resume_after_finish_extends_and_equals_a_straight_run(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    straight = run_fold(prepared, Paths(prepared[1], tmp_path / "a"), epochs=2)
    paths = Paths(prepared[1], tmp_path / "b")
    first = run_fold(prepared, paths, epochs=1)
    assert json.loads((first / "run.json").read_text())["epochs_done"] == 1
    resumed = run_fold(prepared, paths, epochs=2, resume=True)
    assert_same_state(network_state(straight), network_state(resumed))
    log_a = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(line) for line in (resumed / "log.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in log_a] == [r["train_loss"] for r in log_b]


@pytest.mark.parametrize(("step", "call", "position"), [("train_step", 5, (1, 1)), ("val_step", 2, (1, 3))])
def test_interrupt_mid_epoch_saves_and_resumes_exactly(
    prepared: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    step: str,
    call: int,
    position: tuple[int, int],
) -> None:
    """Ctrl-C in the second epoch (in a training step, or in its validation) and --resume: same weights."""
    from autoseg.training.loop import Run

    straight = run_fold(prepared, Paths(prepared[1], tmp_path / "a"), epochs=2)
    original = getattr(Run, step)
    calls = {"n": 0}

    def interrupted(self: Run, batch: dict[str, object]) -> object:
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return original(self, batch)

    paths = Paths(prepared[1], tmp_path / "b")
    monkeypatch.setattr(Run, step, interrupted)
    with pytest.raises(AutosegError, match="--resume"):
        run_fold(prepared, paths, epochs=2)
    folder = paths.fold_dir(prepared[0].name, "default", "default", CONFIG, 0)
    _, meta = ckpt.load_checkpoint(folder / "checkpoint_latest.pt")
    assert (meta["position"]["epoch"], meta["position"]["iteration"]) == position
    assert json.loads((folder / "run.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(Run, step, original)
    resumed = run_fold(prepared, paths, epochs=2, resume=True)
    assert_same_state(network_state(straight), network_state(resumed))
    log_a = (straight / "log.jsonl").read_text().splitlines()
    log_b = (resumed / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["train_loss"] for x in log_a] == [json.loads(x)["train_loss"] for x in log_b]


@pytest.mark.parametrize("workers", ["0", "2"])
def test_sigterm_saves_the_state_and_exits_130(prepared: tuple[Path, Path], tmp_path: Path, workers: str) -> None:
    """A scheduler's SIGTERM while training: the latest state is written and --resume finishes the run.

    With loader workers the signal goes to the whole process group, as Slurm or ``kill -- -PGID`` send it.
    """
    import signal
    import time

    results = tmp_path / "results"
    command = [
        sys.executable, "-m", "autoseg", "-q", "train", str(prepared[0]), CONFIG, "0",
        "--preprocessed", str(prepared[1]), "--results", str(results), "--epochs", "500",
        "--iterations-per-epoch", "3", "--val-iterations", "1", "--num-workers", workers, "--no-tta",
    ]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    fold = results / prepared[0].name / f"default__default__{CONFIG}" / "fold_0"
    deadline = time.monotonic() + 120
    while not (fold / "log.jsonl").is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "--resume" in stderr
    _, meta = ckpt.load_checkpoint(fold / "checkpoint_latest.pt")
    done = meta["position"]["epoch"]
    assert done >= 1 and json.loads((fold / "run.json").read_text())["status"] == "interrupted"
    code = main(
        ["-q", "train", str(prepared[0]), CONFIG, "0", "--preprocessed", str(prepared[1]), "--results", str(results),
         "--epochs", str(done + 1), "--iterations-per-epoch", "3", "--val-iterations", "1", "--num-workers", "0",
         "--no-tta", "--resume"]
    )  # fmt: skip
    assert code == 0
    assert json.loads((fold / "run.json").read_text())["status"] == "finished"


def test_sigterm_while_writing_the_epoch_files_waits_for_them() -> None:
    """A SIGTERM inside the end-of-epoch writes (matplotlib's drawing) is raised after them, not inside."""
    import signal
    import time

    from autoseg.training.loop import _SIGTERM

    finished = []
    with _SIGTERM.installed():
        with pytest.raises(KeyboardInterrupt), _SIGTERM.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs here, in the main thread
            finished.append("plot written")
        assert finished == ["plot written"]
        with pytest.raises(KeyboardInterrupt):  # outside the block it interrupts at once
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            finished.append("not reached")
        with _SIGTERM.deferred():  # nothing pending: the block ends normally
            pass
    assert finished == ["plot written"]
    assert signal.getsignal(signal.SIGTERM) != _SIGTERM.handler  # the previous handler is back


def test_existing_run_needs_resume_or_overwrite(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    paths = paths_for(prepared, tmp_path)
    run_fold(prepared, paths, epochs=1)
    with pytest.raises(AutosegError, match="--resume"):
        run_fold(prepared, paths, epochs=1)
    run_fold(prepared, paths, epochs=2, resume=True)
    with pytest.raises(AutosegError, match="cannot shorten"):
        run_fold(prepared, paths, epochs=1, resume=True)
    folder = run_fold(prepared, paths, epochs=1, overwrite=True)
    assert json.loads((folder / "run.json").read_text())["epochs_done"] == 1


@pytest.mark.parametrize("damage", ["truncate", "flip", "pickle"])
def test_damaged_checkpoint_is_refused(prepared: tuple[Path, Path], tmp_path: Path, damage: str) -> None:
    paths = paths_for(prepared, tmp_path)
    folder = run_fold(prepared, paths, epochs=1)
    latest = folder / "checkpoint_latest.pt"
    data = bytearray(latest.read_bytes())
    if damage == "truncate":
        latest.write_bytes(bytes(data[: len(data) // 2]))
        expected = "damaged"
    elif damage == "flip":
        state, _ = ckpt.load_checkpoint(latest)
        state["network"][next(iter(state["network"]))].view(-1)[0] += 1.0  # a changed tensor, old checksum
        payload = torch.load(latest, weights_only=True)
        payload["state"] = state
        torch.save(payload, latest)
        expected = "checksum"
    else:
        torch.save({"format": "autoseg-checkpoint", "evil": Path("/")}, latest)  # needs unpickling a class
        expected = "never unpickles"
    with pytest.raises(AutosegError, match=expected):
        run_fold(prepared, paths, epochs=2, resume=True)


def test_fold_beyond_splits_names_the_file(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(AutosegError, match="splits.json"):
        run_fold(prepared, paths_for(prepared, tmp_path), fold=7, epochs=1)


@pytest.mark.parametrize("trainer", TRAINERS.names())
def test_every_registered_trainer_runs(prepared: tuple[Path, Path], tmp_path: Path, trainer: str) -> None:
    """The automatic smoke test: every trainer the registry knows trains a fast-dev-run fold."""
    folder = run_fold(prepared, paths_for(prepared, tmp_path), trainer=trainer, fast_dev_run=True, num_workers=0)
    assert (folder / "checkpoint_final.pt").is_file()
    assert json.loads((folder / "run.json").read_text())["status"] == "finished"


CUSTOM_TRAINER = '''
"""A lab's own trainer, kept in one file."""
from autoseg.training.trainer import Trainer, register_trainer


@register_trainer("lab_short")
class LabShortTrainer(Trainer):
    """Ten epochs at half the learning rate."""

    epochs = 10
    initial_lr = 5e-3
'''


def test_plugin_file_trainer_is_listed_and_trains(
    prepared: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plugin = tmp_path / "lab_trainer.py"
    plugin.write_text(CUSTOM_TRAINER)
    assert main(["--plugins", str(plugin), "list", "trainers"]) == 0
    out = capsys.readouterr().out
    assert "lab_short" in out and "Ten epochs at half the learning rate." in out and "default" in out
    results = tmp_path / "results"
    code = main(
        ["-q", "--plugins", str(plugin), "train", str(prepared[0]), CONFIG, "0", "--trainer", "lab_short",
         "--preprocessed", str(prepared[1]), "--results", str(results), "--epochs", "1",
         "--iterations-per-epoch", "2", "--val-iterations", "1", "--num-workers", "0", "--no-tta"]
    )  # fmt: skip
    assert code == 0
    run = json.loads((results / prepared[0].name / f"lab_short__default__{CONFIG}" / "fold_0" / "run.json").read_text())
    assert run["initial_lr"] == 5e-3 and run["epochs"] == 1 and run["trainer"] == "lab_short"


def free_port() -> int:
    """A port no other process listens on, so that the test never collides with a run beside it."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_ddp_with_gloo_and_two_processes(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    results = tmp_path / "results"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        "-m", "autoseg", "train", str(prepared[0]), CONFIG, "0", "--preprocessed", str(prepared[1]),
        "--results", str(results), "--epochs", "2", "--iterations-per-epoch", "2", "--val-iterations", "1",
        "--num-workers", "0", "--no-tta", "--device", "cpu",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    fold = results / prepared[0].name / f"default__default__{CONFIG}" / "fold_0"
    run = json.loads((fold / "run.json").read_text())
    assert run["world_size"] == 2 and run["batch_size_per_process"] * 2 >= run["batch_size"]
    assert run["status"] == "finished"
    assert len((fold / "log.jsonl").read_text().splitlines()) == 2
    assert done.stdout.count("epoch 1: train loss") == 1, done.stdout  # the main process reports, once
    assert not list(fold.glob(".*"))  # no temporaries left by a second writer
    shutil.rmtree(results)


def test_short_run_on_the_example_dataset_beats_chance(tmp_path: Path) -> None:
    """A minute of CPU training on brain phantoms: whole-case Dice far above what guessing gives."""
    import numpy as np

    from autoseg.example import make_example_dataset
    from autoseg.io import read_image

    dataset = make_example_dataset(tmp_path / "raw", num_training=8, num_test=0, size=32, show_progress=False)
    paths = Paths(tmp_path / "pre", tmp_path / "results")
    plan_and_preprocess(dataset, paths, configurations=[CONFIG], num_workers=1, show_progress=False)
    options = TrainOptions(
        epochs=8, iterations_per_epoch=15, val_iterations=2, num_workers=0, show_progress=False, seed=1, device="cpu"
    )
    folder = train(dataset, paths, CONFIG, 0, options=options)
    summary = json.loads((folder / "validation" / "summary.json").read_text())
    dice = summary["foreground_mean"]["Dice"]
    # Chance: a guess that labels each voxel at random with the true class frequencies scores, per class,
    # Dice equal to that class's share of the voxels.
    shares = []
    for case in summary["metric_per_case"]:
        reference, _ = read_image(Path(case["reference_file"]))
        shares += [float(np.mean(reference == k)) for k in (1, 2, 3)]
    chance = float(np.mean(shares))
    print(f"whole-case foreground Dice {dice:.3f}, chance {chance:.3f}")
    assert dice > 0.4 and dice > 5 * chance, (dice, chance)


def test_the_readme_trainer_example_works(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    """The complete custom trainer shown in the README, run as a --plugins file, so the docs cannot rot."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("## Writing a trainer") :]
    code = section[section.index("```python") + len("```python") : section.index("```\n", section.index("```python"))]
    plugin = tmp_path / "my_trainer.py"
    plugin.write_text(code)
    results = tmp_path / "results"
    assert main(
        ["-q", "--plugins", str(plugin), "train", str(prepared[0]), CONFIG, "0", "--trainer", "dice_heavy",
         "--preprocessed", str(prepared[1]), "--results", str(results), "--fast-dev-run", "--num-workers", "0"]
    ) == 0  # fmt: skip
    run = json.loads(
        (results / prepared[0].name / f"dice_heavy__default__{CONFIG}" / "fold_0" / "run.json").read_text()
    )
    assert run["initial_lr"] == 5e-3 and run["augmentation"]["p_rotation"] == 0.4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compile_network", [False, True])
def test_fast_dev_run_on_cuda(prepared: tuple[Path, Path], tmp_path: Path, compile_network: bool) -> None:
    """Mixed precision (and torch.compile) on a GPU: the run finishes and says what it used."""
    folder = run_fold(
        prepared, paths_for(prepared, tmp_path), fast_dev_run=True, device="cuda", compile=compile_network
    )
    run = json.loads((folder / "run.json").read_text())
    assert run["status"] == "finished" and run["device"].startswith("cuda")
    assert run["precision"] in ("bfloat16", "float16") and run["compile"] == compile_network
    assert json.loads((folder / "validation" / "summary.json").read_text())["foreground_mean"]["Dice"] is not None
