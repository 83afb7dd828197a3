"""Benchmark: is the GPU fed? The step limit, a steady epoch on each batch path, prediction.

    python benchmarks/gpu_epoch.py                       # 1 mm brains (160x192x160), nnU-Net's brain plan, CUDA
    python benchmarks/gpu_epoch.py --device cpu --shape 48 56 48 --patch 32 32 32 --iterations 4 \\
        --val-iterations 2 --loader-batches 4 --predict-cases 2          # a dry run of the script on a laptop

One run prints one table. The dataset is ``--cases`` generated brain phantoms at 1 mm (the preprocessing
benchmark's generator); the plan is the default planner's ``3d_fullres`` for them, printed above the table.
The phantoms' heads are smaller than the brains behind nnU-Net's 1 mm plan (patch 128x160x112, 6 stages):
on 160x192x160 phantoms the plan is patch 112x144x112, batch 2, 5 stages. Rows:

- step limit: seconds for ``--iterations`` training steps on one synthetic batch already on the device
  (forward, deep-supervision loss, backward, SGD; bf16 and torch.compile as the loop uses them), measured on
  the model the epochs already compiled;
- for each batch path of ``--paths``: ``cpu`` (worker processes cut and augment), ``device`` (workers cut the
  samples, the GPU augments them) and ``resident`` (the fold's cases kept on the GPU, where batches are cut
  and augmented, no workers): the loader alone (batches/s delivered on the device, augmentation included,
  no step), for device augmentation its milliseconds per batch on a sample already on the device, then the
  first epoch (the compile warm-up and the workers' start included) and one timed steady epoch of
  ``--iterations`` training + ``--val-iterations`` validation iterations, its ratio to the step limit, the
  GPU's mean utilisation during it (sampled with nvidia-smi every 100 ms when it is there), and the peak
  GPU memory;
- nnU-Net's epoch when ``nnunetv2`` is installed: its default trainer for two epochs of the same data with
  ``--workers`` augmentation processes (benchmarks/fold_vs_nnunet.py's driver), the second epoch's time from
  its log;
- prediction: ``--predict-cases`` test brains through autoseg's predictor with 8 mirror passes and
  ``--folds`` folds of random weights (the speed does not depend on them), seconds per case split into
  reading + CPU preprocessing, device work (preprocessing on the device, sliding window) and restoring +
  writing; then the wall seconds per case of ``predict_cases``, which overlaps consecutive cases.

The GPU's name, torch's version and the plan go above the table. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


STARTED = time.perf_counter()
# the batch paths compared, by the name --paths takes: where the augmentation runs, where samples are cut
PATHS = {
    "cpu": "cpu augmentation",  # worker processes cut and augment
    "device": "device, workers cut",  # workers cut the samples, the GPU augments them
    "resident": "device, cases on GPU",  # cases kept on the GPU: cut and augmented there, no workers
}


def progress(message: str) -> None:
    """Each measurement as soon as it is taken, so that a run stopped at a time limit still reports what it had."""
    print(f"[{time.perf_counter() - STARTED:6.0f} s] {message}", flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Utilisation:
    """Mean GPU utilisation (%) while the ``with`` block runs, from ``nvidia-smi -lms 100``; None without it."""

    def __init__(self, device: torch.device) -> None:
        self.enabled = device.type == "cuda" and shutil.which("nvidia-smi") is not None
        self.index = device.index or 0
        self.samples: list[float] = []
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> Utilisation:
        if self.enabled:
            command = ["nvidia-smi", "-i", str(self.index), "--query-gpu=utilization.gpu",
                       "--format=csv,noheader,nounits", "-lms", "100"]  # fmt: skip
            self._process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        return self

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            try:
                self.samples.append(float(line.strip()))
            except ValueError:
                continue

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait()

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.samples) if self.samples else None


def prepare_data(out: Path, cases: int, shape: tuple[int, int, int], workers: int) -> tuple[Path, Path]:
    from preprocess import generate  # the brain phantoms of the preprocessing benchmark

    from autoseg.paths import Paths
    from autoseg.pipeline import plan_and_preprocess

    raw = generate(out / "raw", cases, shape, seed=0, mixed_spacing=False)
    pre = out / "preprocessed"
    plan_and_preprocess(raw, Paths(pre), configurations=["3d_fullres"], num_workers=workers, show_progress=False)
    return raw, pre


def make_run(raw: Path, pre: Path, out: Path, args: argparse.Namespace, path: str) -> Any:
    from autoseg import pipeline
    from autoseg.paths import Paths
    from autoseg.training.loop import Run
    from autoseg.training.trainer import Trainer, TrainOptions

    setup = pipeline.training_setup(raw, Paths(pre, out / "results"), "3d_fullres", 0)
    if args.patch:
        setup = dataclasses.replace(
            setup, configuration=dataclasses.replace(setup.configuration, patch_size=tuple(args.patch))
        )
    setup = dataclasses.replace(setup, output_dir=out / "results" / f"bench_{path}")
    options = TrainOptions(
        iterations_per_epoch=args.iterations, val_iterations=args.val_iterations, num_workers=args.workers,
        device=args.device, compile=False if args.no_compile else None, cuda_graphs=args.cuda_graphs,
        augmentation="cpu" if path == "cpu" else "device", cases_on_device="always" if path == "resident" else "never",
        show_progress=False,
    )  # fmt: skip
    return Run(Trainer(setup, options))


def step_limit(run: Any, steps: int) -> tuple[float, float]:
    """(seconds for ``steps`` steps on one synthetic batch on the device, seconds of the first step)."""
    conf = run.setup.configuration
    generator = torch.Generator().manual_seed(0)
    shape = (run.trainer.batch_size, run.trainer.num_input_channels, *conf.patch_size)
    image = torch.randn(shape, generator=generator).to(run.device)
    label = torch.randint(0, run.trainer.num_classes, (shape[0], *shape[2:]), generator=generator).to(run.device)
    batch = {"image": image, "label": label}
    run.model.train()
    started = time.perf_counter()
    run.train_step(batch)  # compilation (when on) happens here
    synchronize(run.device)
    first = time.perf_counter() - started
    for _ in range(3):  # cuDNN's kernel search and CUDA graph recording settle in the first few steps
        run.train_step(batch)
    synchronize(run.device)
    started = time.perf_counter()
    for _ in range(steps):
        run.train_step(batch)
    synchronize(run.device)
    return time.perf_counter() - started, first


def loader_rate(loader: Any, batches: int, device: torch.device) -> float:
    """Batches per second the loader delivers on the device (workers running), no training step."""
    iterator = loader.epoch(50)
    next(iterator)  # the workers start
    started = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    synchronize(device)
    rate = batches / (time.perf_counter() - started)
    for _ in iterator:  # drain the epoch so that the next one starts cleanly
        pass
    return rate


def augmentation_ms(device_batches: Any, device: torch.device, repeats: int = 20) -> float:
    """Milliseconds per batch of the device augmentation alone, on one cut sample already on the device."""
    iterator = device_batches.loader.epoch(49)
    batch = next(iterator)
    for _ in iterator:
        pass
    image, label = device_batches.loader.to_device(batch, device)
    augment = device_batches.augmenters.at(0)
    augment(image, label, 0)  # first call: kernel selection
    synchronize(device)
    started = time.perf_counter()
    for seed in range(repeats):
        augment(image, label, seed)
    synchronize(device)
    return (time.perf_counter() - started) / repeats * 1000


def epoch_seconds(run: Any, train_loader: Any, val_loader: Any, epoch: int) -> float:
    run.position.iteration, run.position.partial_losses = 0, []  # what end_epoch does between epochs
    started = time.perf_counter()
    run.train_epoch(epoch, train_loader)
    run.position.partial_losses = []
    run.validate_epoch(epoch, val_loader)
    synchronize(run.device)
    return time.perf_counter() - started


def measure_augmentation(raw: Path, pre: Path, out: Path, args: argparse.Namespace, mode: str) -> dict[str, Any]:
    run = make_run(raw, pre, out, args, mode)
    result: dict[str, Any] = {"run": run}
    train_ids, val_ids = run._folds()
    train_loader, val_loader = run._loaders(train_ids, val_ids)
    result["ran_on"] = run.augmentation_device + (", resident" if run.cases_on_device else "")
    try:
        result["loader_per_s"] = loader_rate(train_loader, min(args.loader_batches, args.iterations - 1), run.device)
        progress(f"{mode}: loader alone {result['loader_per_s']:.2f} batches/s")
        if train_loader.augmenters is not None:
            result["augment_ms"] = augmentation_ms(train_loader, run.device)
            progress(f"{mode}: device augmentation alone {result['augment_ms']:.2f} ms per batch")
        result["warm_up_s"] = epoch_seconds(run, train_loader, val_loader, 0)  # compilation, cuDNN search, workers
        progress(f"{mode}: first epoch {result['warm_up_s']:.1f} s")
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.device)
        with Utilisation(run.device) as utilisation:
            result["epoch_s"] = epoch_seconds(run, train_loader, val_loader, 1)
        result["utilisation"] = utilisation.mean
        if run.device.type == "cuda":
            result["peak_gb"] = torch.cuda.max_memory_allocated(run.device) / 2**30
        measured = ", ".join(f"{k} {v:.2f}" for k, v in result.items() if isinstance(v, float))
        progress(f"{mode}: {measured}")
    finally:
        train_loader.close()
        val_loader.close()
    return result


def nnunet_epoch(raw: Path, out: Path, workers: int) -> float | None:
    """nnU-Net's second epoch time on the same data, or None when nnunetv2 is not installed."""
    try:
        import nnunetv2  # noqa: F401
    except ImportError:
        return None
    import re

    from fold_vs_nnunet import nnunet_fold

    work = out / "nnunet"
    dataset = work / "raw_link" / "Dataset001_BrainPhantom"
    dataset.parent.mkdir(parents=True, exist_ok=True)
    if not dataset.exists():
        dataset.symlink_to(raw.resolve())
    try:
        validation, _, _ = nnunet_fold(dataset, work, 2, workers)
    except Exception as error:  # a benchmark row, not the benchmark: say why it is missing
        print(f"nnU-Net's epoch not measured: {error}")
        return None
    log = next(validation.parent.glob("training_log_*.txt")).read_text()
    times = [float(t) for t in re.findall(r"Epoch time: ([0-9.]+) s", log)]
    return times[-1] if times else None


def measure_prediction(out: Path, args: argparse.Namespace, shape: tuple[int, int, int]) -> dict[str, float]:
    from predict_speed import autoseg_model, run_autoseg, write_cases

    work = out / "predict"
    raw = write_cases(work / "raw", shape, 1.0, 2, args.predict_cases + 1, (1.0, 1.0, 1.0))
    model_dir, _, _ = autoseg_model(raw, work, args.folds)
    files = sorted((raw / "imagesTs").glob("*_0000.nii.gz"))
    predictions = work / "predictions"
    shutil.rmtree(predictions, ignore_errors=True)
    predictions.mkdir(parents=True)
    options = argparse.Namespace(device=args.device, no_tta=False, tile_batch_size=None, fp32=False, workers=None)
    stages, wall = run_autoseg(model_dir, files, predictions, options)
    read, device, write = (statistics.fmean(s[i] for s in stages) for i in range(3))
    return {"read": read, "device": device, "write": write, "wall": wall / max(len(files) - 1, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/gpu_epoch"), help="work folder")
    parser.add_argument("--cases", type=int, default=5, help="training brains (default 5: nnU-Net's 5 folds need 5)")
    parser.add_argument("--shape", type=int, nargs=3, default=[160, 192, 160], help="brain grid at 1 mm")
    parser.add_argument("--patch", type=int, nargs=3, help="override the plan's patch size (a dry run)")
    parser.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    parser.add_argument("--iterations", type=int, default=250, help="training iterations per epoch (default 250)")
    parser.add_argument("--val-iterations", type=int, default=50, help="validation iterations (default 50)")
    parser.add_argument("--loader-batches", type=int, default=50, help="batches timed for the loader alone")
    parser.add_argument("--workers", type=int, default=None, help="loader processes (default: the cores)")
    parser.add_argument("--no-compile", action="store_true", help="eager mode instead of torch.compile")
    parser.add_argument("--cuda-graphs", action="store_true", help="CUDA graphs for the compiled step")
    parser.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS),
                        help="which batch paths to measure (default all three: " + "; ".join(
                            f"{k}: {v}" for k, v in PATHS.items()) + ")")  # fmt: skip
    parser.add_argument("--skip-nnunet", action="store_true", help="do not run nnU-Net even if installed")
    parser.add_argument("--predict-cases", type=int, default=3, help="timed test brains (default 3; 0: skip)")
    parser.add_argument("--folds", type=int, default=1, help="folds of random weights for prediction")
    args = parser.parse_args()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.workers is None:
        from autoseg.parallel import available_cores

        args.workers = available_cores()
    shape = tuple(args.shape)
    raw, pre = prepare_data(args.out, args.cases, shape, args.workers)  # type: ignore[arg-type]
    progress("data generated and preprocessed")

    results = {mode: measure_augmentation(raw, pre, args.out, args, mode) for mode in args.paths}
    run = results[args.paths[-1]]["run"]
    for mode in PATHS:
        results.setdefault(mode, {"ran_on": "not run"})
    limit, first = step_limit(run, args.iterations)
    progress(f"step limit {limit:.2f} s for {args.iterations} steps (first step, on the trained model: {first:.2f} s)")
    nnunet = None if args.skip_nnunet else nnunet_epoch(raw, args.out, args.workers)
    predict = measure_prediction(args.out, args, shape) if args.predict_cases > 0 else None  # type: ignore[arg-type]
    if predict is not None:
        progress(f"prediction, s per case: {predict}")

    conf = run.setup.configuration
    name = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else "CPU"
    print()
    precision = str(run.autocast_dtype).replace("torch.", "") if run.autocast_dtype else "float32"
    print(f"device: {name}; torch {torch.__version__}; compile {run.compile}, CUDA graphs {run.cuda_graphs},"
          f" precision {precision}")  # fmt: skip
    print(
        f"plan 3d_fullres: patch {'x'.join(map(str, conf.patch_size))}, batch {run.trainer.batch_size},"
        f" {conf.network.num_stages} stages; {args.cases} brains of {'x'.join(map(str, shape))} at 1 mm;"
        f" {args.workers} loader processes; epoch = {args.iterations} + {args.val_iterations} iterations"
    )

    def text(value: float | None, fmt: str = ".2f") -> str:
        return "-" if value is None else format(value, fmt)

    def row(label: str, key: str, fmt: str = ".2f") -> tuple[str, ...]:
        return (label, *(text(results[mode].get(key), fmt) for mode in PATHS))

    for measured in results.values():
        if "epoch_s" in measured:
            measured["ratio"] = measured["epoch_s"] / limit
    rows = [
        ("step limit, s per epoch's training steps", *[text(limit)] * len(PATHS)),
        ("augmentation ran on", *(str(results[mode]["ran_on"]) for mode in PATHS)),
        row("loader alone, batches/s", "loader_per_s"),
        row("device augmentation alone, ms/batch", "augment_ms"),
        row("first epoch (compile warm-up included), s", "warm_up_s"),
        row("steady epoch, s", "epoch_s"),
        row("epoch / step limit", "ratio"),
        row("GPU utilisation in the epoch, %", "utilisation", ".0f"),
        row("peak GPU memory, GB", "peak_gb"),
        ("nnU-Net epoch (its log), s", text(nnunet), "", ""),
    ]
    if predict is not None:
        rows += [
            ("predict: read + CPU preprocessing, s/case", text(predict["read"]), "", ""),
            ("predict: device work, s/case", text(predict["device"]), "", ""),
            ("predict: restore + write, s/case", text(predict["write"]), "", ""),
            ("predict: wall, cases overlapped, s/case", text(predict["wall"]), "", ""),
        ]
    width = max(len(r[0]) for r in rows) + 2
    print(f"{'':<{width}}" + "".join(f"{PATHS[mode]:>22}" for mode in PATHS))
    for label, *cells in rows:
        print(f"{label:<{width}}" + "".join(f"{cell:>22}" for cell in cells))


if __name__ == "__main__":
    main()
