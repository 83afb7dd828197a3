"""Benchmark: seconds per case of autoseg's predictor beside nnU-Net v2's, same case, same network, same weights.

    python benchmarks/predict_speed.py                                  # 160x192x160 at 1 mm, CUDA when present
    python benchmarks/predict_speed.py --device cpu --size 80 96 80 --spacing 2    # 2 mm, for 2 CPU cores

Writes synthetic brain phantoms (the example dataset's generator) of ``--size`` voxels at ``--spacing`` mm
with a noise floor in the air, as an MRI that is not skull-stripped has, so cropping does not shrink the
case; ``--test-spacing`` puts the predicted heads on another grid, so that both frameworks resample them to
the plan's spacing and their predictions back. autoseg's default planner plans ``3d_fullres`` for the
training heads (at 1 mm: nnU-Net's brain plan, patch 128x160x112, 6 stages), and ``--folds`` randomly
initialised networks of that plan stand in for trained folds: the speed does not depend on the weights.
nnU-Net gets the same plan (translated into its plans.json form), the same weights in its own
PlainConvUNet (dynamic_network_architectures, parameters copied by position as tests/test_networks.py
checks) and the same input files.

Each framework predicts one warm-up case, then ``--cases`` timed cases. The stage columns time one case at
a time: preprocessing (reading the files included), network (the sliding window over all folds and
mirrorings) and export (resampling back, argmax, postprocessing, writing); nnU-Net's are the stages of
its ``predict_from_files_sequential`` loop. wall/case is autoseg's ``predict_cases`` over the same cases,
which overlaps the stages of consecutive cases, and for nnU-Net the sequential loop and, on its own line,
its default ``predict_from_files`` (worker processes preprocess ahead and export behind). The last line
gives the fraction of voxels on which the two segmentations agree. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

DATASET = "Dataset102_PredictBench"
LABELS = {"background": 0, "csf": 1, "grey_matter": 2, "white_matter": 3}
NOISE_FLOOR = 2.0  # intensity of the air's Rician-like noise: keeps every voxel nonzero (no cropping)
NNUNET_NORMALIZATION = {"zscore": "ZScoreNormalization", "ct": "CTNormalization", "none": "NoNormalization",
                        "rescale_to_0_1": "RescaleTo01Normalization"}  # fmt: skip


def write_cases(
    root: Path, size: tuple[int, int, int], spacing: float, training: int, test: int,
    test_spacing: tuple[float, float, float],
) -> Path:  # fmt: skip
    """Training cases (for the plan) at ``spacing``; test cases of the same heads at ``test_spacing``."""
    from autoseg.example import make_phantom
    from autoseg.io import Geometry, write_image

    settings = {"size": list(size), "spacing": spacing, "training": training, "test": test,
                "test_spacing": list(test_spacing)}  # fmt: skip
    marker = root / "benchmark.json"
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return root
    shutil.rmtree(root, ignore_errors=True)
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (root / folder).mkdir(parents=True)
    for i in range(training + test):
        rng = np.random.default_rng([7, i])
        is_training = i < training
        case_spacing = (spacing,) * 3 if is_training else test_spacing
        grid = tuple(round(n * spacing / s) for n, s in zip(size, case_spacing))
        image, label = make_phantom(grid, case_spacing, rng)  # type: ignore[arg-type]
        image += np.abs(rng.normal(0, NOISE_FLOOR, size=image.shape)).astype(np.float32) + 0.1
        geometry = Geometry(case_spacing, (-90.0, -110.0, -80.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
        folder, case_id = ("imagesTr", f"brain_{i:03d}") if is_training else ("imagesTs", f"test_{i:03d}")
        write_image(image, geometry, root / folder / f"{case_id}_0000.nii.gz")
        if is_training:
            write_image(label.astype(np.uint8), geometry, root / "labelsTr" / f"{case_id}.nii.gz")
    description = {"channel_names": {"0": "T1"}, "labels": LABELS, "numTraining": training, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(description, indent=2))
    marker.write_text(json.dumps(settings))
    return root


def autoseg_model(raw: Path, work: Path, folds: int) -> tuple[Path, Any, list[dict[str, torch.Tensor]]]:
    """Plan 3d_fullres for the cases and write a results folder with ``folds`` random networks of it."""
    from autoseg import pipeline, serialization
    from autoseg.evaluation.best import BestChoice, ModelRef, Postprocessing, save_best
    from autoseg.networks import build_network
    from autoseg.paths import Paths
    from autoseg.plan import Plan
    from autoseg.training.checkpoint import save_checkpoint

    paths = Paths(work / "autoseg_preprocessed")
    pipeline.fingerprint(raw, paths, num_workers=1, show_progress=False)
    plan = serialization.load(Plan, pipeline.plan(raw, paths))
    configuration = plan.configuration("3d_fullres")
    ref = ModelRef("default", "default", "3d_fullres")
    model_dir = work / "autoseg_results" / DATASET
    shutil.rmtree(model_dir, ignore_errors=True)
    serialization.save(plan, model_dir / ref.folder / "plan.json")
    states = []
    for fold in range(folds):
        torch.manual_seed(fold)
        network = build_network(configuration.network, 1, len(LABELS), deep_supervision=True)
        states.append(network.state_dict())
        metadata = {"configuration": "3d_fullres", "num_input_channels": 1, "mirror_axes": [0, 1, 2]}
        save_checkpoint(model_dir / ref.folder / f"fold_{fold}" / "checkpoint_final.pt", {"network": states[-1]},
                        metadata)  # fmt: skip
    save_best(BestChoice(BestChoice.SCHEMA_VERSION, DATASET, (ref,), tuple(range(folds)), "checkpoint_final.pt",
                         Postprocessing(), ".nii.gz", dict(LABELS), ("T1",), 0.0, 0.0, 0, 0), model_dir)  # fmt: skip
    return model_dir, plan, states


def nnunet_plans(plan: Any) -> dict[str, Any]:
    """autoseg's plan in nnU-Net v2's plans.json form (3d_fullres only)."""
    conf = plan.configuration("3d_fullres")
    net = conf.network
    resampling = conf.resampling
    data_kwargs = {"is_seg": False, "order": resampling.image_order, "order_z": resampling.out_of_plane_order,
                   "force_separate_z": None}  # fmt: skip
    return {
        "dataset_name": DATASET,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [plan.original_median_spacing_mm[a] for a in plan.transpose_forward],
        "original_median_shape_after_transp": [plan.original_median_shape[a] for a in plan.transpose_forward],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": list(plan.transpose_forward),
        "transpose_backward": list(plan.transpose_backward),
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": conf.batch_size,
                "patch_size": list(conf.patch_size),
                "median_image_size_in_voxels": list(conf.median_shape),
                "spacing": list(conf.spacing_mm),
                "normalization_schemes": [NNUNET_NORMALIZATION[n] for n in conf.normalization],
                "use_mask_for_norm": list(conf.use_mask_for_norm),
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": data_kwargs,
                "resampling_fn_seg_kwargs": {**data_kwargs, "is_seg": True, "order": resampling.label_order},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {**data_kwargs, "order": 1},
                "architecture": {
                    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                    "arch_kwargs": {
                        "n_stages": net.num_stages,
                        "features_per_stage": list(net.features_per_stage),
                        "conv_op": "torch.nn.modules.conv.Conv3d",
                        "kernel_sizes": [list(k) for k in net.kernel_sizes],
                        "strides": [list(s) for s in net.strides],
                        "n_conv_per_stage": list(net.n_conv_per_stage),
                        "n_conv_per_stage_decoder": list(net.n_conv_per_stage_decoder),
                        "conv_bias": True,
                        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                        "dropout_op": None,
                        "dropout_op_kwargs": None,
                        "nonlin": "torch.nn.LeakyReLU",
                        "nonlin_kwargs": {"inplace": True},
                    },
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
                },
                "batch_dice": conf.batch_dice,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            str(c): {k: float(v) for k, v in vars(stats).items()}
            for c, stats in enumerate(plan.foreground_intensity_per_channel)
        },
    }


def nnunet_predictor(plan: Any, states: list[dict[str, torch.Tensor]], device: torch.device, mirroring: bool) -> Any:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from autoseg.networks import build_network

    plans_manager = PlansManager(nnunet_plans(plan))
    configuration_manager = plans_manager.get_configuration("3d_fullres")
    arch = configuration_manager.network_arch_init_kwargs
    network = get_network_from_plans(configuration_manager.network_arch_class_name, arch,
                                     configuration_manager.network_arch_init_kwargs_req_import, 1, len(LABELS),
                                     allow_init=True, deep_supervision=False)  # fmt: skip
    parameters = []
    ours = build_network(plan.configuration("3d_fullres").network, 1, len(LABELS), deep_supervision=False)
    for state in states:
        ours.load_state_dict(state)
        with torch.no_grad():  # same module order as PlainConvUNet: parameters map by position
            for mine, theirs in zip(ours.parameters(), network.parameters(), strict=True):
                theirs.copy_(mine)
        parameters.append({k: v.clone() for k, v in network.state_dict().items()})
    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=mirroring,
        perform_everything_on_device=True,
        device=device,
        verbose=False,
        allow_tqdm=False,
    )
    dataset_json = {"channel_names": {"0": "T1"}, "labels": LABELS, "numTraining": 2, "file_ending": ".nii.gz"}
    predictor.manual_initialization(network.to(device), plans_manager, configuration_manager, parameters,
                                    dataset_json, "nnUNetTrainer", (0, 1, 2))  # fmt: skip
    return predictor


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_nnunet(predictor: Any, files: list[Path], out: Path, device: torch.device) -> tuple[list[list[float]], float]:
    """(per case: [preprocess, network, export] seconds), wall seconds; the loop of predict_from_files_sequential."""
    from nnunetv2.inference.export_prediction import export_prediction_from_logits

    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    out.mkdir(parents=True, exist_ok=True)
    stages = []
    wall = time.perf_counter()
    for file in files:
        t0 = time.perf_counter()
        data, _, properties = preprocessor.run_case(
            [str(file)], None, predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json
        )
        t1 = time.perf_counter()
        logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
        synchronize(device)
        t2 = time.perf_counter()
        export_prediction_from_logits(
            logits,
            properties,
            predictor.configuration_manager,
            predictor.plans_manager,
            predictor.dataset_json,
            str(out / file.name.replace("_0000.nii.gz", "")),
        )
        stages.append([t1 - t0, t2 - t1, time.perf_counter() - t2])
    return stages, time.perf_counter() - wall


def run_autoseg(
    model_dir: Path, files: list[Path], out: Path, args: argparse.Namespace
) -> tuple[list[list[float]], float]:
    """Per case [preprocess, network, export] seconds with the stages one after the other (as nnU-Net's loop),
    then the wall seconds of ``predict_cases`` over the same cases, stages overlapped."""
    from autoseg.inference.inputs import InputCase
    from autoseg.inference.overlapped import _postprocess_and_write, _read_and_prepare, predict_cases
    from autoseg.inference.predictor import Predictor

    predictor = Predictor(model_dir, device=args.device, use_mirroring=not args.no_tta,
                          tile_batch_size=args.tile_batch_size, cpu_bf16=False if args.fp32 else None)  # fmt: skip
    if predictor.device.type == "cpu":
        print(f"autoseg's network on the CPU in {'bf16 (autocast)' if predictor.cpu_bf16 else 'float32'};"
              " nnU-Net's in float32")  # fmt: skip
    cases = [(InputCase(f.name[: -len("_0000.nii.gz")], (f,)), out / f.name.replace("_0000", "")) for f in files]
    predict_cases(predictor, cases[:1], show_progress=False)  # warm-up (not timed)
    stages = []
    for case, output_file in cases[1:]:
        prepared = _read_and_prepare(predictor, case)
        prediction = predictor.predict_prepared(prepared)
        timing = prediction.timing
        write_s = _postprocess_and_write(predictor, prediction, prepared.geometry, case.case_id, output_file)
        # device preprocessing (on CUDA by default) counts with the network: both are the device's work
        stages.append([timing.preprocess_s, timing.device_preprocess_s + timing.network_s, timing.export_s + write_s])
    wall = time.perf_counter()
    predict_cases(predictor, cases[1:], num_workers=args.workers, show_progress=False)
    return stages, time.perf_counter() - wall


def run_nnunet_from_files(predictor: Any, files: list[Path], out: Path, processes: int) -> float:
    """Wall seconds of nnU-Net's default folder prediction (predict_from_files: worker processes preprocess
    ahead and export behind), its worker start-up included."""
    folder = out.parent / "nnunet_input"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for file in files:
        (folder / file.name).symlink_to(file.resolve())
    started = time.perf_counter()
    predictor.predict_from_files(str(folder), str(out), num_processes_preprocessing=processes,
                                 num_processes_segmentation_export=processes)  # fmt: skip
    return time.perf_counter() - started


def row(name: str, stages: list[list[float]], wall: float) -> tuple[str, list[float]]:
    mean = np.mean(stages, axis=0).tolist()
    values = [*mean, sum(mean), wall / len(stages)]
    return f"{name:<24}" + "".join(f"{v:>12.2f}" for v in values), values


def read_shape(file: Path) -> tuple[int, ...]:
    from autoseg.io import read_image

    return tuple(read_image(file)[0].shape)


def peak_memory(device: torch.device) -> str:
    if device.type != "cuda":
        return ""
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return f"   peak GPU memory {peak:.1f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/predict_speed"), help="work folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, nargs=3, default=[160, 192, 160], help="voxels (z y x)")
    parser.add_argument("--spacing", type=float, default=1.0, help="isotropic spacing in mm (default 1)")
    parser.add_argument("--test-spacing", type=float, nargs=3, default=None,
                        help="spacing (z y x mm) of the predicted cases (default: --spacing; another one makes"
                        " both frameworks resample the case on the way in and back)")  # fmt: skip
    parser.add_argument("--cases", type=int, default=3, help="timed cases per framework (plus one warm-up)")
    parser.add_argument("--folds", type=int, default=1, help="folds (random networks) to average (default 1)")
    parser.add_argument("--no-tta", action="store_true", help="no mirroring (default: 8 mirrored passes)")
    parser.add_argument("--workers", type=int, default=None, help="autoseg's reader threads (default: auto)")
    parser.add_argument("--tile-batch-size", type=int, default=None, help="autoseg's network inputs per pass")
    parser.add_argument("--nnunet-processes", type=int, default=3,
                        help="nnU-Net's predict_from_files -npp/-nps (default 3, its CLI default)")  # fmt: skip
    parser.add_argument("--skip-nnunet", action="store_true", help="autoseg only")
    parser.add_argument(
        "--fp32",
        action="store_true",
        help="autoseg in float32 on a CPU too (default: bf16 where the CPU has native bf16)",
    )
    parser.add_argument("--skip-nnunet-files", action="store_true", help="skip nnU-Net's predict_from_files run")
    args = parser.parse_args()
    device = torch.device(args.device)

    test_spacing = tuple(args.test_spacing or (args.spacing,) * 3)
    raw = write_cases(args.out / "raw" / DATASET, tuple(args.size), args.spacing, 2, args.cases + 1, test_spacing)
    model_dir, plan, states = autoseg_model(raw, args.out, args.folds)
    conf = plan.configuration("3d_fullres")
    files = sorted((raw / "imagesTs").glob("*_0000.nii.gz"))
    parameters = sum(v.numel() for v in states[0].values())
    print(
        f"plan for {'x'.join(map(str, args.size))} at {args.spacing:g} mm, predicted cases"
        f" {'x'.join(map(str, read_shape(files[0])))} at {'x'.join(f'{s:g}' for s in test_spacing)} mm;"
        f" 3d_fullres patch"
        f" {'x'.join(map(str, conf.patch_size))}, {conf.network.num_stages} stages, {parameters / 1e6:.1f} M"
        f" parameters; {args.folds} fold(s), {'no mirroring' if args.no_tta else '8 mirrored passes'}, step 0.5;"
        f" device {device} ({torch.get_num_threads()} CPU threads); {args.cases} timed case(s) after one warm-up"
    )
    lines = [f"{'seconds per case':<24}" + "".join(f"{h:>12}" for h in ("preprocess", "network", "export", "sum",
                                                                      "wall/case"))]  # fmt: skip
    stages, wall = run_autoseg(model_dir, files, args.out / "pred_autoseg", args)
    line, ours = row("autoseg", stages, wall)
    lines.append(line + peak_memory(device))
    if not args.skip_nnunet:
        from importlib.metadata import version as installed_version

        predictor = nnunet_predictor(plan, states, device, not args.no_tta)
        run_nnunet(predictor, files[:1], args.out / "pred_nnunet", device)  # warm-up
        stages, wall = run_nnunet(predictor, files[1:], args.out / "pred_nnunet", device)
        line, theirs = row(f"nnU-Net {installed_version('nnunetv2')} sequential", stages, wall)
        lines.append(line + peak_memory(device))
        if not args.skip_nnunet_files:
            wall = run_nnunet_from_files(predictor, files[1:], args.out / "pred_nnunet_files", args.nnunet_processes)
            theirs[-1] = min(theirs[-1], wall / len(files[1:]))
            lines.append(f"{'nnU-Net predict_from_files':<24}" + " " * 48 + f"{wall / len(files[1:]):>12.2f}")
        lines.append(f"{'autoseg / nnU-Net':<24}" + "".join(f"{a / b:>12.2f}" for a, b in zip(ours, theirs)))
    print("\n".join(lines))
    print("(stages timed one case at a time; autoseg's wall/case overlaps the stages of consecutive cases; the ratio's"
          " wall/case is against nnU-Net's faster mode)")  # fmt: skip
    if not args.skip_nnunet:
        from autoseg.io import read_image

        agree = [
            np.mean(read_image(args.out / "pred_autoseg" / name)[0] == read_image(args.out / "pred_nnunet" / name)[0])
            for name in (f.name.replace("_0000", "") for f in files[1:])
        ]
        print(f"segmentations agree on {100 * float(np.mean(agree)):.3f} % of voxels (mean over the timed cases)")


if __name__ == "__main__":
    main()
