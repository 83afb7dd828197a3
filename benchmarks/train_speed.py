"""Benchmark: training speed of a brain-sized 3D plan, in three parts, on CPU and on CUDA when present.

    python benchmarks/train_speed.py --cases 4 --steps 3 --batches 20 --workers 1 2

1. the training step alone (forward, deep-supervision loss, backward, SGD) on synthetic batches already
   on the device: iterations/s (data loading excluded);
2. the data loader alone (patch sampling + batchgenerators augmentation) with N worker processes:
   batches/s (network excluded);
3. the whole loop (loader feeding the step) for the same number of steps: iterations/s, and whether it is
   data-bound (the loop is slower than the step alone by more than 10%).
On CUDA it also reports the peak GPU memory of the step. The plan is what the default planner makes for
``--cases`` brain phantoms of 160x192x160 voxels at 1 mm (the example generator), i.e. nnU-Net's brain
plan: patch 128x160x112, batch 2, 6 stages. ``--patch`` shrinks the patch for a quick look on a laptop.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def prepare(out: Path, cases: int, workers: int) -> tuple[Path, Path]:
    from preprocess import generate  # the brain phantoms of the preprocessing benchmark

    from autoseg.paths import Paths
    from autoseg.pipeline import plan_and_preprocess

    raw = generate(out / "raw", cases, (160, 192, 160), seed=0, mixed_spacing=False)
    pre = out / "preprocessed"
    plan_and_preprocess(raw, Paths(pre), configurations=["3d_fullres"], num_workers=workers, show_progress=False)
    return raw, pre


def make_run(raw: Path, pre: Path, results: Path, device: str, workers: int, batches: int, patch: list[int] | None,
             compile_network: bool):  # type: ignore[no-untyped-def]  # fmt: skip
    from autoseg import pipeline
    from autoseg.paths import Paths
    from autoseg.training.loop import Run
    from autoseg.training.trainer import Trainer, TrainOptions

    setup = pipeline.training_setup(raw, Paths(pre, results), "3d_fullres", 0)
    if patch:
        conf = dataclasses.replace(setup.configuration, patch_size=tuple(patch))
        setup = dataclasses.replace(setup, configuration=conf)
    setup = dataclasses.replace(setup, output_dir=results / "bench")
    options = TrainOptions(
        iterations_per_epoch=batches, num_workers=workers, device=device, compile=compile_network, show_progress=False
    )
    return Run(Trainer(setup, options))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(run, steps: int) -> float:  # type: ignore[no-untyped-def]
    """Seconds per training step on one synthetic batch kept on the device (after one warm-up step)."""
    conf = run.setup.configuration
    batch_size = run.trainer.batch_size
    generator = torch.Generator().manual_seed(0)
    image = torch.randn((batch_size, run.trainer.num_input_channels, *conf.patch_size), generator=generator)
    label = torch.randint(0, run.trainer.num_classes, (batch_size, *conf.patch_size), generator=generator)
    batch = {"image": image.to(run.device), "label": label.to(run.device)}
    run.model.train()
    run.train_step(batch)  # warm-up (and compilation when --compile)
    synchronize(run.device)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    started = time.perf_counter()
    for _ in range(steps):
        run.train_step(batch)
    synchronize(run.device)
    return (time.perf_counter() - started) / steps


def time_loader(loader, epoch: int) -> float:  # type: ignore[no-untyped-def]
    """Seconds per batch of a whole epoch of the loader, workers already started."""
    started = time.perf_counter()
    n = sum(1 for _ in loader.epoch(epoch))
    return (time.perf_counter() - started) / n


def time_loop(run, loader, epoch: int, steps: int) -> float:  # type: ignore[no-untyped-def]
    """Seconds per iteration of the loader feeding the step, over the first ``steps`` batches of an epoch."""
    run.model.train()
    started = time.perf_counter()
    n = 0
    for batch in loader.epoch(epoch):
        run.train_step(batch)
        n += 1
        if n == steps:
            break
    synchronize(run.device)
    return (time.perf_counter() - started) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/train_speed"), help="work folder")
    parser.add_argument("--cases", type=int, default=4, help="brain phantoms to generate (default: 4)")
    parser.add_argument("--steps", type=int, default=3, help="training steps timed, alone and fed (default: 3)")
    parser.add_argument("--batches", type=int, default=20, help="loader batches timed (default: 20)")
    parser.add_argument("--workers", type=int, nargs="+", default=[2], help="loader worker counts (default: 2)")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when present")
    parser.add_argument("--patch", type=int, nargs=3, help="override the plan's patch size")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network on CUDA")
    args = parser.parse_args()
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    raw, pre = prepare(args.out, args.cases, max(args.workers))
    rows = []
    for device in devices:
        for workers in args.workers:
            run = make_run(raw, pre, args.out / "results", device, workers, args.batches, args.patch,
                           args.compile and device == "cuda")  # fmt: skip
            conf = run.setup.configuration
            step = time_steps(run, args.steps)
            peak = torch.cuda.max_memory_allocated(run.device) / 2**30 if run.device.type == "cuda" else None
            train_ids, val_ids = run._folds()
            train_loader, val_loader = run._loaders(train_ids, val_ids)
            try:
                next(iter(train_loader.epoch(0)))  # start the workers before timing
                per_batch = time_loader(train_loader, 1)
                loop = time_loop(run, train_loader, 2, args.steps)
            finally:
                train_loader.close()
                val_loader.close()
            rows.append((device, workers, conf.patch_size, run.trainer.batch_size, step, per_batch, loop, peak))
    print()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads; {args.steps} steps timed alone and"
        f" fed by the loader, {args.batches} loader batches timed"
    )
    header = (
        f"{'device':<7} {'workers':>7} {'patch':<14} {'batch':>5} {'step it/s':>10} {'loader b/s':>11}"
        f" {'loop it/s':>10} {'data-bound':>10} {'peak GPU GB':>11}"
    )
    print(header)
    print("-" * len(header))
    for device, workers, patch, batch, step, per_batch, loop, peak in rows:
        bound = "yes" if loop > step * 1.1 else "no"
        peak_text = f"{peak:.2f}" if peak is not None else "-"
        print(
            f"{device:<7} {workers:>7} {'x'.join(map(str, patch)):<14} {batch:>5} {1 / step:>10.3f}"
            f" {1 / per_batch:>11.3f} {1 / loop:>10.3f} {bound:>10} {peak_text:>11}"
        )


if __name__ == "__main__":
    main()
