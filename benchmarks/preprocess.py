"""Benchmark: fingerprint, plan and preprocessing of brain-sized volumes, autoseg beside nnU-Net v2.

    python benchmarks/preprocess.py --cases 20 --workers 2

Generates ``--cases`` brain phantoms of 160×192×160 voxels at 1 mm (the example dataset's generator; with
``--mixed-spacing`` every third case is at 1.2 mm, so that preprocessing resamples a third of them),
then runs each stage of autoseg and, when ``nnunetv2`` is installed, of nnU-Net on the same files with
the same number of worker processes, each stage in its own process. Prints seconds, seconds per case
and the peak resident memory of the largest process of the stage. nnU-Net installs with
``pip install nnunetv2``; on a CPU machine pin torch in the same command
(``pip install nnunetv2 torch==2.13.0``) or pip may replace the CPU torch with a CUDA build.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

DATASET = "Dataset101_BrainBench"  # nnU-Net needs the DatasetXXX_ form


def generate(raw: Path, cases: int, shape: tuple[int, int, int], seed: int, mixed_spacing: bool) -> Path:
    from autoseg.example import make_phantom
    from autoseg.io import Geometry, write_image

    root = raw / DATASET
    marker = root / "benchmark.json"
    settings = {"cases": cases, "shape": list(shape), "seed": seed, "mixed_spacing": mixed_spacing}
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return root
    shutil.rmtree(root, ignore_errors=True)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(cases):
        # every third case at 1.2 mm when mixed: the median stays 1 mm and those cases are resampled
        spacing = (1.2, 1.2, 1.2) if mixed_spacing and i % 3 == 2 else (1.0, 1.0, 1.0)
        grid = tuple(round(s / spacing[0]) for s in shape)
        geometry = Geometry(spacing, (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
        image, label = make_phantom(grid, spacing, np.random.default_rng([seed, i]))
        write_image(image, geometry, root / "imagesTr" / f"brain_{i:03d}_0000.nii.gz")
        write_image(label.astype(np.uint8), geometry, root / "labelsTr" / f"brain_{i:03d}.nii.gz")
        print(f"\rgenerated {i + 1}/{cases}", end="", flush=True)
    print()
    labels = {"background": 0, "csf": 1, "grey_matter": 2, "white_matter": 3}
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "T1"},
                "labels": labels,
                "numTraining": cases,
                "file_ending": ".nii.gz",
            },
            indent=2,
        )
    )
    marker.write_text(json.dumps(settings))
    return root


def measure(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run ``command`` in a child that reports wall seconds and the peak RSS (MB) of its largest process."""
    probe = (
        "import resource, subprocess, sys, time; t = time.perf_counter();"
        "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL);"
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss);"
        "sys.exit(r.returncode)"
    )
    out = subprocess.run([sys.executable, "-c", probe, *command], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{out.stderr[-3000:]}")
    seconds, kilobytes = out.stdout.split()
    return float(seconds), float(kilobytes) / 1024


def run_autoseg(root: Path, work: Path, workers: int, configurations: list[str]) -> dict[str, tuple[float, float]]:
    pre = work / "autoseg_preprocessed"
    shutil.rmtree(pre, ignore_errors=True)
    base = [sys.executable, "-m", "autoseg", "-q"]
    common = ["--preprocessed", str(pre)]
    return {
        "fingerprint": measure([*base, "fingerprint", str(root), *common, "--num-workers", str(workers)]),
        "plan": measure([*base, "plan", str(root), *common]),
        "preprocess": measure(
            [*base, "preprocess", str(root), *common, "--num-workers", str(workers), "-c", *configurations]
        ),
    }


def run_nnunet(raw: Path, work: Path, workers: int, configurations: list[str]) -> dict[str, tuple[float, float]]:
    pre = work / "nnunet_preprocessed"
    shutil.rmtree(pre, ignore_errors=True)
    env = {
        **os.environ,
        "nnUNet_raw": str(raw),
        "nnUNet_preprocessed": str(pre),
        "nnUNet_results": str(work / "nnunet_results"),
        "nnUNet_def_n_proc": str(workers),
    }
    dataset_id = DATASET[len("Dataset") : len("Dataset") + 3]
    return {
        "fingerprint": measure(["nnUNetv2_extract_fingerprint", "-d", dataset_id, "-np", str(workers)], env),
        "plan": measure(["nnUNetv2_plan_experiment", "-d", dataset_id], env),
        "preprocess": measure(
            [
                "nnUNetv2_preprocess",
                "-d",
                dataset_id,
                "-c",
                *configurations,
                "-np",
                *[str(workers)] * len(configurations),
            ],
            env,
        ),
    }


def plans_side_by_side(work: Path) -> list[str]:
    ours = json.loads((work / "autoseg_preprocessed" / DATASET / "plans" / "default.json").read_text())
    lines = []
    theirs_file = work / "nnunet_preprocessed" / DATASET / "nnUNetPlans.json"
    theirs = json.loads(theirs_file.read_text()) if theirs_file.is_file() else {"configurations": {}}
    for name, c in ours["configurations"].items():
        t = theirs["configurations"].get(name, {})
        lines.append(
            f"| {name} | {c['spacing_mm']} | {c['patch_size']} | {c['batch_size']} |"
            f" {t.get('spacing', '–')} | {t.get('patch_size', '–')} | {t.get('batch_size', '–')} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--shape", type=int, nargs=3, default=[160, 192, 160])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--configurations", nargs="+", default=["2d", "3d_fullres"])
    parser.add_argument("--work", type=Path, default=Path("benchmarks/out/preprocess"))
    parser.add_argument("--skip-nnunet", action="store_true")
    parser.add_argument(
        "--mixed-spacing",
        action="store_true",
        help="every third case at 1.2 mm, so that preprocessing resamples a third of the cases",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    raw = args.work / "raw"
    root = generate(raw, args.cases, tuple(args.shape), args.seed, args.mixed_spacing)
    ours = run_autoseg(root, args.work, args.workers, args.configurations)
    theirs = None
    if not args.skip_nnunet and shutil.which("nnUNetv2_extract_fingerprint"):
        theirs = run_nnunet(raw, args.work, args.workers, args.configurations)
    n = args.cases
    spacing_text = "1 mm, every third case 1.2 mm" if args.mixed_spacing else "1 mm"
    print(
        f"\n{n} cases of {'×'.join(map(str, args.shape))} voxels at {spacing_text}, {args.workers} workers,"
        f" configurations {' + '.join(args.configurations)}, {os.cpu_count()} CPUs\n"
    )
    print("| stage | autoseg s | s/case | peak MB | nnU-Net s | s/case | peak MB | nnU-Net/autoseg time |")
    print("|---|---|---|---|---|---|---|---|")
    stages = [*ours, "total"]
    for stage in stages:
        if stage == "total":
            a = (sum(v[0] for v in ours.values()), max(v[1] for v in ours.values()))
            b = (sum(v[0] for v in theirs.values()), max(v[1] for v in theirs.values())) if theirs else None
        else:
            a, b = ours[stage], theirs[stage] if theirs else None
        their_cols = f"{b[0]:.1f} | {b[0] / n:.2f} | {b[1]:.0f} | {b[0] / a[0]:.2f}×" if b else "– | – | – | –"
        print(f"| {stage} | {a[0]:.1f} | {a[0] / n:.2f} | {a[1]:.0f} | {their_cols} |")
    print("\n| configuration | autoseg spacing | patch | batch | nnU-Net spacing | patch | batch |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(plans_side_by_side(args.work)))


if __name__ == "__main__":
    main()
