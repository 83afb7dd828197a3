"""Benchmark: one fold trained by autoseg and by nnU-Net v2 on the same data, budget and cores.

    python benchmarks/fold_vs_nnunet.py --epochs 10 --size 48 --cases 20 --workers 2

Writes the example dataset (brain phantoms; ``--size`` voxels per edge at 2 mm), then for each framework,
each in its own process: plan and preprocess ``3d_fullres``, train fold 0 for ``--epochs`` epochs of 250
iterations (nnU-Net's default ``nnUNetTrainer`` with ``num_epochs`` set)
with ``--workers`` augmentation processes, and predict the fold's held-out cases with mirroring. Both
frameworks use the same split (KFold, seed 12345, sorted case ids). Both validation folders are then
scored by the same evaluator against the same labels, and the table gives the Dice per class, its
foreground mean, and the mean seconds per epoch from each framework's own log. On a machine without a GPU
both train on the CPU. nnU-Net installs with ``pip install nnunetv2 torch==<the torch you have>``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

DATASET = "Dataset001_BrainPhantom"
NNUNET_DRIVER = """
import json, torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
folder = "{preprocessed}/{dataset}"
plans = json.load(open(folder + "/nnUNetPlans.json"))
plans["continue_training"] = False
dataset_json = json.load(open(folder + "/dataset.json"))
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
trainer = nnUNetTrainer(plans, "3d_fullres", 0, dataset_json, device=device)
trainer.num_epochs = {epochs}
trainer.run_training()
trainer.perform_actual_validation(False)
"""


def run(command: list[str], env: dict[str, str] | None = None) -> float:
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    return time.perf_counter() - started


def autoseg_fold(raw: Path, out: Path, epochs: int, workers: int, train: bool = True) -> tuple[Path, float, float]:
    pre, results = out / "autoseg_preprocessed", out / "autoseg_results"
    fold = results / DATASET / "default__default__3d_fullres" / "fold_0"
    autoseg = [sys.executable, "-m", "autoseg", "-q"]
    seconds = float("nan")
    if train:
        run([*autoseg, "plan-and-preprocess", str(raw), "--preprocessed", str(pre), "-c", "3d_fullres",
             "--num-workers", str(workers)])  # fmt: skip
        seconds = run([*autoseg, "train", str(raw), "3d_fullres", "0", "--preprocessed", str(pre),
                       "--results", str(results), "--epochs", str(epochs), "--num-workers", str(workers),
                       "--overwrite"])  # fmt: skip
    records = [json.loads(line) for line in (fold / "log.jsonl").read_text().splitlines()]
    per_epoch = sum(r["epoch_seconds"] for r in records) / len(records)
    return fold / "validation", per_epoch, seconds


def nnunet_fold(raw: Path, out: Path, epochs: int, workers: int, train: bool = True) -> tuple[Path, float, float]:
    env = {
        **os.environ,
        "nnUNet_raw": str(out / "nnunet_raw"),
        "nnUNet_preprocessed": str(out / "nnunet_preprocessed"),
        "nnUNet_results": str(out / "nnunet_results"),
        "nnUNet_n_proc_DA": str(workers),
    }
    seconds = float("nan")
    if train:
        (out / "nnunet_raw").mkdir(parents=True, exist_ok=True)
        link = out / "nnunet_raw" / DATASET
        if not link.exists():
            link.symlink_to(raw.resolve())
        bin_dir = Path(sys.executable).parent
        run([str(bin_dir / "nnUNetv2_plan_and_preprocess"), "-d", "1", "-c", "3d_fullres", "-np", str(workers)], env)
        shutil.rmtree(out / "nnunet_results", ignore_errors=True)
        # nnUNetv2_train finds trainers by importing every trainer module, some of which need timm and
        # torchvision; building nnUNetTrainer directly (as run_training does) needs neither, and lets us set any
        # epoch count on the default trainer instead of picking an nnUNetTrainer_<N>epochs variant.
        driver = NNUNET_DRIVER.format(preprocessed=out / "nnunet_preprocessed", dataset=DATASET, epochs=epochs)
        seconds = run([sys.executable, "-c", driver], env)
    fold = out / "nnunet_results" / DATASET / "nnUNetTrainer__nnUNetPlans__3d_fullres" / "fold_0"
    log = next(fold.glob("training_log_*.txt")).read_text()
    times = [float(t) for t in re.findall(r"Epoch time: ([0-9.]+) s", log)]
    return fold / "validation", sum(times) / len(times), seconds


def score(validation: Path, raw: Path, labels: dict[str, int]) -> dict[str, object]:
    from autoseg.evaluation.evaluate import evaluate_folder

    cases = sorted(p.name[: -len(".nii.gz")] for p in validation.glob("*.nii.gz"))
    return evaluate_folder(
        validation,
        raw / "labelsTr",
        labels=labels,
        file_ending=".nii.gz",
        output_file=validation.parent / "same_evaluator_summary.json",
        case_ids=cases,
        show_progress=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/fold_vs_nnunet"), help="work folder")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of 250 iterations (default: 10)")
    parser.add_argument("--size", type=int, default=48, help="example grid edge in voxels (default: 48)")
    parser.add_argument("--cases", type=int, default=20, help="training cases (default: 20)")
    parser.add_argument("--workers", type=int, default=2, help="augmentation processes for both (default: 2)")
    parser.add_argument("--skip-nnunet", action="store_true", help="train autoseg only")
    parser.add_argument("--reuse-autoseg", action="store_true", help="score autoseg's finished fold again, no training")
    parser.add_argument("--reuse-nnunet", action="store_true", help="score nnU-Net's finished fold again, no training")
    args = parser.parse_args()

    from autoseg.example import make_example_dataset

    raw = make_example_dataset(args.out / "raw", num_training=args.cases, num_test=0, size=args.size,
                               show_progress=False)  # fmt: skip
    labels = json.loads((raw / "dataset.json").read_text())["labels"]
    rows = []
    ours = autoseg_fold(raw, args.out, args.epochs, args.workers, train=not args.reuse_autoseg)
    rows.append(("autoseg", *ours))
    if not args.skip_nnunet:
        rows.append(("nnU-Net v2", *nnunet_fold(raw, args.out, args.epochs, args.workers, not args.reuse_nnunet)))
    names = [n for n, v in sorted(labels.items(), key=lambda kv: kv[1]) if v != 0]
    header = f"{'framework':<11} " + " ".join(f"{n[:12]:>12}" for n in names)
    header += f" {'fg mean':>8} {'HD95 mm':>8} {'s/epoch':>8} {'total s':>8}"
    setting = f"{args.epochs} epochs x 250 iterations, {args.cases} cases of {args.size}^3, {args.workers} workers"
    print(f"\nfold 0, {setting}")
    print(header)
    print("-" * len(header))
    for name, validation, per_epoch, total in rows:
        summary = score(validation, raw, labels)
        means = summary["mean"]  # type: ignore[index]
        fg = summary["foreground_mean"]  # type: ignore[index]
        dice = " ".join(f"{means[str(labels[n])]['Dice']:>12.4f}" for n in names)
        hd = fg["HD95_mm"]
        hd_text = f"{hd:>8.2f}" if hd is not None else f"{'inf':>8}"
        total_text = f"{total:>8.0f}" if total == total else f"{'-':>8}"  # nan: reused, not timed
        print(f"{name:<11} {dice} {fg['Dice']:>8.4f} {hd_text} {per_epoch:>8.1f} {total_text}")


if __name__ == "__main__":
    main()
