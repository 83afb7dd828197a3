"""Benchmark: does augmentation on the device train as well as augmentation on the CPU, epoch for epoch?

    python benchmarks/augmentation_parity.py --size 48 --train 20 --test 20 --epochs 20 --iterations 40

Writes the example dataset (brain phantoms), plans ``3d_fullres``, and trains fold 0 with the ``default``
trainer twice on the same budget, seed and split: ``--augmentation cpu`` (batchgenerators in the worker
processes) and ``--augmentation device`` (the torch twin, ``autoseg/augment/device.py``, here on CPU tensors
when there is no GPU: the ops are the same on any device). Both folds are used to predict the test images,
and the table gives the test-set mean foreground Dice, the last epoch's moving-average pseudo Dice and the
training seconds of each. The two runs draw different random numbers, so their Dice differ by the run-to-run
spread of a training; what this checks is that the device path is not systematically worse.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import experiment
from experiment import foreground_dice_per_case, predict_and_score, print_table, run, train_fold

from autoseg.example import make_example_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/out/augmentation_parity", help="work folder")
    parser.add_argument("--size", type=int, default=48, help="base grid edge of the phantoms (default: 48)")
    parser.add_argument("--train", type=int, default=20, help="training cases (default: 20)")
    parser.add_argument("--test", type=int, default=20, help="test cases (default: 20)")
    parser.add_argument("--epochs", type=int, default=20, help="epochs per run (default: 20)")
    parser.add_argument("--iterations", type=int, default=40, help="iterations per epoch (default: 40)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the dataset and of training (default: 0)")
    parser.add_argument("--device", help="training device (default: CUDA when present, else CPU)")
    parser.add_argument("--reuse", action="store_true", help="keep folds that finished with the same budget")
    args = parser.parse_args()
    experiment.REUSE = args.reuse

    out = Path(args.out)
    raw = make_example_dataset(out / "raw", args.train, args.test, args.size, args.seed, show_progress=False)
    pre = out / "preprocessed"
    run("plan-and-preprocess", str(raw), "--preprocessed", str(pre), "-c", "3d_fullres")
    budget = ["--epochs", str(args.epochs), "--iterations-per-epoch", str(args.iterations),
              "--val-iterations", "10", "--seed", str(args.seed)]  # fmt: skip
    device = ["--device", args.device] if args.device else []
    rows = []
    for mode in ("cpu", "device"):
        results = out / f"results_{mode}"
        seconds = train_fold(raw, pre, results, "default", budget, extra=["--augmentation", mode, *device])
        fold = results / raw.name / "default__default__3d_fullres" / "fold_0"
        record = json.loads((fold / "run.json").read_text())
        last = json.loads((fold / "log.jsonl").read_text().splitlines()[-1])
        summary = predict_and_score(raw, pre, results, out / f"predictions_{mode}", "default")
        dice = foreground_dice_per_case(summary)
        rows.append([mode, record["augmentation_device"], len(dice), sum(dice.values()) / len(dice),
                     last["ema_pseudo_dice"], f"{seconds:.0f}"])  # fmt: skip
    print(f"\nfold 0 of {args.train} phantoms (size {args.size}), {args.epochs} epochs x {args.iterations} iterations,"
          f" seed {args.seed}; test Dice on {args.test} held-out phantoms")  # fmt: skip
    print_table(["--augmentation", "ran on", "test cases", "test Dice", "final EMA pseudo Dice", "train s"], rows)


if __name__ == "__main__":
    main()
