"""Fine-tuning from a pretrained model: what is loaded, re-initialised and adapted, the finetune trainer's frozen
encoder, ``plan --like``, and train --pretrained end to end through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_dataset

from autoseg import serialization
from autoseg.cli import main
from autoseg.errors import AutosegError
from autoseg.networks import build_network
from autoseg.paths import Paths
from autoseg.pipeline import plan_and_preprocess, train
from autoseg.plan import Configuration, NetworkPlan, Plan
from autoseg.training.checkpoint import save_checkpoint
from autoseg.training.pretrained import (
    PretrainedWeights,
    encoder_parameters,
    read_pretrained,
    transfer_state,
)
from autoseg.training.trainer import TrainingSetup, TrainOptions

TINY = NetworkPlan("plain_unet", (4, 8), ((3, 3, 3), (3, 3, 3)), ((1, 1, 1), (2, 2, 2)), (1, 1), (1,))
WIDER = NetworkPlan("plain_unet", (4, 16), ((3, 3, 3), (3, 3, 3)), ((1, 1, 1), (2, 2, 2)), (1, 1), (1,))
LABELS = {"background": 0, "outer": 1, "inner": 2}
OTHER_LABELS = {"background": 0, "lesion": 1, "core": 2}
HEADS = {"heads.0.weight", "heads.0.bias"}
STEM = "encoder.0.0.conv.weight"
CONFIG = "3d_fullres"
QUICK = {"iterations_per_epoch": 1, "val_iterations": 1, "num_workers": 0, "validation_mirroring": False}


def saved(tmp_path: Path, channels: int = 1, labels: dict[str, int] | None = None, classes: int = 3) -> Path:
    """A checkpoint of a freshly initialised TINY network, as training (or ``autoseg pretrain``) saves it."""
    torch.manual_seed(1)
    network = build_network(TINY, channels, classes)
    metadata = {"network": serialization.to_jsonable(TINY), "num_input_channels": channels, "dataset": "DatasetA"}
    if labels is not None:
        metadata["labels"] = labels
    path = tmp_path / "checkpoint_final.pt"
    save_checkpoint(path, {"network": network.state_dict()}, metadata)
    return path


def fresh(channels: int = 1, plan: NetworkPlan = TINY) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(2)
    network = build_network(plan, channels, 3)
    return network, {k: v.clone() for k, v in network.state_dict().items()}


def test_same_labels_load_everything(tmp_path: Path) -> None:
    weights = read_pretrained(saved(tmp_path, labels=LABELS))
    network, _ = fresh()
    summary = transfer_state(network, weights, LABELS, TINY, "A")
    assert summary.loaded_tensors == len(weights.state) and not summary.reinitialised
    for name, tensor in network.state_dict().items():
        assert torch.equal(tensor, weights.state[name]), name
    assert summary.line() == f"pretrained: loaded {len(weights.state)} tensors from {weights.source}"


@pytest.mark.parametrize(
    ("labels", "classes", "reason"),
    [(OTHER_LABELS, 3, "labels differ"), ({}, 1, "the pretrained model has no labels"), (None, 3, "no labels")],
)
def test_other_labels_reinitialise_the_heads(
    tmp_path: Path, labels: dict[str, int] | None, classes: int, reason: str
) -> None:
    """Other label names (same shapes), a self-supervised model (labels {}, 1 output), or no labels at all."""
    weights = read_pretrained(saved(tmp_path, labels=labels, classes=classes))
    network, before = fresh()
    summary = transfer_state(network, weights, LABELS, TINY, "A")
    after = network.state_dict()
    assert set(summary.reinitialised) == HEADS and reason in summary.line()
    assert summary.loaded_tensors == len(after) - 2
    for name in after:
        expected = before[name] if name in HEADS else weights.state[name]
        assert torch.equal(after[name], expected), name


def test_more_channels_get_the_mean_filter(tmp_path: Path) -> None:
    weights = read_pretrained(saved(tmp_path, channels=2, labels=LABELS))
    weights.state[STEM][:, 0] = 1.0
    weights.state[STEM][:, 1] = 3.0
    network, _ = fresh(channels=3)
    summary = transfer_state(network, weights, LABELS, TINY, "A")
    # The mean of the two old filters is 2, scaled by old/new channels = 2/3: 4/3 in each of the 3 channels.
    stem = network.state_dict()[STEM]
    assert stem.shape == (4, 3, 3, 3, 3)
    assert torch.allclose(stem, torch.full_like(stem, 4 / 3))
    assert summary.input_channels == (2, 3) and "first conv adapted 2->3 channels" in summary.line()
    assert torch.equal(network.state_dict()["encoder.0.0.conv.bias"], weights.state["encoder.0.0.conv.bias"])


def test_one_channel_to_two_keeps_the_response_to_a_repeated_image(tmp_path: Path) -> None:
    source = read_pretrained(saved(tmp_path, channels=1, labels=LABELS))
    old = build_network(TINY, 1, 3, deep_supervision=False)
    old.load_state_dict(source.state)
    network, _ = fresh(channels=2)
    transfer_state(network, source, LABELS, TINY, "A")
    network.deep_supervision = False
    image = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        assert torch.allclose(network(image.repeat(1, 2, 1, 1, 1)), old(image), atol=1e-5)


def test_another_topology_names_the_stage_and_the_fix(tmp_path: Path) -> None:
    weights = read_pretrained(saved(tmp_path, labels=LABELS))
    network, _ = fresh(plan=WIDER)
    with pytest.raises(AutosegError) as error:
        transfer_state(network, weights, LABELS, WIDER, "model_a")
    message = str(error.value)
    assert "encoder stage 1: features_per_stage 8 (pretrained) vs 16 (this plan)" in message
    assert "autoseg plan DATASET --like model_a" in message and "--planner like_DatasetA" in message


def test_a_missing_path_and_an_empty_folder_are_explained(tmp_path: Path) -> None:
    with pytest.raises(AutosegError, match="does not exist"):
        read_pretrained(tmp_path / "nothing")
    with pytest.raises(AutosegError, match="fold_<k>"):
        read_pretrained(tmp_path)


def tiny_setup(tmp_path: Path) -> TrainingSetup:
    conf = Configuration(CONFIG, "x", (1.0, 1.0, 1.0), (8, 8, 8), (8, 8, 8), 2, False, ("zscore",), (False,), TINY)
    plan = Plan(1, "D", "default", 8.0, (0, 1, 2), (0, 1, 2), (1.0,) * 3, (8,) * 3, ("T1",), LABELS, (), {CONFIG: conf})
    return TrainingSetup("D", plan, conf, 0, "finetune", (), tmp_path, tmp_path, tmp_path, ".nii.gz", tmp_path)


def test_finetune_freezes_the_encoder_for_the_first_epochs(tmp_path: Path) -> None:
    from autoseg.training.trainer import TRAINERS

    trainer = TRAINERS.get("finetune")(tiny_setup(tmp_path), TrainOptions(epochs=20, pretrained="set"))
    assert trainer.lr == 1e-3 and trainer.frozen_epochs == 2  # 10 % of 20 epochs
    network = trainer.build_network()
    optimizer = trainer.build_optimizer(network)
    encoder = {id(p) for p in encoder_parameters(network)}
    assert len(encoder) == 8  # two stages of one conv (weight, bias) and one norm (weight, bias)
    assert {n for n, p in network.named_parameters() if id(p) in encoder} == {
        n for n, _ in network.named_parameters() if n.startswith("encoder.")
    }

    def step() -> dict[str, torch.Tensor]:
        before = {n: p.detach().clone() for n, p in network.named_parameters()}
        optimizer.zero_grad(set_to_none=True)
        outputs = network(torch.randn(2, 1, 8, 8, 8))
        sum(o.square().mean() for o in outputs).backward()  # type: ignore[union-attr]
        optimizer.step()
        return before

    for epoch in (0, 1):
        trainer.on_epoch_start(epoch)
        before = step()
        for name, p in network.named_parameters():
            assert p.requires_grad == (id(p) not in encoder), name
            assert torch.equal(p, before[name]) == (id(p) in encoder), name
    trainer.on_epoch_start(2)
    before = step()
    assert all(p.requires_grad and not torch.equal(p, before[n]) for n, p in network.named_parameters())


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Dataset A (1 channel) planned and preprocessed; dataset B (2 channels, other labels and spacing)."""
    root = tmp_path_factory.mktemp("finetune")
    a = write_dataset(root / "Dataset010_Tiny", n_cases=5, shape=(16, 20, 18))
    b = write_dataset(
        root / "Dataset011_Other", n_cases=5, shape=(18, 18, 20), channels=2, spacing=(1.5, 1.2, 1.2),
        labels=OTHER_LABELS, seed=1,
    )  # fmt: skip
    pre = root / "preprocessed"
    plan_and_preprocess(a, Paths(pre), configurations=[CONFIG], num_workers=1, show_progress=False)
    return a, b, pre


def test_plan_like_and_train_pretrained_through_the_cli(
    two_datasets: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, pre = two_datasets
    paths = Paths(pre, tmp_path / "results")
    options = TrainOptions(**{**QUICK, "epochs": 1, "show_progress": False, "device": "cpu"})  # type: ignore[arg-type]
    fold_a = train(a, paths, CONFIG, 0, options=options)
    model_a = fold_a.parent

    # plan B like A: A's network, patch, spacing and batch; B's name, channels, labels and intensities.
    assert main(["-q", "plan", str(b), "--preprocessed", str(pre), "--like", str(model_a)]) == 0
    assert "--planner like_Dataset010_Tiny" in capsys.readouterr().out
    plan_a = serialization.load(Plan, model_a / "plan.json")
    like = serialization.load(Plan, pre / b.name / "plans" / "like_Dataset010_Tiny.json")
    assert (like.dataset_name, like.planner, like.labels) == (b.name, "like_Dataset010_Tiny", OTHER_LABELS)
    assert like.channel_names == ("T1", "T2") and like.transpose_forward == plan_a.transpose_forward
    assert like.foreground_intensity_per_channel != plan_a.foreground_intensity_per_channel
    for name, conf in plan_a.configurations.items():
        new = like.configurations[name]
        assert (new.network, new.patch_size, new.spacing_mm, new.batch_size) == (
            conf.network, conf.patch_size, conf.spacing_mm, conf.batch_size,
        )  # fmt: skip
        assert new.data_identifier == f"like_Dataset010_Tiny_{name}" and len(new.normalization) == 2

    # Train B from A's results folder (the model of this configuration, fold 0) with the finetune trainer.
    assert main(["-q", "preprocess", str(b), "--preprocessed", str(pre), "--planner", like.planner, "-c", CONFIG]) == 0
    code = main(
        ["-q", "train", str(b), CONFIG, "0", "--planner", like.planner, "--trainer", "finetune",
         "--preprocessed", str(pre), "--results", str(paths.results), "--pretrained", str(paths.results / a.name),
         "--epochs", "1", "--iterations-per-epoch", "1", "--val-iterations", "1", "--num-workers", "0",
         "--no-tta", "--device", "cpu"]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "re-initialised heads (labels differ), first conv adapted 1->2 channels" in out
    fold_b = paths.fold_dir(b.name, "finetune", like.planner, CONFIG, 0)
    run = json.loads((fold_b / "run.json").read_text())
    recorded = run["pretrained"]
    assert run["initial_lr"] == 1e-3 and recorded["path"] == str(paths.results / a.name)
    assert recorded["source"] == str(fold_a / "checkpoint_final.pt")
    assert recorded["choices"] == ["model default__default__3d_fullres (the only one of configuration 3d_fullres)",
                                   "fold_0: the only fold with weights"]  # fmt: skip
    assert recorded["input_channels"] == [1, 2] and recorded["reinitialised_reason"] == "labels differ"
    assert set(recorded["reinitialised"]) == {n for n in run_state(fold_b) if n.startswith("heads.")}

    # Resuming takes the weights from the checkpoint: --pretrained is not read again, and run.json keeps it.
    code = main(
        ["-q", "train", str(b), CONFIG, "0", "--planner", like.planner, "--trainer", "finetune", "--resume",
         "--preprocessed", str(pre), "--results", str(paths.results), "--pretrained", str(tmp_path / "gone"),
         "--epochs", "2", "--iterations-per-epoch", "1", "--val-iterations", "1", "--num-workers", "0",
         "--no-tta", "--device", "cpu"]
    )  # fmt: skip
    assert code == 0
    resumed = json.loads((fold_b / "run.json").read_text())
    assert resumed["epochs_done"] == 2 and resumed["pretrained"] == recorded

    # B's own plan has another topology: --pretrained names the stage and points to --like.
    assert main(["-q", "plan", str(b), "--preprocessed", str(pre)]) == 0
    own = serialization.load(Plan, pre / b.name / "plans" / "default.json").configurations[CONFIG].network
    assert own.num_stages == 2 and plan_a.configurations[CONFIG].network.num_stages == 3
    with pytest.raises(AutosegError, match=r"3 stages \(pretrained\) vs 2 \(this plan\).*--like"):
        transfer_state(build_network(own, 2, 3), read_pretrained(fold_a), OTHER_LABELS, own, fold_a)


def run_state(fold: Path) -> dict[str, torch.Tensor]:
    weights: PretrainedWeights = read_pretrained(fold)
    return weights.state


def test_folds_in_subprocesses_get_the_pretrained_flag(tmp_path: Path) -> None:
    from autoseg.folds import FoldJob, _train_argv

    job = FoldJob(CONFIG, 1, tmp_path / "fold_1")
    options = TrainOptions(pretrained=tmp_path / "model")
    paths = Paths(tmp_path, tmp_path)
    argv = _train_argv(job, tmp_path, paths, "finetune", "like_A", options, "cuda:1", ())
    assert argv[argv.index("--pretrained") + 1] == str(tmp_path / "model")
    assert "--pretrained" not in _train_argv(job, tmp_path, paths, "default", "default", TrainOptions(), "cuda:1", ())
