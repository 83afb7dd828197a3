"""The ``pretrain`` command: self-supervised masked-image reconstruction on unlabelled scans.

A thin shim over ``autoseg.pretrain.pretrain``, registered by ``autoseg.cli`` like ``autoseg.cli_models``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

AddCommand = Callable[..., argparse.ArgumentParser]


def cmd_pretrain(args: argparse.Namespace) -> int:
    from autoseg.cli import _paths
    from autoseg.pretrain import PROGRESS_FILE, pretrain

    # Flags left out keep the recipe's defaults, which autoseg.pretrain defines (and documents) once.
    recipe = {
        name: value
        for name in ("epochs", "iterations_per_epoch", "lr", "mask_ratio", "loss")
        if (value := getattr(args, name)) is not None
    }
    started = time.perf_counter()
    folder = pretrain(
        args.dataset, _paths(args), Path(args.images), planner=args.planner, configuration=args.configuration,
        batch_size=args.batch_size, device=args.device, seed=args.seed, output_dir=args.output,
        overwrite=args.overwrite, gpu_memory_gb=args.gpu_memory_gb, num_workers=args.num_workers,
        show_progress=not args.quiet, **recipe,
    )  # fmt: skip
    progress = json.loads((folder / PROGRESS_FILE).read_text(encoding="utf-8"))
    log = progress["log"]
    print(
        f"pretrained {len(log)} epoch(s) on {progress['num_images']} image(s): reconstruction loss"
        f" {log[0]['loss']:.4f} -> {log[-1]['loss']:.4f} ({time.perf_counter() - started:.1f} s); use it with"
        f" autoseg train {shlex.quote(args.dataset)} {progress['configuration']} FOLD --planner"
        f" {shlex.quote(args.planner)} --pretrained {shlex.quote(str(folder))}"
    )
    return 0


def add_pretrain_command(
    sub: Any, command: AddCommand, common: Mapping[str, Callable[[argparse.ArgumentParser], None]]
) -> None:
    """Register ``pretrain`` on ``sub``; ``common`` holds the option adders of ``autoseg.cli``."""
    p = command(
        sub, cmd_pretrain, "pretrain", "self-supervised pretraining on unlabelled images (masked reconstruction)",
        "Preprocess the unlabelled images of --images with the plan's configuration (planning the dataset first if"
        " needed), then train the configuration's network to reconstruct randomly hidden blocks of them"
        " (SimMIM-style: 0.6 of an 8x8x8 grid of blocks hidden, L1 loss on the hidden voxels). Writes"
        " <results>/<dataset>/pretrain__<planner>__<configuration>/checkpoint_final.pt for"
        " `autoseg train ... --pretrained DIR`.",
        common["dataset"], common["preprocessed"], common["results"], common["planner"], common["gpu_memory"],
    )  # fmt: skip
    p.add_argument(
        "--images", required=True, metavar="DIR",
        help="folder of unlabelled images named CASE_XXXX<ending>, in the dataset's channel layout",
    )  # fmt: skip
    p.add_argument("-c", "--configuration", metavar="CONFIG", help="default: 3d_fullres, else 2d")
    p.add_argument("-o", "--output", metavar="DIR", help="output folder (default: under --results, see above)")
    p.add_argument("--epochs", type=int, metavar="N", help="epochs (default: 100)")
    p.add_argument("--iterations-per-epoch", type=int, metavar="N", help="steps per epoch (default: 250)")
    p.add_argument("--batch-size", type=int, metavar="N", help="default: the plan's, at most the number of images")
    p.add_argument("--lr", type=float, metavar="LR", help="AdamW learning rate (default: 1e-3)")
    p.add_argument("--mask-ratio", type=float, metavar="R", help="fraction of blocks hidden (default: 0.6, SimMIM's)")
    p.add_argument("--loss", choices=["l1", "mse"], help="reconstruction loss (default: l1, SimMIM's)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, patches and masks (default: 0)")
    p.add_argument("--device", metavar="DEV", help="cuda, cuda:1, mps or cpu (default: CUDA, then MPS, then CPU)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing pretrained checkpoint")
    common["workers"](p)
