"""``autoseg pretrain``: block masks and the masked loss checked by hand, one end-to-end CLI run, bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import IDENTITY, write_dataset

from autoseg.cli import main
from autoseg.errors import AutosegError
from autoseg.io import Geometry, write_image
from autoseg.networks import build_network
from autoseg.plan import NetworkPlan
from autoseg.pretrain import (
    MaskSettings,
    block_mask,
    masked_reconstruction_loss,
    reconstruction_step,
    sample_patches,
)
from autoseg.training.checkpoint import load_checkpoint

TINY_3D = NetworkPlan("plain_unet", (4, 8), ((3, 3, 3), (3, 3, 3)), ((1, 1, 1), (2, 2, 2)), (1, 1), (1,))
QUICK = ["--epochs", "2", "--iterations-per-epoch", "3", "--device", "cpu", "--num-workers", "1"]


def test_block_mask_hides_whole_blocks_at_the_ratio() -> None:
    # A 4x4 patch in 2x2 blocks of 2x2 voxels: half of the 4 blocks hidden, each one whole.
    mask = block_mask(3, (4, 4), MaskSettings(mask_ratio=0.5, blocks_per_axis=2), torch.Generator().manual_seed(0))
    assert mask.shape == (3, 1, 4, 4) and mask.dtype == torch.bool
    blocks = mask.view(3, 2, 2, 2, 2).permute(0, 1, 3, 2, 4).reshape(3, 4, 4)  # (sample, block, voxels of block)
    assert torch.all(blocks.all(-1) | ~blocks.any(-1))  # every block all hidden or all visible
    assert blocks.all(-1).sum(1).tolist() == [2, 2, 2]
    # The training patch of the tests: blocks of 2x3x3 voxels, 8x7x6 = 336 of them, round(0.6 * 336) = 202
    # hidden; the last row of 3-voxel blocks along y is cut to 2 voxels, so the voxel fraction is near 0.6.
    settings = MaskSettings()
    mask = block_mask(4, (16, 20, 18), settings, torch.Generator().manual_seed(1))
    fractions = mask.float().mean((1, 2, 3, 4))
    assert torch.all((fractions - 0.6).abs() < 0.03), fractions
    grid = mask[:, 0, ::2, ::3, ::3]  # one voxel per block
    assert grid.shape == (4, 8, 7, 6) and grid.flatten(1).sum(1).tolist() == [202] * 4
    again = block_mask(4, (16, 20, 18), settings, torch.Generator().manual_seed(1))
    assert torch.equal(mask, again) and not torch.equal(mask[0], mask[1])
    # An edge shorter than blocks_per_axis gets one block per voxel.
    assert block_mask(1, (3, 16), settings).shape == (1, 1, 3, 16)


def test_loss_counts_only_hidden_voxels() -> None:
    prediction = torch.tensor([[[[1.0, 5.0], [7.0, 3.0]]]], requires_grad=True)
    target = torch.zeros(1, 1, 2, 2)
    weight = torch.tensor([[[[True, False], [False, True]]]])
    assert masked_reconstruction_loss(prediction, target, weight, "l1").item() == pytest.approx((1 + 3) / 2)
    assert masked_reconstruction_loss(prediction, target, weight, "mse").item() == pytest.approx((1 + 9) / 2)
    loss = masked_reconstruction_loss(prediction, target, weight, "l1")
    loss.backward()
    assert prediction.grad is not None
    assert prediction.grad.tolist() == [[[[0.5, 0.0], [0.0, 0.5]]]]  # visible voxels get no gradient
    # Two channels share the mask: the mean runs over both channels' hidden voxels.
    two = torch.tensor([[[[1.0, 5.0], [7.0, 3.0]], [[2.0, 0.0], [0.0, 4.0]]]])
    assert masked_reconstruction_loss(two, torch.zeros(1, 2, 2, 2), weight).item() == pytest.approx(10 / 4)
    empty = masked_reconstruction_loss(prediction, target, torch.zeros_like(weight))
    assert empty.item() == 0.0 and empty.requires_grad


def test_reconstruction_steps_lower_the_loss_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    network = build_network(TINY_3D, 1, 1, deep_supervision=False)
    optimizer = torch.optim.AdamW(network.parameters(), lr=3e-3)
    z, y, x = torch.meshgrid(*[torch.linspace(-1, 1, 8)] * 3, indexing="ij")
    image = (torch.sin(3 * z) + torch.cos(2 * y) * x)[None, None].repeat(2, 1, 1, 1, 1)
    settings = MaskSettings(mask_ratio=0.5, blocks_per_axis=4)
    hidden = block_mask(2, (8, 8, 8), settings, torch.Generator().manual_seed(0))
    valid = torch.ones_like(hidden)
    losses = [reconstruction_step(network, optimizer, image, hidden, valid, settings).item() for _ in range(40)]
    assert losses[-1] < 0.5 * losses[0], losses


def test_mixed_precision_step_scores_in_float32() -> None:
    """The CUDA paths (bf16 autocast; fp16 with a gradient scaler), exercised on the CPU."""
    torch.manual_seed(0)
    network = build_network(TINY_3D, 2, 2, deep_supervision=False)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    image = torch.randn(1, 2, 8, 8, 8)
    settings = MaskSettings()
    hidden = block_mask(1, (8, 8, 8), settings, torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in network.parameters()]
    loss = reconstruction_step(
        network, optimizer, image, hidden, torch.ones_like(hidden), settings, torch.bfloat16,
        torch.amp.GradScaler("cpu"),
    )  # fmt: skip
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(not torch.equal(a, b) for a, b in zip(before, network.parameters()))


def test_patches_are_padded_and_padding_is_invalid(tmp_path: Path) -> None:
    volume = np.arange(4 * 6 * 5, dtype=np.float32).reshape(1, 4, 6, 5) + 1
    np.save(tmp_path / "a.npy", volume)
    images, valid = sample_patches([tmp_path / "a.npy"], (8, 8, 8), 2, np.random.default_rng(0))
    assert images.shape == (2, 1, 8, 8, 8) and valid.shape == (2, 1, 8, 8, 8)
    assert valid.sum((1, 2, 3, 4)).tolist() == [4 * 6 * 5] * 2
    assert np.all(images[~valid] == 0) and np.all(images[valid] > 0)
    assert sorted(images[0][valid[0]].tolist()) == sorted(volume.ravel().tolist())  # the whole image, once
    slices, valid = sample_patches([tmp_path / "a.npy"], (4, 4), 3, np.random.default_rng(0))  # 2D: one slice
    assert slices.shape == (3, 1, 4, 4) and valid.all()


@pytest.fixture(scope="module")
def dataset_and_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 3-case labelled dataset (not planned yet) and 4 unlabelled images: its 3 images renamed plus one
    smaller than the patch."""
    root = tmp_path_factory.mktemp("pretrain")
    dataset = write_dataset(root / "Dataset020_Pretrain", n_cases=3, shape=(16, 20, 18))
    images = root / "unlabelled"
    images.mkdir()
    for i, source in enumerate(sorted((dataset / "imagesTr").glob("*.nii.gz"))):
        shutil.copyfile(source, images / f"scan{i}_0000.nii.gz")
    small = np.zeros((10, 12, 12), np.float32)
    small[2:8, 3:9, 3:9] = 120
    write_image(small, Geometry((2.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY), images / "small_0000.nii.gz")
    return dataset, images


def test_pretrain_command_writes_a_checkpoint_that_segmentation_can_start_from(
    dataset_and_images: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset, images = dataset_and_images
    pre, results = tmp_path / "preprocessed", tmp_path / "results"
    args = ["pretrain", str(dataset), "--images", str(images), "--preprocessed", str(pre), "--results", str(results)]
    assert main(["-q", *args, *QUICK]) == 0
    printed = capsys.readouterr().out
    folder = results / dataset.name / "pretrain__default__3d_fullres"
    assert "pretrained 2 epoch(s) on 4 image(s): reconstruction loss" in printed and f"--pretrained {folder}" in printed
    assert (pre / dataset.name / "plans" / "default.json").is_file()  # planned on the way

    state, meta = load_checkpoint(folder / "checkpoint_final.pt")
    plan = json.loads((folder / "plan.json").read_text())
    assert json.loads((folder / "dataset.json").read_text()) == json.loads((dataset / "dataset.json").read_text())
    conf = plan["configurations"]["3d_fullres"]
    expected = {"task": "masked_reconstruction", "trainer": "pretrain", "fold": "all", "dataset": dataset.name,
                "planner": "default", "configuration": "3d_fullres", "num_input_channels": 1, "labels": {},
                "epochs": 2, "num_images": 4, "network": conf["network"]}  # fmt: skip
    assert {k: meta[k] for k in expected} == expected
    assert meta["mask"] == {"mask_ratio": 0.6, "blocks_per_axis": 8, "fill_value": 0.0, "loss": "l1"}
    assert [r["epoch"] for r in meta["log"]] == [0, 1] and all(np.isfinite(r["loss"]) for r in meta["log"])
    progress = json.loads((folder / "progress.json").read_text())
    assert progress["status"] == "finished" and progress["log"] == meta["log"]
    assert progress["batch_size"] == min(conf["batch_size"], 4) and progress["patch_size"] == conf["patch_size"]

    from autoseg import serialization
    from autoseg.plan import Plan

    network_plan = serialization.load(Plan, folder / "plan.json").configurations["3d_fullres"].network
    build_network(network_plan, 1, 1, deep_supervision=False).load_state_dict(state["network"])
    segmentation = build_network(network_plan, 1, 3, deep_supervision=True).state_dict()
    differing = {k for k, v in state["network"].items() if k not in segmentation or segmentation[k].shape != v.shape}
    assert differing and all(k.startswith("heads.") for k in differing)  # only the output heads are new

    cache = pre / dataset.name / f"pretrain_{conf['data_identifier']}"
    cached = sorted(p.name for p in cache.glob("*.npy"))
    assert cached == ["scan0.npy", "scan1.npy", "scan2.npy", "small.npy"]
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.npy")}

    assert main(["-q", *args, *QUICK]) == 2  # never silently over a finished run
    assert "--overwrite" in capsys.readouterr().err
    assert main(["-q", *args, *QUICK, "--overwrite", "--epochs", "1"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.npy")} == stamps  # the cache was reused
    assert load_checkpoint(folder / "checkpoint_final.pt")[1]["epochs"] == 1

    assert main(["-q", *args, *QUICK, "-c", "2d", "--epochs", "1"]) == 0  # 2D: slices of the stored volumes
    state_2d, meta_2d = load_checkpoint(results / dataset.name / "pretrain__default__2d" / "checkpoint_final.pt")
    assert meta_2d["configuration"] == "2d" and state_2d["network"]["heads.0.weight"].ndim == 4


def test_bad_inputs_name_the_problem(
    dataset_and_images: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset, images = dataset_and_images
    pre, out = tmp_path / "preprocessed", tmp_path / "out"

    def run(images_dir: Path, *extra: str) -> str:
        argv = ["-q", "pretrain", str(dataset), "--images", str(images_dir), "--preprocessed", str(pre), "-o", str(out)]
        assert main([*argv, *QUICK, *extra]) == 2
        return capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no cases found" in run(empty) and "CASE_0000.nii.gz (T1)" in run(empty)
    assert "no such folder" in run(tmp_path / "missing") and "--images" in run(tmp_path / "missing")
    extra = tmp_path / "extra"
    shutil.copytree(images, extra)
    shutil.copyfile(extra / "scan0_0000.nii.gz", extra / "scan0_0001.nii.gz")
    assert "extra channel 1" in run(extra)
    assert not (pre / dataset.name).exists()  # the images are checked before the dataset is planned
    assert "no configuration '3d_lowres'" in run(images, "-c", "3d_lowres")
    assert "--mask-ratio" in run(images, "--mask-ratio", "1.5")
    assert not out.exists()  # nothing was written by any of them
    with pytest.raises(AutosegError, match="--epochs 0"):
        from autoseg.paths import Paths
        from autoseg.pretrain import pretrain

        pretrain(dataset, Paths(pre), images, epochs=0)
