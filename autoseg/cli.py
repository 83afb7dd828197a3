"""The ``autoseg`` command: argparse subcommands, each a thin shim over a function of the Python API.

Heavy modules are imported inside the commands so that ``autoseg --help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Command = Callable[[argparse.Namespace], int]


def _add_workers(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--num-workers",
        type=int,
        default=None,
        metavar="N",
        help="worker processes over cases (default: the available cores; 1 = no subprocesses)",
    )


def _add_preprocessed(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preprocessed",
        metavar="DIR",
        help="root folder for fingerprints, plans and preprocessed data (default: $AUTOSEG_PREPROCESSED)",
    )


def _add_dataset(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", metavar="DATASET", help="dataset folder holding dataset.json, imagesTr/, labelsTr/")


def _add_planner(p: argparse.ArgumentParser) -> None:
    p.add_argument("--planner", default="default", help="planner name (see `autoseg list planners`)")


def _add_network(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--network",
        metavar="NAME",
        help="plan for this network instead of the planner's own, e.g. swin_unet; its memory estimate sizes the"
        " patches (see `autoseg list networks`; default: the planner's)",
    )


def _add_gpu_memory(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gpu-memory-gb",
        type=float,
        metavar="GB",
        help="GPU memory the plan targets (default: the planner's own: 8 GB as nnU-Net, 24 for resenc_l, 40 for"
        " resenc_xl)",
    )


def _add_configurations(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c",
        "--configurations",
        nargs="+",
        metavar="CONFIG",
        help="configurations to preprocess, e.g. 2d 3d_fullres (default: all in the plan)",
    )


def _paths(args: argparse.Namespace) -> Any:
    from autoseg.paths import Paths

    return Paths.resolve(args.preprocessed, getattr(args, "results", None))


def _add_results(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", metavar="DIR", help="root folder for trained models (default: $AUTOSEG_RESULTS)")


def _add_early_stopping(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--early-stopping-patience", type=int, metavar="N",
        help="stop when the moving-average pseudo Dice has not improved for N epochs (default: off)",
    )  # fmt: skip
    p.add_argument(
        "--early-stopping-min-epochs", type=int, metavar="N",
        help="train at least N epochs before early stopping may stop (default: the trainer's, 50)",
    )  # fmt: skip


def _add_speed(p: argparse.ArgumentParser) -> None:
    """How the training step runs: compilation, CUDA graphs, where the augmentation runs."""
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None,
        help="torch.compile the network (default: on for CUDA, off elsewhere; its warm-up is timed apart)",
    )  # fmt: skip
    p.add_argument(
        "--cuda-graphs", action="store_true",
        help="replay the compiled step as CUDA graphs (torch.compile mode reduce-overhead; CUDA, static shapes)",
    )  # fmt: skip
    p.add_argument(
        "--augmentation", choices=["cpu", "device"],
        help="where the training augmentation runs: cpu (worker processes) or device (torch ops beside the step;"
        " workers only cut patches); default: device on CUDA, cpu elsewhere",
    )  # fmt: skip
    p.add_argument(
        "--cases-on-device", choices=["auto", "always", "never"], default=None,
        help="keep the fold's cases on the device and cut batches there, without worker processes (device"
        " augmentation only); auto (default): on CUDA when they fit in a quarter of the free GPU memory",
    )  # fmt: skip


def train_options(args: argparse.Namespace) -> Any:
    """TrainOptions from the training flags a command has (``train``, ``plan-and-train``); absent ones default."""
    from autoseg.training.trainer import TrainOptions

    def flag(name: str, default: Any = None) -> Any:
        return getattr(args, name, default)

    return TrainOptions(
        epochs=flag("epochs"),
        iterations_per_epoch=flag("iterations_per_epoch"),
        val_iterations=flag("val_iterations"),
        lr=flag("lr"),
        batch_size=flag("batch_size"),
        num_workers=flag("num_workers"),
        seed=flag("seed", 0),
        device=flag("device"),
        compile=flag("compile"),
        cuda_graphs=flag("cuda_graphs", False),
        augmentation=flag("augmentation"),
        cases_on_device=flag("cases_on_device"),
        fast_dev_run=flag("fast_dev_run", False),
        resume=flag("resume", False),
        overwrite=flag("overwrite", False),
        save_probabilities=flag("save_probabilities", False),
        validation_mirroring=not flag("no_tta", False),
        show_progress=not args.quiet,
        early_stopping_patience=flag("early_stopping_patience"),
        early_stopping_min_epochs=flag("early_stopping_min_epochs"),
        pretrained=flag("pretrained"),
    )


def _add_pretrained(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--pretrained", metavar="PATH",
        help="start from these weights: a fold, model or results folder, a checkpoint .pt or a bundle .zip; heads"
        " are re-initialised when the labels differ, the first conv adapted to another channel count",
    )  # fmt: skip


def _add_like(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--like", metavar="PRETRAINED",
        help="plan like a trained model (its network, patch size, spacing, batch size) so that --pretrained fits;"
        " the channels, labels and intensities come from this dataset",
    )  # fmt: skip
    p.add_argument(
        "--plan-name", metavar="NAME",
        help="save the plan under this name, which --planner then gives to every later command (default: the"
        " planner's name; <planner>_<network> with --network; like_<the model's dataset> with --like)",
    )  # fmt: skip


def cmd_train(args: argparse.Namespace) -> int:
    from autoseg.pipeline import train

    options = train_options(args)
    started = time.perf_counter()
    folder = train(args.dataset, _paths(args), args.configuration, args.fold, args.trainer, args.planner, options)
    summary = folder / "validation" / "summary.json"
    if summary.is_file() and not args.quiet:
        import json

        mean = json.loads(summary.read_text())["foreground_mean"].get("Dice")
        print(f"validation: mean foreground Dice {mean if mean is None else round(mean, 4)} ({summary})")
    print(f"{folder} (done in {time.perf_counter() - started:.1f} s)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from autoseg.evaluation.evaluate import evaluate_folder

    output = Path(args.output) if args.output else Path(args.pred_dir) / "summary.json"
    summary = evaluate_folder(
        Path(args.pred_dir),
        Path(args.gt_dir),
        file_ending=args.file_ending,
        output_file=output,
        tolerance_mm=args.tolerance_mm,
        num_workers=args.num_workers,
        show_progress=not args.quiet,
    )
    means = summary["mean"]
    print(f"{'label':<8} {'Dice':>8} {'IoU':>8} {'HD95 mm':>9} {'NSD':>8}")

    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    def row(name: str, m: dict[str, Any]) -> str:
        dice, iou, hd95, nsd = (fmt(m.get(k)) for k in ("Dice", "IoU", "HD95_mm", "NSD"))
        return f"{name:<8} {dice:>8} {iou:>8} {hd95:>9} {nsd:>8}"

    for label, m in means.items():
        print(row(label, m))
    print(row("fg mean", summary["foreground_mean"]))
    print(f"written: {output}")
    return 0


def cmd_example(args: argparse.Namespace) -> int:
    from autoseg.example import make_example_dataset

    folder = make_example_dataset(
        args.out_dir,
        num_training=args.num_training,
        num_test=args.num_test,
        size=args.size,
        seed=args.seed,
        overwrite=args.overwrite,
        show_progress=not args.quiet,
    )
    print(f"example dataset: {folder}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from autoseg.pipeline import check

    spec, problems = check(
        args.dataset, args.num_workers, read_voxels=not args.headers_only, show_progress=not args.quiet
    )
    if problems:
        print(f"{spec.root}: {len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(
        f"{spec.root}: OK ({len(spec.training)} training, {len(spec.test)} test cases,"
        f" {spec.num_channels} channel(s): {', '.join(spec.channel_names)}; labels: {spec.labels})"
    )
    return 0


def cmd_fingerprint(args: argparse.Namespace) -> int:
    from autoseg.pipeline import fingerprint

    path = fingerprint(args.dataset, _paths(args), args.num_workers, args.seed, show_progress=not args.quiet)
    print(f"wrote {path}")
    return 0


def _print_plan(plan_file: Path) -> None:
    from autoseg import serialization
    from autoseg.plan import Plan

    plan = serialization.load(Plan, plan_file)
    print(f"wrote {plan_file}")
    print(
        f"  transpose {list(plan.transpose_forward)}; median spacing {list(plan.original_median_spacing_mm)} mm,"
        f" median shape {list(plan.original_median_shape)}"
    )
    print(f"  {'configuration':<12} {'spacing (mm)':<24} {'patch':<16} {'batch':>5} {'stages':>6}")
    for name, c in plan.configurations.items():
        spacing = "×".join(f"{s:.3g}" for s in c.spacing_mm)
        patch = "×".join(map(str, c.patch_size))
        print(f"  {name:<12} {spacing:<24} {patch:<16} {c.batch_size:>5} {c.network.num_stages:>6}")


def cmd_plan(args: argparse.Namespace) -> int:
    from autoseg.errors import AutosegError
    from autoseg.pipeline import plan, plan_like

    if args.like is not None:
        if args.network is not None or args.planner != "default":
            raise AutosegError(
                "--like plans like the pretrained model, so --planner and --network do not apply. Fix: leave them"
                " out (name the plan with --plan-name)"
            )
        plan_file = plan_like(args.dataset, _paths(args), args.like, args.plan_name, show_progress=not args.quiet)
        _print_plan(plan_file)
        print(
            f"next: autoseg preprocess {args.dataset} --planner {plan_file.stem}, then autoseg train ... --planner"
            f" {plan_file.stem} --pretrained {args.like}"
        )
        return 0
    _print_plan(plan(args.dataset, _paths(args), args.planner, args.gpu_memory_gb, args.network, args.plan_name))
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from autoseg.pipeline import preprocess

    folders = preprocess(
        args.dataset,
        _paths(args),
        args.planner,
        args.configurations,
        args.num_workers,
        show_progress=not args.quiet,
    )
    for name, folder in folders.items():
        print(f"{name}: {folder}")
    return 0


def cmd_plan_and_preprocess(args: argparse.Namespace) -> int:
    from autoseg.pipeline import plan_and_preprocess

    paths = _paths(args)
    started = time.perf_counter()
    folders = plan_and_preprocess(
        args.dataset, paths, args.planner, args.gpu_memory_gb, args.configurations, args.num_workers,
        show_progress=not args.quiet,
    )  # fmt: skip
    _print_plan(paths.plan_file(Path(args.dataset).name, args.planner))
    for name, folder in folders.items():
        print(f"{name}: {folder}")
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from autoseg.networks import NETWORKS
    from autoseg.planning import PLANNERS
    from autoseg.preprocessing.normalize import NORMALIZERS
    from autoseg.registry import Registry
    from autoseg.training.trainer import TRAINERS

    registries: dict[str, Registry[Any]] = {
        "planners": PLANNERS,
        "normalizers": NORMALIZERS,
        "trainers": TRAINERS,
        "networks": NETWORKS,
    }
    registry = registries[args.kind]
    for name, obj in registry.items():
        doc = (obj.__doc__ or "").strip().splitlines()
        print(f"{name:<20} {doc[0] if doc else ''}")
    return 0


def _command(
    sub: Any,
    func: Command,
    name: str,
    summary: str,
    description: str,
    *options: Callable[[argparse.ArgumentParser], None],
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=summary, description=description)
    for add_option in options:
        add_option(parser)
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoseg",
        description="Self-configuring medical image segmentation: dataset folder in, the best cross-validated"
        " model and a submission folder out. Start with `autoseg plan-and-train DATASET`.",
    )
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    parser.add_argument(
        "--plugins",
        action="append",
        default=[],
        metavar="FILE.py",
        help="import a plug-in file (planners, trainers, ...) before running; repeatable",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = _command(
        sub,
        cmd_example,
        "example",
        "write the built-in example dataset (brain phantoms)",
        "Write procedural brain-like phantoms in the nnU-Net layout.",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to write Dataset001_BrainPhantom into")
    p.add_argument("--num-training", type=int, default=24, help="training cases (default: 24)")
    p.add_argument("--num-test", type=int, default=6, help="test cases with labels (default: 6)")
    p.add_argument("--size", type=int, default=80, help="grid edge in voxels at 2 mm (default: 80, max 96)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing example dataset")

    p = _command(
        sub,
        cmd_check,
        "check",
        "check a dataset folder and list every problem",
        "Report every problem of a dataset at once, each with the case, the file and how to fix it."
        " Exits 1 when there are problems.",
        _add_dataset,
        _add_workers,
    )
    p.add_argument("--headers-only", action="store_true", help="skip reading voxels (no NaN / label checks)")

    p = _command(
        sub,
        cmd_fingerprint,
        "fingerprint",
        "measure the dataset (spacings, shapes, intensities, classes)",
        "Write <preprocessed>/<dataset>/fingerprint.json.",
        _add_dataset,
        _add_preprocessed,
        _add_workers,
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the intensity sampling (default: 0)")

    _command(
        sub,
        cmd_plan,
        "plan",
        "derive the training plan from the fingerprint",
        "Write <preprocessed>/<dataset>/plans/<planner>.json from the fingerprint. With --like PRETRAINED: the"
        " trained model's plan for this dataset, in plans/<plan name>.json.",
        _add_dataset,
        _add_preprocessed,
        _add_planner,
        _add_gpu_memory,
        _add_network,
        _add_like,
    )
    _command(
        sub,
        cmd_preprocess,
        "preprocess",
        "preprocess the training cases as the plan says",
        "Crop, normalize, resample and store every training case; resumable.",
        _add_dataset,
        _add_preprocessed,
        _add_planner,
        _add_configurations,
        _add_workers,
    )
    _command(
        sub,
        cmd_plan_and_preprocess,
        "plan-and-preprocess",
        "fingerprint, plan and preprocess in one go",
        "check -> fingerprint -> plan -> preprocess.",
        _add_dataset,
        _add_preprocessed,
        _add_planner,
        _add_gpu_memory,
        _add_configurations,
        _add_workers,
    )

    p = _command(
        sub,
        cmd_train,
        "train",
        "train one fold of one configuration",
        "Train CONFIGURATION on fold FOLD of the cross-validation, then predict and score the fold's held-out"
        " cases. Writes <results>/<dataset>/<trainer>__<planner>__<configuration>/fold_<k>/. For several GPUs:"
        " torchrun --nproc_per_node N -m autoseg train ...",
        _add_dataset,
        _add_preprocessed,
        _add_results,
        _add_planner,
    )
    p.add_argument("configuration", metavar="CONFIGURATION", help="a configuration of the plan, e.g. 3d_fullres")
    p.add_argument("fold", metavar="FOLD", type=int, help="fold of splits.json to train (0-4 by default)")
    p.add_argument("--trainer", default="default", help="trainer name (see `autoseg list trainers`)")
    p.add_argument("--epochs", type=int, metavar="N", help="epochs (default: the trainer's, 1000)")
    p.add_argument("--iterations-per-epoch", type=int, metavar="N", help="training steps per epoch (default: 250)")
    p.add_argument("--val-iterations", type=int, metavar="N", help="validation batches per epoch (default: 50)")
    p.add_argument("--lr", type=float, metavar="LR", help="initial learning rate (default: the trainer's, 0.01)")
    p.add_argument("--batch-size", type=int, metavar="N", help="batch size over all processes (default: the plan's)")
    p.add_argument(
        "--num-workers", type=int, metavar="N", help="data-loading processes (default: the available cores; 0 = none)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and sampling (default: 0)")
    p.add_argument("--device", metavar="DEV", help="cuda, cuda:1, mps or cpu (default: CUDA, then MPS, then CPU)")
    _add_speed(p)
    p.add_argument("--resume", action="store_true", help="continue from checkpoint_latest (a larger --epochs extends)")
    p.add_argument("--overwrite", action="store_true", help="discard an existing run in the fold folder")
    p.add_argument("--save-probabilities", action="store_true", help="also save validation class probabilities")
    p.add_argument("--no-tta", action="store_true", help="validate without mirror test-time augmentation")
    p.add_argument("--fast-dev-run", action="store_true", help="2 epochs of 2 iterations, 2 validation cases")
    _add_early_stopping(p)
    _add_pretrained(p)

    p = _command(
        sub,
        cmd_evaluate,
        "evaluate",
        "score a folder of predictions against references",
        "Per case and label: TP, FP, FN, TN, Dice, IoU, volumes, HD95 and normalised surface Dice (mm);"
        " writes summary.json with per-label and foreground means.",
    )
    p.add_argument("pred_dir", metavar="PRED_DIR", help="folder of predicted segmentations")
    p.add_argument("gt_dir", metavar="GT_DIR", help="folder of reference segmentations with the same file names")
    p.add_argument("-o", "--output", metavar="FILE", help="summary file (default: PRED_DIR/summary.json)")
    p.add_argument("--file-ending", help="e.g. .nii.gz (default: the most common ending in GT_DIR)")
    p.add_argument("--tolerance-mm", type=float, default=1.0, help="surface Dice tolerance in mm (default: 1)")
    _add_workers(p)

    from autoseg.cli_models import add_model_commands

    common = {
        "dataset": _add_dataset,
        "preprocessed": _add_preprocessed,
        "results": _add_results,
        "planner": _add_planner,
        "gpu_memory": _add_gpu_memory,
        "network": _add_network,
        "workers": _add_workers,
        "early_stopping": _add_early_stopping,
        "pretrained": _add_pretrained,
        "like": _add_like,
        "speed": _add_speed,
    }
    add_model_commands(sub, _command, common)
    from autoseg.cli_pretrain import add_pretrain_command

    add_pretrain_command(sub, _command, common)

    p = _command(sub, cmd_list, "list", "list registered plug-ins", "List plug-ins with one line each.")
    p.add_argument("kind", choices=["planners", "trainers", "networks", "normalizers"], help="which registry to list")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from autoseg.errors import AutosegError, TrainingInterrupted
    from autoseg.registry import load_plugin_file

    try:
        for plugin in args.plugins:
            load_plugin_file(plugin)
        return int(args.func(args))
    except TrainingInterrupted as exc:
        print(f"autoseg: {exc}", file=sys.stderr)
        return 130
    except (AutosegError, OSError) as exc:  # bad input, or a full disk / missing permission: no traceback
        if args.debug:
            raise
        print(f"autoseg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autoseg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
