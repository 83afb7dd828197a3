"""Benchmark: does the ``pediatric`` trainer's augmentation help on hard cases without hurting clean ones?

    python benchmarks/pediatric_effect.py --size 48 --train 20 --test 30 --epochs 12 --iterations 40

Writes the example dataset (brain phantoms: a third of them infants with inverted grey/white contrast, a
quarter isointense, a fifth with motion ghosts, a quarter thick-slice scans), trains fold 0 of
``3d_fullres`` with each ``--trainers`` entry on the same budget, seed and split, predicts the test images
with each and prints the mean foreground Dice per acquisition condition: clean (adult contrast, no motion,
thin slices), inverted and isointense contrast, the youngest third (smallest heads), motion ghosts and
thick slices. Both trainers see the same hard cases in training; the augmentation must make the network
cope with them better, not memorise them.

With ``--train-contrast adult`` the training cases are all adult-contrast, older (larger) heads, as a
dataset collected from adolescents, and the test cases come from a separate mixed dataset: infant contrast
and head size are then conditions the network never saw, which is what the augmentation is for.
``--train-infants N`` turns N of fold 0's training cases of that set into infants with inverted contrast: a
training set that holds a few of the test conditions.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import experiment
from experiment import (
    condition_groups,
    foreground_dice_per_case,
    group_means,
    predict_and_score,
    print_table,
    run,
    train_fold,
)

from autoseg.data.splits import kfold_splits
from autoseg.example import FILE_ENDING, case_ids, dataset_json, make_case, make_case_with_info, make_example_dataset
from autoseg.io import write_image, write_segmentation

TRAIN_ONE_CONTRAST = "Dataset004_OneContrastPhantom"
MIXED_TEST = "Dataset005_MixedPhantomTest"
TRAIN_FEW_INFANTS = "Dataset006_FewInfantsPhantom"


def make_few_infants_dataset(out: Path, num_training: int, infants: int, size: int, seed: int) -> Path:
    """``contrast="adult"`` training cases, but the last ``infants`` of fold 0's training cases (the default
    5-fold split) inverted-contrast infants, so that fold 0 trains on them; written once, then reused."""
    training, _ = case_ids(num_training, 0)
    infant_ids = set(kfold_splits(training)[0]["train"][-infants:])
    description = dataset_json(num_training, 0, size, seed, "adult", TRAIN_FEW_INFANTS)
    description["description"] = (
        f"Procedural brain T1 phantoms ({num_training} training cases, base grid {size}^3, seed {seed}): adult"
        f" contrast and adolescent heads, except {infants} infants with inverted contrast:"
        f" {', '.join(sorted(infant_ids))}."
    )
    target = out / TRAIN_FEW_INFANTS
    if target.is_dir():
        if json.loads((target / "dataset.json").read_text()) != description:
            raise SystemExit(f"{target} was made with other settings; delete it or choose another --out")
        return target
    staging = Path(tempfile.mkdtemp(prefix=f".{TRAIN_FEW_INFANTS}.partial-", dir=out))
    try:
        for split in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (staging / split).mkdir()
        for index, case_id in enumerate(training):
            image, label, geometry = make_case(index, seed, size, "inverted" if case_id in infant_ids else "adult")
            write_image(image, geometry, staging / "imagesTr" / f"{case_id}_0000{FILE_ENDING}")
            write_segmentation(label, geometry, staging / "labelsTr" / f"{case_id}{FILE_ENDING}")
        (staging / "dataset.json").write_text(json.dumps(description, indent=2))
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/out/pediatric_effect", help="work folder (default: %(default)s)")
    parser.add_argument("--size", type=int, default=48, help="base grid edge of the phantoms (default: 48)")
    parser.add_argument("--train", type=int, default=20, help="training cases (default: 20)")
    parser.add_argument("--test", type=int, default=30, help="test cases (default: 30)")
    parser.add_argument("--epochs", type=int, default=12, help="epochs per trainer (default: 12)")
    parser.add_argument("--iterations", type=int, default=40, help="iterations per epoch (default: 40)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the dataset and of training (default: 0)")
    parser.add_argument(
        "--train-seed", type=int,
        help="seed of training only, the data unchanged (default: --seed); results go to results_TRAINER_seedN",
    )  # fmt: skip
    parser.add_argument("--trainers", nargs="+", default=["default", "pediatric"], help="trainers to compare")
    parser.add_argument(
        "--train-contrast", choices=["adult", "isointense", "inverted"],
        help="train on this contrast regime only and test on a separate mixed dataset (default: mixed training)",
    )  # fmt: skip
    parser.add_argument(
        "--train-infants", type=int, default=0, metavar="N",
        help="with --train-contrast adult: N of fold 0's training cases are inverted-contrast infants",
    )  # fmt: skip
    parser.add_argument("--plugins", nargs="+", default=[], metavar="FILE", help="plug-in files (trainer variants)")
    parser.add_argument("--reuse", action="store_true", help="keep folds that finished with the same budget")
    args = parser.parse_args()
    experiment.PLUGINS[:] = [str(Path(f).resolve()) for f in args.plugins]
    experiment.REUSE = args.reuse

    out = Path(args.out)
    if args.train_contrast is None:
        raw = make_example_dataset(out / "raw", args.train, args.test, args.size, args.seed, show_progress=False)
        test, test_seed, first_test_index = raw, args.seed, args.train
    elif args.train_infants:
        if args.train_contrast != "adult":
            parser.error("--train-infants needs --train-contrast adult")
        (out / "raw").mkdir(parents=True, exist_ok=True)
        raw = make_few_infants_dataset(out / "raw", args.train, args.train_infants, args.size, args.seed)
    else:
        raw = make_example_dataset(out / "raw", args.train, 0, args.size, args.seed, show_progress=False,
                                   contrast=args.train_contrast, dataset_name=TRAIN_ONE_CONTRAST)  # fmt: skip
    if args.train_contrast is not None:
        test_seed, first_test_index = args.seed + 1, 1
        test = make_example_dataset(out / "raw", 1, args.test, args.size, test_seed, show_progress=False,
                                    dataset_name=MIXED_TEST)  # fmt: skip
    pre = out / "preprocessed"
    train_seed = args.seed if args.train_seed is None else args.train_seed
    suffix = "" if train_seed == args.seed else f"_seed{train_seed}"
    run("plan-and-preprocess", str(raw), "--preprocessed", str(pre), "-c", "3d_fullres")
    budget = ["--epochs", str(args.epochs), "--iterations-per-epoch", str(args.iterations),
              "--val-iterations", "10", "--seed", str(train_seed)]  # fmt: skip
    _, test_ids = case_ids(first_test_index, args.test)
    infos = {c: make_case_with_info(first_test_index + i, test_seed, args.size)[3] for i, c in enumerate(test_ids)}
    groups = condition_groups(infos)
    dice: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    for trainer in args.trainers:
        results = out / f"results_{trainer}{suffix}"
        seconds[trainer] = train_fold(raw, pre, results, trainer, budget)
        summary = predict_and_score(raw, pre, results, out / f"predictions_{trainer}{suffix}", trainer, test=test)
        dice[trainer] = foreground_dice_per_case(summary)

    training = f"{args.train} training cases" + (f" of {args.train_contrast} contrast" if args.train_contrast else "")
    training += f" ({args.train_infants} of fold 0's training cases infants)" if args.train_infants else ""
    print(f"\nTest-set mean foreground Dice by condition ({args.test} cases of {test.name}, size {args.size},"
          f" fold 0 of {training}, {args.epochs} epochs x {args.iterations} iterations, seed {args.seed},"
          f" training seed {train_seed})")  # fmt: skip
    per_trainer = {t: {name: (n, mean) for name, n, mean in group_means(dice[t], infos, groups)} for t in dice}
    names = [name for name, _ in groups if name in per_trainer[args.trainers[0]]]
    rows = []
    for name in names:
        n = per_trainer[args.trainers[0]][name][0]
        values = [per_trainer[t][name][1] for t in args.trainers]
        rows.append([name, n, *values, values[-1] - values[0]])
    print_table(["condition", "cases", *args.trainers, f"{args.trainers[-1]} - {args.trainers[0]}"], rows)
    print("training seconds: " + ", ".join(f"{t} {s:.0f}" for t, s in seconds.items()))


if __name__ == "__main__":
    main()
