"""Self-supervised pretraining on unlabelled scans: masked-image reconstruction (``autoseg pretrain``).

The network of a plan's configuration learns to fill in hidden parts of scans that have no labels; its
weights then start a segmentation training (``autoseg train ... --pretrained DIR``) instead of a random
initialisation. The recipe is SimMIM's (Xie et al. 2022, "SimMIM: a simple framework for masked image
modeling") carried over to 3D medical images as in Swin UNETR's and Models Genesis' pretraining:

1. Preprocess: every image of ``--images`` (``CASE_XXXX<ending>``, the dataset's channel layout, checked
   from the headers first as ``autoseg predict`` does) goes through the plan's configuration exactly as a
   training case (crop to nonzero, normalise, resample), without a label. The results are cached, one
   ``CASE.npy`` and ``CASE.json`` each, under ``<preprocessed>/<dataset>/pretrain_<data_identifier>/``;
   a case is redone only when its source files changed (path, size, modification time) or the plan did.
2. Sample: random patches of the plan's patch size (2D configurations: a random slice), zero-padded where
   the image is smaller; padding never counts in the loss.
3. Mask: the patch is split into a grid of ``blocks_per_axis`` blocks along every axis and a random
   ``mask_ratio`` of the blocks is hidden (set to 0, the mean after z-score normalisation); blocks keep the
   task from being solved by interpolating neighbouring voxels.
4. Loss: L1 (SimMIM) or MSE (MAE) between the network's C-channel output and the original image, over the
   hidden voxels only; the visible ones are context, not targets.

The network is ``build_network(configuration.network, C, C, deep_supervision=False)``: the segmentation
architecture with a C-channel head, so every weight but the head's carries over to segmentation training.
The output folder (``<results>/<dataset>/pretrain__<planner>__<configuration>/`` unless ``output_dir``)
holds ``checkpoint_final.pt`` (autoseg's tensors-and-JSON format), ``plan.json``, ``dataset.json`` and
``progress.json`` (settings and the loss of every epoch, rewritten after each). A run is not resumable: an
interrupted one leaves ``progress.json`` saying "running" and no checkpoint. To pretrain on the labelled
training images as well, put copies (or links) of ``imagesTr`` into the ``--images`` folder.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from autoseg import atomic, serialization
from autoseg.data.sampling import crop_with_padding, sampling_bounds
from autoseg.dataset import DatasetSpec
from autoseg.errors import AutosegError
from autoseg.evaluation.best import PRETRAIN_TRAINER
from autoseg.inference.inputs import InputCase, find_input_cases, read_input_case
from autoseg.paths import Paths
from autoseg.plan import Configuration, Plan

CHECKPOINT_FILE = "checkpoint_final.pt"
PROGRESS_FILE = "progress.json"
TRAINER_NAME = PRETRAIN_TRAINER  # the model folder's first part and the checkpoint's "trainer"
TASK = "masked_reconstruction"
# Configurations tried when none is named: full resolution 3D, else 2D (a plan of 2D images has no 3D).
DEFAULT_CONFIGURATIONS = ("3d_fullres", "2d")

# SimMIM's default masking ratio (0.6, its best on ImageNet); Swin UNETR's and MAE-style medical
# pretraining mask 0.4-0.75 of the volume.
MASK_RATIO = 0.6
# The patch is cut into this many blocks per axis: a 128^3 patch into 16^3-voxel blocks (SimMIM masks
# 32-pixel blocks of a 192-pixel image, 1/6 of the edge; Models Genesis cuts 1/8-1/4 of the edge).
BLOCKS_PER_AXIS = 8
# Budget of a real run (the CLI's defaults): 100 epochs of 250 steps is a tenth of a segmentation training.
EPOCHS = 100
ITERATIONS_PER_EPOCH = 250
# AdamW at nnU-Net's nnUNetTrainerAdam1en3 rate with SimMIM's / MAE's weight decay of 0.05, on SimMIM's
# schedule (linear warm-up, cosine annealing).
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.05
GRAD_CLIP_NORM = 12.0  # nnU-Net's clip_grad_norm_ in train_step


@dataclass(frozen=True)
class MaskSettings:
    """How patches are hidden and scored; stored in the checkpoint as ``mask``."""

    mask_ratio: float = MASK_RATIO
    blocks_per_axis: int = BLOCKS_PER_AXIS
    fill_value: float = 0.0  # the z-scored intensity mean: a hidden block looks like "average tissue"
    loss: str = "l1"  # "l1" (SimMIM) or "mse" (MAE)

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise AutosegError(f"mask ratio {self.mask_ratio} (--mask-ratio) must lie strictly between 0 and 1")
        if self.blocks_per_axis < 1:
            raise AutosegError(f"blocks_per_axis {self.blocks_per_axis} must be >= 1")
        if self.loss not in ("l1", "mse"):
            raise AutosegError(f"reconstruction loss {self.loss!r} (--loss) must be 'l1' or 'mse'")


# -- masking and loss: pure tensor functions ---------------------------------------------------------------
def block_mask(
    batch_size: int,
    patch_size: Sequence[int],
    settings: MaskSettings,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A boolean (B, 1, *patch_size) mask, True where hidden.

    Each axis is cut into ``blocks_per_axis`` blocks of ``ceil(edge / blocks_per_axis)`` voxels (fewer
    blocks where the edge is shorter, the last one cut off by the patch), and exactly
    ``round(mask_ratio · blocks)`` blocks of each sample are hidden.
    """
    block = [math.ceil(edge / min(settings.blocks_per_axis, edge)) for edge in patch_size]
    grid = [math.ceil(edge / b) for edge, b in zip(patch_size, block)]
    cells = math.prod(grid)
    hidden = min(max(round(settings.mask_ratio * cells), 1), cells)
    coarse = torch.zeros((batch_size, cells), dtype=torch.bool)
    for b in range(batch_size):
        coarse[b, torch.randperm(cells, generator=generator)[:hidden]] = True
    mask = coarse.view(batch_size, 1, *grid)
    for axis, size in enumerate(block):
        mask = mask.repeat_interleave(size, dim=axis + 2)
    return mask[(slice(None), slice(None), *(slice(0, edge) for edge in patch_size))].contiguous()


def masked_reconstruction_loss(
    prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, kind: str = "l1"
) -> torch.Tensor:
    """Mean L1 or squared error over the voxels where ``weight`` (B, 1, *spatial) is True, all channels.

    Computed in float32 whatever the autocast dtype. Without any weighted voxel the loss is 0 (with a
    gradient), so an empty batch cannot make the run NaN.
    """
    error = prediction.float() - target.float()
    per_voxel = error.abs() if kind == "l1" else error.square()
    selected = weight.to(per_voxel.dtype).expand_as(per_voxel)
    return (per_voxel * selected).sum() / selected.sum().clamp_min(1.0)


def network_output(network: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """The full-resolution output, also of an architecture that returns a list."""
    output = network(image)
    return output[0] if isinstance(output, list | tuple) else output


def reconstruction_step(
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    image: torch.Tensor,
    hidden: torch.Tensor,
    valid: torch.Tensor,
    settings: MaskSettings,
    autocast_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """One optimisation step: hide ``hidden`` voxels of ``image``, reconstruct, score hidden and ``valid`` ones."""
    optimizer.zero_grad(set_to_none=True)
    context = torch.autocast(image.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with context:
        prediction = network_output(network, image.masked_fill(hidden, settings.fill_value))
    loss = masked_reconstruction_loss(prediction, image, hidden & valid, settings.loss)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(network.parameters(), GRAD_CLIP_NORM)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        nn.utils.clip_grad_norm_(network.parameters(), GRAD_CLIP_NORM)
        optimizer.step()
    return loss.detach()


# -- patches ------------------------------------------------------------------------------------------------
def sample_patches(
    files: Sequence[Path], patch_size: Sequence[int], batch_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 (B, C, *patch), valid bool (B, 1, *patch)): random patches of random cases.

    A 2D patch is cut from a random slice along the stored volume's first axis, as 2D training does.
    ``valid`` is False on the zero padding around an image smaller than the patch.
    """
    images, valid = [], []
    for index in rng.integers(0, len(files), batch_size):
        volume = np.load(files[int(index)], mmap_mode="r", allow_pickle=False)
        if len(patch_size) == 2:
            volume = volume[:, int(rng.integers(volume.shape[1]))]
        spatial = volume.shape[1:]
        starts = [int(rng.integers(lo, hi + 1)) for lo, hi in sampling_bounds(spatial, patch_size, patch_size)]
        images.append(crop_with_padding(volume, starts, patch_size, 0.0, np.float32))
        inside = np.zeros(tuple(patch_size), dtype=bool)
        inside[tuple(slice(max(-s, 0), min(n - s, p)) for s, n, p in zip(starts, spatial, patch_size))] = True
        valid.append(inside[None])
    return np.stack(images), np.stack(valid)


# -- preprocessing of the unlabelled images -----------------------------------------------------------------
def pretrain_data_dir(paths: Paths, dataset: str, configuration: Configuration) -> Path:
    return paths.dataset_dir(dataset) / f"pretrain_{configuration.data_identifier}"


def _sources(case: InputCase) -> list[dict[str, Any]]:
    """What identifies the files a cached case was made from."""
    out = []
    for path in case.image_files:
        stat = path.stat()
        out.append({"file": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return out


def _is_cached(folder: Path, case: InputCase) -> bool:
    image, record = folder / f"{case.case_id}.npy", folder / f"{case.case_id}.json"
    try:
        np.load(image, mmap_mode="r", allow_pickle=False)
        return bool(json.loads(record.read_text(encoding="utf-8")).get("sources") == _sources(case))
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class _Job:
    case: InputCase
    plan: Plan
    configuration: Configuration
    folder: Path


def _preprocess_one(job: _Job) -> Path:
    from autoseg.preprocessing.case import preprocess_case

    image, geometry = read_input_case(job.case)
    result = preprocess_case(image, None, geometry, job.plan, job.configuration, job.case.case_id, seed=0)
    target = job.folder / f"{job.case.case_id}.npy"
    atomic.save_npy(target, result.image)
    record = {"case_id": job.case.case_id, "sources": _sources(job.case), "shape": list(result.image.shape)}
    atomic.write_json(job.folder / f"{job.case.case_id}.json", record)  # last: marks the case complete
    return target


def preprocess_images(
    cases: Sequence[InputCase],
    plan: Plan,
    configuration: Configuration,
    folder: Path,
    num_workers: int | None = None,
    show_progress: bool = True,
) -> list[Path]:
    """Preprocess the cases not cached yet into ``folder``; returns every case's ``.npy``, in case order."""
    from autoseg.parallel import parallel_map
    from autoseg.preprocessing.run import _configuration_record, prepare_folder

    prepare_folder(folder, _configuration_record(plan, configuration))
    jobs = [_Job(c, plan, configuration, folder) for c in cases if not _is_cached(folder, c)]
    parallel_map(_preprocess_one, jobs, num_workers, f"preprocess {configuration.name} (pretrain)", show_progress)
    return [folder / f"{c.case_id}.npy" for c in cases]


def checked_images(images_dir: Path, ending: str, channel_names: Sequence[str], dataset: Path) -> list[InputCase]:
    """The cases of ``images_dir``; every problem (no images, wrong channels, bad headers) at once."""
    if not images_dir.is_dir():
        raise AutosegError(f"{images_dir}: no such folder. Fix: pass the folder of unlabelled images with --images")
    cases, problems = find_input_cases(images_dir, ending, channel_names)
    if problems:
        layout = ", ".join(f"CASE_{c:04d}{ending} ({name})" for c, name in enumerate(channel_names))
        lines = "\n".join(f"  - {p}" for p in problems)
        raise AutosegError(
            f"images folder {images_dir} (--images) has {len(problems)} problem(s); nothing was pretrained."
            f" Each case needs the channels of {dataset / 'dataset.json'}: {layout}\n{lines}"
        )
    return cases


# -- the run -----------------------------------------------------------------------------------------------
def _planned(spec: DatasetSpec, paths: Paths, planner: str, gpu_memory_gb: float | None, num_workers: int | None,
             show_progress: bool) -> Plan:  # fmt: skip
    """The dataset's plan; fingerprint and plan first when it is missing (as ``autoseg plan`` would)."""
    from autoseg import pipeline

    if not paths.plan_file(spec.name, planner).is_file():
        if not paths.fingerprint_file(spec.name).is_file():
            pipeline.fingerprint(spec.root, paths, num_workers, show_progress=show_progress)
        pipeline.plan(spec.root, paths, planner, gpu_memory_gb)
    return pipeline.load_plan(spec, paths, planner)


def choose_configuration(plan: Plan, name: str | None) -> Configuration:
    """The named configuration, else 3d_fullres, else 2d."""
    if name is not None:
        return plan.configuration(name)
    for candidate in DEFAULT_CONFIGURATIONS:
        if candidate in plan.configurations:
            return plan.configurations[candidate]
    raise AutosegError(
        f"plan {plan.planner!r} of dataset {plan.dataset_name} has neither of {', '.join(DEFAULT_CONFIGURATIONS)};"
        f" name one of its configurations with -c ({', '.join(plan.configurations)})"
    )


def _write_progress(folder: Path, settings: dict[str, Any], log: list[dict[str, float]], status: str) -> None:
    atomic.write_json(folder / PROGRESS_FILE, {**settings, "status": status, "epochs_done": len(log), "log": log})


def pretrain(
    dataset: str | Path,
    paths: Paths,
    images_dir: str | Path,
    *,
    planner: str = "default",
    configuration: str | None = None,
    epochs: int = EPOCHS,
    iterations_per_epoch: int = ITERATIONS_PER_EPOCH,
    batch_size: int | None = None,
    lr: float = LEARNING_RATE,
    device: str | None = None,
    seed: int = 0,
    mask_ratio: float = MASK_RATIO,
    loss: str = "l1",
    output_dir: str | Path | None = None,
    overwrite: bool = False,
    gpu_memory_gb: float | None = None,
    num_workers: int | None = None,
    show_progress: bool = True,
) -> Path:
    """Pretrain the configuration's network on ``images_dir`` by masked reconstruction; returns the folder
    holding ``checkpoint_final.pt`` (default ``<results>/<dataset>/pretrain__<planner>__<configuration>``).

    ``batch_size`` defaults to the plan's, capped by the number of images.
    """
    from tqdm import tqdm

    from autoseg.evaluation.best import DATASET_FILE, PLAN_FILE, SEPARATOR
    from autoseg.networks import build_network
    from autoseg.pipeline import checked_dataset
    from autoseg.training.checkpoint import save_checkpoint
    from autoseg.training.distributed import DistributedContext, choose_device
    from autoseg.training.loop import _precision
    from autoseg.training.schedules import WarmupCosineLR

    if epochs < 1 or iterations_per_epoch < 1 or (batch_size is not None and batch_size < 1):
        raise AutosegError(
            f"--epochs {epochs}, --iterations-per-epoch {iterations_per_epoch} and --batch-size {batch_size}"
            " must be >= 1"
        )
    if lr <= 0:
        raise AutosegError(f"--lr {lr} must be > 0")
    settings = MaskSettings(mask_ratio=mask_ratio, loss=loss)
    spec = checked_dataset(dataset)
    cases = checked_images(Path(images_dir), spec.file_ending, spec.channel_names, spec.root)
    plan = _planned(spec, paths, planner, gpu_memory_gb, num_workers, show_progress)
    conf = choose_configuration(plan, configuration)
    model_folder = SEPARATOR.join((TRAINER_NAME, planner, conf.name))
    out = Path(output_dir) if output_dir else paths.results / spec.name / model_folder
    if (out / CHECKPOINT_FILE).is_file() and not overwrite:
        raise AutosegError(
            f"{out / CHECKPOINT_FILE} exists already. Fix: pass --overwrite to pretrain again, or -o another folder"
        )
    files = preprocess_images(cases, plan, conf, pretrain_data_dir(paths, spec.name, conf), num_workers, show_progress)

    channels = len(plan.channel_names)
    batch = min(batch_size or conf.batch_size, len(files))
    run_device = choose_device(device, DistributedContext())
    if run_device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every step has the patch's shape, as in training
    autocast_dtype, needs_scaler = _precision(run_device)
    scaler = torch.amp.GradScaler("cuda") if needs_scaler else None
    torch.manual_seed(seed)
    network = build_network(conf.network, channels, channels, deep_supervision=False).to(run_device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    schedule = WarmupCosineLR(lr)
    rng = np.random.default_rng(seed)
    mask_generator = torch.Generator().manual_seed(seed)
    record = {
        "task": TASK,
        "dataset": spec.name,
        "planner": planner,
        "configuration": conf.name,
        "images_dir": str(Path(images_dir).resolve()),
        "num_images": len(files),
        "epochs": epochs,
        "iterations_per_epoch": iterations_per_epoch,
        "batch_size": batch,
        "patch_size": list(conf.patch_size),
        "initial_lr": lr,
        "weight_decay": WEIGHT_DECAY,
        "lr_schedule": serialization.to_jsonable(schedule),
        "mask": asdict(settings),
        "seed": seed,
        "device": str(run_device),
        "precision": str(autocast_dtype).replace("torch.", "") if autocast_dtype else "float32",
    }
    if overwrite:  # the other files are replaced as the new run writes them
        (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / PLAN_FILE, serialization.to_jsonable(plan))
    atomic.write_text(out / DATASET_FILE, spec.description_file.read_text(encoding="utf-8"))
    log: list[dict[str, float]] = []
    network.train()
    for epoch in range(epochs):
        started = time.perf_counter()
        epoch_lr = schedule.lr(epoch, epochs)
        for group in optimizer.param_groups:
            group["lr"] = epoch_lr
        losses = []
        bar = tqdm(range(iterations_per_epoch), desc=f"pretrain epoch {epoch}", unit="it", leave=False,
                   disable=not show_progress, dynamic_ncols=True)  # fmt: skip
        for _ in bar:
            images, valid = sample_patches(files, conf.patch_size, batch, rng)
            hidden = block_mask(batch, conf.patch_size, settings, mask_generator)
            step_loss = reconstruction_step(
                network, optimizer, torch.from_numpy(images).to(run_device), hidden.to(run_device),
                torch.from_numpy(valid).to(run_device), settings, autocast_dtype, scaler,
            )  # fmt: skip
            losses.append(step_loss)
        mean_loss = float(torch.stack(losses).mean())
        log.append({"epoch": epoch, "loss": mean_loss, "lr": epoch_lr, "seconds": time.perf_counter() - started})
        _write_progress(out, record, log, "running")
        if show_progress:
            tqdm.write(f"pretrain epoch {epoch}: reconstruction loss {mean_loss:.4f}, lr {epoch_lr:.2e}")
    metadata = {
        "task": TASK,
        "trainer": TRAINER_NAME,
        "dataset": spec.name,
        "planner": planner,
        "configuration": conf.name,
        "fold": "all",
        "num_input_channels": channels,
        "labels": {},
        "network": serialization.to_jsonable(conf.network),
        "epochs": epochs,
        "mask": asdict(settings),
        "num_images": len(files),
        "log": log,
    }
    save_checkpoint(out / CHECKPOINT_FILE, {"network": network.state_dict()}, metadata)
    _write_progress(out, record, log, "finished")
    return out
