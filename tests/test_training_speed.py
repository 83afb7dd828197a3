"""The training loop's speed options (issue 7) and scheduled augmentation: what runs where, and that batches
stay a pure function of (seed, rank, epoch, iteration) whichever path makes them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_training import CONFIG, paths_for, prepared, run_fold  # noqa: F401  (the module-scoped fixture)

from autoseg.augment.params import AugmentationParams
from autoseg.augment.pipeline import EpochAugmenters, spatial_setup, train_augmenter, validation_augmenter
from autoseg.cli import build_parser, train_options
from autoseg.data.device_batches import DeviceBatches
from autoseg.data.loader import BatchLoader, batch_random
from autoseg.errors import AutosegError
from autoseg.training.loop import _LossReadout, _should_compile
from autoseg.training.trainer import Trainer, TrainOptions, register_trainer

PATCH = (8, 8, 8)
DEFAULT = AugmentationParams()
NO_ARTEFACTS = dataclasses.replace(DEFAULT, p_gaussian_noise=0.0, p_gamma=0.0, p_rotation=0.0)


class _FixedSampler:
    """A sampler stand-in: the batch is a function of the generator, as PatchSampler's."""

    def __init__(self, size: tuple[int, ...]) -> None:
        self.size = size

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[str]]:
        image = rng.normal(size=(2, 1, *self.size)).astype(np.float32)
        label = (image > 0.5).astype(np.int16)
        return image, label, ["a", "b"]


def test_epoch_augmenters_share_one_chain_per_phase() -> None:
    by_epoch = [DEFAULT] * 3 + [NO_ARTEFACTS] * 2
    phases = EpochAugmenters.build(PATCH, by_epoch)
    assert [first for first, _, _ in phases.phases] == [0, 3]
    assert phases.at(0) is phases.at(2) and phases.at(3) is phases.at(4) and phases.at(0) is not phases.at(3)
    assert phases.params_at(1) == DEFAULT and phases.params_at(4) == NO_ARTEFACTS
    assert phases.at(99) is phases.at(4)  # a budget raised on resume keeps the last phase


def test_epoch_augmenters_refuse_a_phase_that_changes_the_sample_size() -> None:
    wider = dataclasses.replace(DEFAULT, rotation_3d_deg=5.0)
    with pytest.raises(AutosegError, match="epoch 2 cuts a sample"):
        EpochAugmenters.build(PATCH, [DEFAULT, DEFAULT, wider])


def test_loader_uses_the_phase_of_each_epoch() -> None:
    setup = spatial_setup(PATCH, DEFAULT)
    phases = EpochAugmenters.build(PATCH, [DEFAULT, NO_ARTEFACTS])
    loader = BatchLoader(_FixedSampler(setup.sample_size), phases, 2, num_workers=0, seed=5)  # type: ignore[arg-type]
    for epoch, params in ((0, DEFAULT), (1, NO_ARTEFACTS)):
        batch = next(loader.epoch(epoch))
        rng, augment_seed = batch_random(5, 0, epoch, 0)
        image, label, _ = _FixedSampler(setup.sample_size).sample(rng)
        expected, _ = train_augmenter(PATCH, setup, params)(image, label, augment_seed)
        assert torch.equal(batch["image"], torch.from_numpy(expected))
    loader.close()


class _Tapered(Trainer):
    """Default augmentation for the first epoch, none of the intensity changes afterwards."""

    def epoch_augmentations(self, epoch: int) -> AugmentationParams:
        return self.augmentation if epoch == 0 else NO_ARTEFACTS


register_trainer("test_tapered")(_Tapered)


def test_run_json_records_the_schedule_and_where_augmentation_ran(
    prepared: tuple[Path, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    folder = run_fold(prepared, paths_for(prepared, tmp_path), trainer="test_tapered", epochs=2)
    run = json.loads((folder / "run.json").read_text())
    assert run["status"] == "finished"
    schedule = run["augmentation_schedule"]
    assert [phase["first_epoch"] for phase in schedule] == [0, 1]
    assert schedule[1]["changed"] == {"p_gaussian_noise": 0.0, "p_gamma": 0.0, "p_rotation": 0.0}
    assert run["augmentation_device"] == "cpu" and run["augmentation_note"] is None
    assert run["compile"] is False and run["cuda_graphs"] is False
    plain = json.loads((run_fold(prepared, paths_for(prepared, tmp_path / "b"), epochs=1) / "run.json").read_text())
    assert plain["augmentation_schedule"] is None


def test_augmentation_option_is_checked() -> None:
    with pytest.raises(AutosegError, match="'cpu' or 'device'"):
        TrainOptions(augmentation="gpu")


def test_cli_speed_flags_reach_the_options_and_the_fold_processes(tmp_path: Path) -> None:
    from autoseg.folds import FoldJob, _train_argv
    from autoseg.paths import Paths

    parser = build_parser()
    args = parser.parse_args(["train", "D", "3d_fullres", "0", "--no-compile", "--augmentation", "device"])
    options = train_options(args)
    assert options.compile is False and options.augmentation == "device" and options.cuda_graphs is False
    args = parser.parse_args(["train", "D", "3d_fullres", "0", "--compile", "--cuda-graphs"])
    assert train_options(args).compile is True and train_options(args).cuda_graphs is True
    assert train_options(parser.parse_args(["train", "D", "3d_fullres", "0"])).compile is None
    job, paths = FoldJob("3d_fullres", 0, tmp_path), Paths(tmp_path, tmp_path)
    argv = _train_argv(job, tmp_path, paths, "default", "default", options, "cpu", [])
    assert "--no-compile" in argv and argv[argv.index("--augmentation") + 1] == "device"


def test_compile_defaults_to_cuda_only() -> None:
    assert _should_compile(None, torch.device("cpu"), False) is False
    assert _should_compile(True, torch.device("cpu"), False) is True
    assert _should_compile(False, torch.device("cuda"), False) is False


def test_loss_readout_reads_without_waiting() -> None:
    readout = _LossReadout(torch.device("cpu"))
    assert readout.ready() is None
    readout.request(torch.tensor(0.25))
    readout.request(torch.tensor(9.0))  # still pending: skipped, never blocks
    assert readout.ready() == 0.25
    assert readout.ready() is None
    readout.request(torch.tensor(0.5))
    assert readout.ready() == 0.5


def test_device_batches_without_augmenters_are_the_loader_batches() -> None:
    setup = spatial_setup(PATCH, DEFAULT)
    make = lambda: BatchLoader(_FixedSampler(PATCH), validation_augmenter(), 3, num_workers=0, seed=1)  # noqa: E731
    plain, moved = make(), DeviceBatches(make(), torch.device("cpu"))
    for a, b in zip(plain.epoch(2, start=1), moved.epoch(2, start=1), strict=True):
        assert torch.equal(a["image"], b["image"]) and b["label"].dtype == torch.int64
        assert torch.equal(a["label"].long(), b["label"]) and a["keys"] == b["keys"]
    assert setup.sample_size  # the setup is valid for the patch
    plain.close()
    moved.close()


def test_compact_batches_halve_the_bytes_and_widen_back_on_the_device() -> None:
    """float16 image and int8 label from the workers; on the device they are the plain batch rounded to
    float16, labels exact, and the training step sees float32 and int64 as before."""
    make = lambda compact: BatchLoader(  # noqa: E731
        _FixedSampler(PATCH), validation_augmenter(), 3, num_workers=0, seed=2, compact=compact
    )
    plain, compact = make(False), make(True)
    sent = next(iter(compact.epoch(0)))
    assert sent["image"].dtype == torch.float16 and sent["label"].dtype == torch.int8
    moved = DeviceBatches(make(True), torch.device("cpu"))
    for a, b in zip(plain.epoch(0), moved.epoch(0), strict=True):
        assert b["image"].dtype == torch.float32 and b["label"].dtype == torch.int64
        assert torch.equal(a["image"].half().float(), b["image"]) and torch.equal(a["label"].long(), b["label"])
        assert not torch.equal(a["image"], b["image"])  # the rounding is real, and bounded:
        assert torch.allclose(a["image"], b["image"], rtol=2**-11, atol=0)
    for loader in (plain, compact, moved):
        loader.close()


def test_compact_batch_keeps_what_does_not_fit() -> None:
    from autoseg.data.loader import compact_batch

    image = np.array([[1.0, -2.5], [70000.0, 0.0]], np.float32)  # beyond float16's 65504
    label = np.array([[-1, 0], [3, 200]], np.int16)  # a class beyond int8's 127
    kept_image, kept_label = compact_batch(image, label)
    assert kept_image.dtype == np.float32 and kept_label.dtype == np.int16
    assert np.array_equal(kept_image, image) and np.array_equal(kept_label, label)
    nan = np.array([np.nan, 1.0], np.float32)
    assert compact_batch(nan, label[:1])[0].dtype == np.float32
    small_image, small_label = compact_batch(image[:1], label[:1])
    assert small_image.dtype == np.float16 and small_label.dtype == np.int8
    assert np.array_equal(small_image, image[:1]) and np.array_equal(small_label, label[:1])


def test_unchanged_augmenter_passes_the_arrays_without_a_copy() -> None:
    image, label = np.zeros((1, 1, 4, 4), np.float32), np.ones((1, 1, 4, 4), np.int16)
    out_image, out_label = validation_augmenter()(image, label, seed=0)
    assert out_image is image and out_label is label


class _Recorder:
    """An augmenter that records the seed it was called with and marks the batch with it."""

    def __init__(self) -> None:
        self.seeds: list[int] = []

    def __call__(self, image: torch.Tensor, label: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.seeds.append(seed)
        return image + 1.0, label


def test_device_batches_augment_with_the_seed_of_each_batch() -> None:
    recorder = _Recorder()
    phases = EpochAugmenters([(0, DEFAULT, recorder)])  # type: ignore[list-item]
    loader = BatchLoader(_FixedSampler(PATCH), validation_augmenter(), 4, num_workers=0, seed=3, rank=1)
    batches = DeviceBatches(loader, torch.device("cpu"), phases, seed=3, rank=1)
    plain = BatchLoader(_FixedSampler(PATCH), validation_augmenter(), 4, num_workers=0, seed=3, rank=1)
    for a, b in zip(plain.epoch(1, start=2), batches.epoch(1, start=2), strict=True):
        assert torch.equal(a["image"] + 1.0, b["image"])
    assert recorder.seeds == [batch_random(3, 1, 1, i)[1] for i in (2, 3)]
    plain.close()
    batches.close()


def test_device_batches_with_the_device_augmenter_match_it_applied_by_hand() -> None:
    from autoseg.augment.device import DeviceAugmenter

    setup = spatial_setup(PATCH, DEFAULT)
    phases = EpochAugmenters.build(PATCH, [DEFAULT], make=DeviceAugmenter)
    make = lambda: BatchLoader(_FixedSampler(setup.sample_size), validation_augmenter(), 2, 0, seed=4)  # noqa: E731
    batches = DeviceBatches(make(), torch.device("cpu"), phases, seed=4)
    plain = make()
    augmenter = DeviceAugmenter(PATCH, setup, DEFAULT)
    for i, (a, b) in enumerate(zip(plain.epoch(0), batches.epoch(0), strict=True)):
        image, label = augmenter(a["image"], a["label"], batch_random(4, 0, 0, i)[1])
        assert b["image"].shape == (2, 1, *PATCH) and torch.equal(image, b["image"])
        assert torch.equal(label.long(), b["label"])
    plain.close()
    batches.close()


@pytest.mark.parametrize("trainer", ["default", "pediatric", "pediatric_artefacts"])
def test_a_fold_trains_with_device_augmentation(
    prepared: tuple[Path, Path],  # noqa: F811
    tmp_path: Path,
    trainer: str,
) -> None:
    """--augmentation device on CPU tensors (the ops are device-agnostic); the pediatric transforms have
    device twins, so nothing falls back to the CPU."""
    folder = run_fold(prepared, paths_for(prepared, tmp_path), trainer=trainer, epochs=1, augmentation="device")
    run = json.loads((folder / "run.json").read_text())
    assert run["status"] == "finished" and run["augmentation_device"] == "device" and run["augmentation_note"] is None


def test_cases_on_the_device_train_the_same_fold_as_the_workers(prepared: tuple[Path, Path], tmp_path: Path) -> None:  # noqa: F811
    """Batches cut from cases kept on the device are the workers' batches, so the same fold trains to the
    same weights; run.json says which path ran."""
    from test_training import assert_same_state, network_state

    runs = {}
    for choice in ("always", "never"):
        paths = paths_for(prepared, tmp_path / choice)
        runs[choice] = run_fold(prepared, paths, epochs=1, augmentation="device", cases_on_device=choice)
    record = {choice: json.loads((folder / "run.json").read_text()) for choice, folder in runs.items()}
    assert record["always"]["cases_on_device"] is True and record["always"]["num_workers"] == 0
    assert record["never"]["cases_on_device"] is False
    assert_same_state(network_state(runs["always"]), network_state(runs["never"]))


def test_cases_on_device_needs_device_augmentation(prepared: tuple[Path, Path], tmp_path: Path) -> None:  # noqa: F811
    folder = run_fold(
        prepared, paths_for(prepared, tmp_path), fast_dev_run=True, augmentation="cpu", cases_on_device="always"
    )
    run = json.loads((folder / "run.json").read_text())
    assert run["cases_on_device"] is False and "augmentation runs on the CPU" in run["cases_on_device_note"]
    automatic = run_fold(prepared, paths_for(prepared, tmp_path / "auto"), fast_dev_run=True, augmentation="device")
    assert json.loads((automatic / "run.json").read_text())["cases_on_device"] is False  # auto: CUDA only
    with pytest.raises(AutosegError, match="cases-on-device"):
        TrainOptions(cases_on_device="sometimes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_defaults_compile_and_augment_on_the_device(prepared: tuple[Path, Path], tmp_path: Path) -> None:  # noqa: F811
    folder = run_fold(prepared, paths_for(prepared, tmp_path), fast_dev_run=True, device="cuda")
    run = json.loads((folder / "run.json").read_text())
    assert run["status"] == "finished" and run["augmentation_device"] == "device"
    assert run["cases_on_device"] is True and run["num_workers"] == 0  # the tiny fold fits: batches cut there
    assert run["precision"] in ("bfloat16", "float16")
    from torch.utils._triton import has_triton

    assert run["compile"] is has_triton()
    assert (run["compile_seconds"] is not None) is has_triton()  # the warm-up is timed apart when compiled
