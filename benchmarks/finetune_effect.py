"""Benchmark: fine-tuning from a model trained on differently contrasted data versus training from scratch.

    python benchmarks/finetune_effect.py --size 48 --source-epochs 15 --epochs 5 --iterations 40

Writes two example datasets: a source of adult-contrast brain phantoms (grey matter darker than white
matter) and a small target of infant phantoms whose grey/white contrast is inverted, with smaller heads.
Trains fold 0 of ``3d_fullres`` on the source, plans the target like that model (``autoseg plan --like``),
then trains the target for a short budget three ways on the same plan, seed and split: from scratch
(``default``), from the source weights with the default recipe (``default --pretrained``) and with the
``finetune`` trainer (lower learning rate, encoder frozen for the first tenth of the epochs). Prints the
test-set Dice per label of each.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from experiment import foreground_dice_per_case, predict_and_score, print_table, run, train_fold

from autoseg.example import make_example_dataset

SOURCE = "Dataset002_AdultPhantom"
TARGET = "Dataset003_InfantPhantom"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/out/finetune_effect", help="work folder (default: %(default)s)")
    parser.add_argument("--size", type=int, default=48, help="base grid edge of the phantoms (default: 48)")
    parser.add_argument("--source-cases", type=int, default=20, help="source training cases (default: 20)")
    parser.add_argument("--target-cases", type=int, default=6, help="target training cases (default: 6)")
    parser.add_argument("--test", type=int, default=20, help="target test cases (default: 20)")
    parser.add_argument("--source-epochs", type=int, default=15, help="source epochs (default: 15)")
    parser.add_argument("--epochs", type=int, default=5, help="target epochs, the short budget (default: 5)")
    parser.add_argument("--iterations", type=int, default=40, help="iterations per epoch (default: 40)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the datasets and of training (default: 0)")
    args = parser.parse_args()

    out = Path(args.out)
    source = make_example_dataset(out / "raw", args.source_cases, 0, args.size, args.seed, show_progress=False,
                                  contrast="adult", dataset_name=SOURCE)  # fmt: skip
    target = make_example_dataset(out / "raw", args.target_cases, args.test, args.size, args.seed + 1,
                                  show_progress=False, contrast="inverted", dataset_name=TARGET)  # fmt: skip
    pre, source_results = out / "preprocessed", out / "results_source"
    run("plan-and-preprocess", str(source), "--preprocessed", str(pre), "-c", "3d_fullres")
    budget = ["--iterations-per-epoch", str(args.iterations), "--val-iterations", "10", "--seed", str(args.seed)]
    source_seconds = train_fold(source, pre, source_results, "default", ["--epochs", str(args.source_epochs), *budget])
    source_fold = source_results / SOURCE / "default__default__3d_fullres" / "fold_0"

    run("plan", str(target), "--preprocessed", str(pre), "--like", str(source_fold))
    plan_name = f"like_{SOURCE}"
    run("preprocess", str(target), "--preprocessed", str(pre), "--planner", plan_name, "-c", "3d_fullres")
    variants = [
        ("scratch", "default", []),
        ("pretrained", "default", ["--pretrained", str(source_fold)]),
        ("finetune", "finetune", ["--pretrained", str(source_fold)]),
    ]
    rows, seconds = [], {}
    target_budget = ["--epochs", str(args.epochs), *budget]
    for name, trainer, extra in variants:
        results = out / f"results_{name}"
        seconds[name] = train_fold(target, pre, results, trainer, target_budget, plan_name, extra)
        summary = predict_and_score(target, pre, results, out / f"predictions_{name}", trainer, plan_name)
        dice = foreground_dice_per_case(summary)
        label = f"{name} ({trainer}{' --pretrained' if extra else ''})"
        rows.append([label, len(dice), sum(dice.values()) / len(dice)])

    print(f"\nTarget ({TARGET}: inverted contrast, {args.target_cases} training cases, fold 0) test-set mean"
          f" foreground Dice over {args.test} cases after {args.epochs} epochs x {args.iterations} iterations;"
          f" source {SOURCE} ({args.source_cases} cases, adult contrast) trained {args.source_epochs} epochs"
          f" in {source_seconds:.0f} s")  # fmt: skip
    print_table(["target training", "cases", "foreground Dice"], rows)
    print("target training seconds: " + ", ".join(f"{n} {s:.0f}" for n, s in seconds.items()))


if __name__ == "__main__":
    main()
