"""The commands from trained models to a submission: plan-and-train, find-best, predict, ensemble,
postprocess, export-model, import-model. Thin shims over the Python API, like ``autoseg.cli``."""

from __future__ import annotations

import argparse
import os
import shlex
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

AddCommand = Callable[..., argparse.ArgumentParser]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def print_best(best: Any) -> None:
    """The candidates' cross-validation Dice per label, the chosen model and its postprocessing."""
    names = {str(v): k for k, v in best.labels.items() if v != 0}
    width = max([len("candidate"), *(len(c.name) for c in best.candidates)])
    header = f"  {'candidate':<{width}} {'fg mean':>8} " + " ".join(f"{names[v][:12]:>12}" for v in names)
    print("cross-validation Dice (mean over cases):")
    print(header)
    for c in best.candidates:
        per_label = " ".join(f"{_fmt(c.dice_per_label.get(v)):>12}" for v in names)
        print(f"  {c.name:<{width}} {_fmt(c.foreground_mean_dice):>8} {per_label}")
    rules = best.postprocessing
    what = []
    if rules.largest_component_foreground:
        what.append("largest component of all foreground")
    if rules.largest_component_labels:
        what.append(
            "largest component of " + ", ".join(names.get(str(v), str(v)) for v in rules.largest_component_labels)
        )
    print(f"chosen: {best.name} (folds {', '.join(map(str, best.folds))})")
    print(
        f"postprocessing: {'; '.join(what) or 'none'} (Dice {_fmt(best.cross_validation_dice)} ->"
        f" {_fmt(best.postprocessed_dice)})"
    )
    if best.cases_scored < best.cases_total:
        print(
            f"note: scored on {best.cases_scored} of {best.cases_total} training cases (only the folds trained);"
            " train every fold for a full cross-validation"
        )


def _predict_command(results_dir: Path, test_images: Path | None) -> str:
    images = str(test_images) if test_images else "IN_DIR"
    return f"autoseg predict -i {shlex.quote(images)} -o OUT_DIR -m {shlex.quote(str(results_dir))}"


def cmd_plan_and_train(args: argparse.Namespace) -> int:
    from autoseg.cli import _paths, train_options
    from autoseg.errors import AutosegError
    from autoseg.plan_and_train import plan_and_train, resolve_preset

    options = train_options(args)
    configurations, folds, options = resolve_preset(args.preset, args.configurations, args.folds, options)
    devices = None
    if args.gpus:
        import torch

        if torch.cuda.device_count() < args.gpus:
            raise AutosegError(f"--gpus {args.gpus}, but torch sees {torch.cuda.device_count()} CUDA GPU(s)")
        devices = [f"cuda:{i}" for i in range(args.gpus)]
    started = time.perf_counter()
    result = plan_and_train(
        args.dataset, _paths(args), configurations=configurations, folds=folds, trainer=args.trainer,
        planner=args.planner, options=options, gpu_memory_gb=args.gpu_memory_gb, devices=devices,
        num_workers=args.num_workers, plugin_files=args.plugins, network=args.network,
        like=args.like, plan_name=args.plan_name,
    )  # fmt: skip
    print()
    if result.best is not None:
        print_best(result.best)
    print("wall time: " + ", ".join(f"{stage} {s:.1f} s" for stage, s in result.stage_seconds.items()), end="")
    print(f"; total {time.perf_counter() - started:.1f} s")
    for failure in result.failed:
        print(f"FAILED: {failure.job.configuration} fold {failure.job.fold}: {failure.error} (log: {failure.log})")
    if result.best is not None:
        print(f"predict with:\n  {_predict_command(result.results_dir, result.test_images)}")
    return 1 if result.failed else 0


def cmd_find_best(args: argparse.Namespace) -> int:
    from autoseg.cli import _paths
    from autoseg.pipeline import find_best

    paths = _paths(args)
    best = find_best(
        args.dataset, paths, trainer=args.trainer, planner=args.planner, configurations=args.configurations,
        folds=args.folds, num_workers=args.num_workers, show_progress=not args.quiet,
    )  # fmt: skip
    print_best(best)
    results_dir = paths.results / best.dataset
    print(f"written: {results_dir / 'best.json'}, {results_dir / 'report.md'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from autoseg.inference.predictor import predict_folder

    started = time.perf_counter()
    written = predict_folder(
        Path(args.model), Path(args.input), Path(args.output), folds=args.folds, use_mirroring=not args.no_tta,
        save_probabilities=args.save_probabilities, skip_existing=args.continue_, device=args.device,
        step_size=args.step_size, num_workers=args.num_workers, show_progress=not args.quiet,
        cpu_bf16=False if args.fp32 else None, save_uncertainty=args.save_uncertainty,
        device_preprocessing=args.device_preprocessing,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    print(f"{len(written)} case(s) written to {args.output} in {seconds:.1f} s")
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from autoseg.evaluation.ensemble import ensemble_folders

    written = ensemble_folders(
        [Path(d) for d in args.folders], Path(args.output), save_probabilities=args.save_probabilities,
        num_workers=args.num_workers, show_progress=not args.quiet,
    )  # fmt: skip
    print(f"{len(written)} case(s) written to {args.output}")
    return 0


def cmd_postprocess(args: argparse.Namespace) -> int:
    from autoseg.evaluation.postprocessing import postprocess_with_best

    written = postprocess_with_best(
        Path(args.input), Path(args.output), Path(args.model), num_workers=args.num_workers,
        show_progress=not args.quiet,
    )  # fmt: skip
    print(f"{len(written)} case(s) written to {args.output}")
    return 0


def cmd_export_model(args: argparse.Namespace) -> int:
    from autoseg.bundle import export_bundle

    path = export_bundle(Path(args.results), Path(args.output), folds=args.folds)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


def cmd_import_model(args: argparse.Namespace) -> int:
    from autoseg.bundle import import_bundle
    from autoseg.paths import Paths

    root = args.results or os.environ.get("AUTOSEG_RESULTS")
    results = Paths(Path(), Path(root) if root else None).results  # names the flag when neither is set
    folder = import_bundle(Path(args.bundle), results, overwrite=args.overwrite)
    print(f"imported into {folder}; predict with:\n  {_predict_command(folder, None)}")
    return 0


def add_model_commands(
    sub: Any, command: AddCommand, common: Mapping[str, Callable[[argparse.ArgumentParser], None]]
) -> None:
    """Register the commands on ``sub``; ``common`` holds the option adders of ``autoseg.cli``."""
    from autoseg.presets import PRESETS

    p = command(
        sub, cmd_plan_and_train, "plan-and-train", "everything: check, plan, preprocess, train all folds, find-best",
        "check -> fingerprint -> plan -> preprocess -> train every (configuration, fold) -> find-best, then print"
        " the predict command. Rerun the same command to skip finished folds and resume interrupted ones.",
        common["dataset"], common["preprocessed"], common["results"], common["planner"], common["gpu_memory"],
    )  # fmt: skip
    p.add_argument("-c", "--configurations", nargs="+", metavar="CONFIG", help="default: all in the plan")
    p.add_argument("-f", "--folds", nargs="+", type=int, metavar="K", help="default: 0 1 2 3 4")
    p.add_argument("--trainer", default="default", help="trainer name (see `autoseg list trainers`)")
    presets = "; ".join(f"{name}: {preset.description}" for name, preset in PRESETS.items())
    p.add_argument("--preset", choices=sorted(PRESETS), help=f"defaults to start from ({presets})")
    p.add_argument("--epochs", type=int, metavar="N", help="epochs per fold (default: the trainer's, 1000)")
    p.add_argument("--iterations-per-epoch", type=int, metavar="N", help="training steps per epoch (default: 250)")
    p.add_argument("--val-iterations", type=int, metavar="N", help="validation batches per epoch (default: 50)")
    p.add_argument("--device", metavar="DEV", help="cuda, cuda:1, mps or cpu (default: CUDA, then MPS, then CPU)")
    p.add_argument("--gpus", type=int, metavar="N", help="train folds side by side on GPUs 0..N-1, one fold each")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and sampling (default: 0)")
    common["speed"](p)
    p.add_argument("--fast-dev-run", action="store_true", help="2 epochs of 2 iterations per fold: checks the set-up")
    common["early_stopping"](p)
    common["workers"](p)
    common["network"](p)
    common["pretrained"](p)
    common["like"](p)

    p = command(
        sub, cmd_find_best, "find-best", "choose the best model, ensemble and postprocessing by cross-validation",
        "Score every trained model's cross-validation predictions, try ensembles (every pair, then greedy forward"
        " selection) and largest-component postprocessing; write <results>/<dataset>/best.json and report.md.",
        common["dataset"], common["preprocessed"], common["results"], common["workers"],
    )  # fmt: skip
    p.add_argument("--trainer", help="only models of this trainer (default: all)")
    p.add_argument("--planner", help="only models of this planner (default: all)")
    p.add_argument("-c", "--configurations", nargs="+", metavar="CONFIG", help="only these configurations")
    p.add_argument("-f", "--folds", nargs="+", type=int, metavar="K", help="only these folds (default: all trained)")

    p = command(
        sub, cmd_predict, "predict", "segment a folder of images with the chosen model",
        "Predict every case of IN_DIR (CASE_0000<ending>, ... one file per channel) with the model or ensemble"
        " of best.json, all its folds, mirroring and its postprocessing. Writes OUT_DIR/CASE<ending> in the"
        " input's geometry: a challenge submission folder.",
    )  # fmt: skip
    p.add_argument("-i", "--input", required=True, metavar="IN_DIR", help="folder of images to segment")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="folder for the segmentations")
    p.add_argument("-m", "--model", required=True, metavar="MODEL", help="results/<dataset> folder or a bundle .zip")
    p.add_argument("-f", "--folds", nargs="+", type=int, metavar="K", help="folds to use (default: best.json's)")
    p.add_argument("--no-tta", action="store_true", help="no mirror test-time augmentation (about 8x faster in 3D)")
    p.add_argument("--save-probabilities", action="store_true", help="also write CASE.npz class probabilities")
    p.add_argument(
        "--save-uncertainty", action="store_true",
        help="also write uncertainty/CASE_entropy<ending>: per voxel, the entropy of the class probabilities averaged"
        " over folds, mirrorings and ensemble members, divided by log(#classes): 0 = certain, 1 = undecided",
    )  # fmt: skip
    p.add_argument("--continue", dest="continue_", action="store_true", help="skip cases already in OUT_DIR")
    p.add_argument("--device", metavar="DEV", help="cuda, cuda:1 or cpu (default: CUDA if present)")
    p.add_argument("--step-size", type=float, default=0.5, help="tile step as a fraction of the patch (default 0.5)")
    p.add_argument(
        "--fp32", action="store_true",
        help="on a CPU, predict in float32 (default: bf16 where the CPU has native bf16, about twice as fast)",
    )  # fmt: skip
    p.add_argument(
        "--device-preprocessing", action=argparse.BooleanOptionalAction, default=None,
        help="normalise and resample each case on the device; the CPU only reads and crops (default: on for CUDA)",
    )  # fmt: skip
    common["workers"](p)

    p = command(
        sub, cmd_ensemble, "ensemble", "average the class probabilities of several prediction folders",
        "Average CASE.npz probabilities (written with --save-probabilities) case by case and write the argmax.",
    )  # fmt: skip
    p.add_argument("folders", nargs="+", metavar="DIR", help="prediction folders holding CASE.npz files")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="folder for the ensembled segmentations")
    p.add_argument("--save-probabilities", action="store_true", help="also write the averaged probabilities")
    common["workers"](p)

    p = command(
        sub, cmd_postprocess, "postprocess", "apply the postprocessing that find-best chose",
        "Apply best.json's largest-connected-component rules to every segmentation of IN_DIR.",
    )  # fmt: skip
    p.add_argument("input", metavar="IN_DIR", help="folder of segmentations")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="folder for the postprocessed files")
    p.add_argument("-m", "--model", required=True, metavar="RESULTS", help="results/<dataset> folder with best.json")
    common["workers"](p)

    p = command(
        sub, cmd_export_model, "export-model", "pack the chosen model into a shareable .zip bundle",
        "Write a bundle: plan, dataset description, run.json, best.json and the chosen models' weights"
        " (safetensors: tensors only, no code), with a manifest of SHA-256 checksums.",
    )  # fmt: skip
    p.add_argument("results", metavar="RESULTS", help="results/<dataset> folder with best.json")
    p.add_argument("-o", "--output", required=True, metavar="FILE.zip", help="bundle to write")
    p.add_argument("-f", "--folds", nargs="+", type=int, metavar="K", help="folds to include (default: best.json's)")

    p = command(
        sub, cmd_import_model, "import-model", "unpack a bundle into the results folder, after validating it",
        "Check a bundle (manifest checksums, no pickles, no paths outside the target, known trainers and"
        " networks) and unpack it into <results>/<dataset>/. No code from the bundle is ever run.",
    )  # fmt: skip
    p.add_argument("bundle", metavar="FILE.zip", help="bundle written by autoseg export-model")
    common["results"](p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing <results>/<dataset> folder")
