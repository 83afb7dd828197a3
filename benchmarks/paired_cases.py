"""Paired per-case differences between prediction folders of ``pediatric_effect.py``, by condition.

Each pair ``BASE:NEW`` names two ``predictions_*`` folders under ``--out`` (``default:pediatric``,
``default_seed1:pediatric_seed1``); their per-case foreground Dice differences (NEW - BASE) are pooled over the
pairs and summarised per condition: mean, standard deviation, a one-sample t-test against 0 and how many cases
went down or up. Cases repeated under several seeds are not independent, so the p-value is only a guide.

    python benchmarks/paired_cases.py --out benchmarks/out/pediatric_few_infants --first-test-index 1 \\
        --test-seed 1 default:ped_balanced default_seed1:ped_balanced_seed1

The test set is the one ``pediatric_effect.py`` made: in distribution (no ``--train-contrast``) its cases start
at index ``--train`` with the benchmark's ``--seed``; under shift at index 1 with ``--seed`` + 1.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from experiment import condition_groups, foreground_dice_per_case
from scipy import stats

from autoseg.example import case_ids, make_case_with_info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pairs", nargs="+", metavar="BASE:NEW", help="prediction folder suffixes to compare")
    parser.add_argument("--out", required=True, help="the benchmark's work folder")
    parser.add_argument("--first-test-index", type=int, required=True, help="index of the first test case")
    parser.add_argument("--test-seed", type=int, required=True, help="seed the test cases were drawn with")
    parser.add_argument("--test", type=int, default=30, help="number of test cases (default 30)")
    parser.add_argument("--size", type=int, default=48, help="the benchmark's --size (default 48)")
    args = parser.parse_args()
    out = Path(args.out)
    pairs = []
    for pair in args.pairs:
        base, sep, new = pair.partition(":")
        if not sep or not base or not new:
            parser.error(f"{pair!r}: give a pair as BASE:NEW, e.g. default:pediatric")
        pairs.append((base, new))
    _, ids = case_ids(args.first_test_index, args.test)
    infos = {c: make_case_with_info(args.first_test_index + i, args.test_seed, args.size)[3] for i, c in enumerate(ids)}
    groups = condition_groups(infos)
    dice = {
        name: foreground_dice_per_case(out / f"predictions_{name}" / "summary.json") for pair in pairs for name in pair
    }
    print(f"{' + '.join(f'{new} - {base}' for base, new in pairs)}, per test case")
    print(f"{'condition':<28} {'pairs':>5} {'mean':>8} {'sd':>7} {'lower':>5} {'higher':>6} {'p':>6}")
    for name, member in groups:
        diffs = np.array([dice[new][c] - dice[base][c] for base, new in pairs for c in ids if member(infos[c])])
        if len(diffs) < 2:
            continue
        p = stats.ttest_1samp(diffs, 0.0).pvalue
        print(f"{name:<28} {len(diffs):>5} {diffs.mean():>+8.4f} {diffs.std(ddof=1):>7.4f} {int((diffs < 0).sum()):>5}"
              f" {int((diffs > 0).sum()):>6} {p:>6.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
