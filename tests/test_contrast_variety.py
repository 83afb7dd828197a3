"""The tissue-order statistic (autoseg.data.contrast) and the ``pediatric`` trainer's use of it: the contrast
remapping stays on for an adult-only training set and is off for one that already mixes contrasts."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from autoseg.trainers.pediatric import PediatricTrainer

from autoseg.augment.params import AugmentationParams
from autoseg.data.cases import PreprocessedCases
from autoseg.data.contrast import MAX_VOXELS_PER_CLASS, ContrastVariety, case_orders, contrast_variety
from autoseg.example import make_example_dataset
from autoseg.paths import Paths
from autoseg.pipeline import plan_and_preprocess, train
from autoseg.training import checkpoint as ckpt
from autoseg.training.trainer import TrainOptions, register_trainer


def _locations(label: np.ndarray, classes: tuple[int, ...]) -> np.ndarray:
    rows = [np.column_stack([np.full(int((label == v).sum()), v), np.argwhere(label == v)]) for v in classes]
    return np.concatenate(rows).astype(np.int32)


def test_case_orders_sorts_the_classes_by_mean_intensity_per_channel() -> None:
    label = np.zeros((4, 6, 6), np.int16)
    label[:, :2], label[:, 2:4], label[:, 4:] = 1, 2, 3
    t1 = np.select([label == 1, label == 2, label == 3], [0.1, 0.5, 0.9]).astype(np.float32)
    t2 = np.select([label == 1, label == 2, label == 3], [0.9, 0.2, 0.5]).astype(np.float32)
    image = np.stack([t1, t2])
    assert case_orders(image, _locations(label, (1, 2, 3)), (1, 2, 3)) == ((1, 2, 3), (2, 3, 1))
    # a class the case lacks is left out; ties keep the label order
    flat = np.zeros_like(image)
    assert case_orders(flat, _locations(label, (1, 3)), (1, 2, 3)) == ((1, 3), (1, 3))


def test_case_orders_reads_at_most_the_cap_per_class() -> None:
    label = np.ones((30, 30, 30), np.int16)
    label[:15] = 2
    image = np.where(label == 1, 1.0, 0.0)[None].astype(np.float32)
    assert 2 * MAX_VOXELS_PER_CLASS < 15 * 900  # so every second row of class 2 at least is skipped
    image[0, 0, 0, 1] = 1e9  # the second row of class 2: read, it would make class 2 the brighter
    assert case_orders(image, _locations(label, (1, 2)), (1, 2)) == ((2, 1),)
    image[0, 0, 0, 0] = 1e9  # the first row of class 2 is read
    assert case_orders(image, _locations(label, (1, 2)), (1, 2)) == ((1, 2),)


class _Cases:
    """Stand-in for PreprocessedCases: per case, a one-channel image whose class means follow ``orders``."""

    def __init__(self, orders: dict[str, tuple[int, ...]]) -> None:
        self.orders = orders
        self.label = np.repeat(np.arange(1, 4, dtype=np.int16), 4).reshape(3, 2, 2)

    def image(self, case: str) -> np.ndarray:
        rank = {v: i for i, v in enumerate(self.orders[case])}
        present = [v for v in (1, 2, 3) if v in rank]
        return np.select([self.label == v for v in present], [float(rank[v]) for v in present])[None]

    def locations(self, case: str) -> np.ndarray:
        return _locations(self.label, tuple(v for v in (1, 2, 3) if v in self.orders[case]))


def test_contrast_variety_counts_the_cases_against_the_majority_order() -> None:
    orders = {"a": (1, 2, 3), "b": (1, 2, 3), "c": (1, 3, 2), "d": (1, 2, 3), "e": (2, 3)}
    variety = contrast_variety(_Cases(orders), list(orders), (1, 2, 3))  # type: ignore[arg-type]
    assert variety == ContrastVariety(5, ((1, 2, 3),), ("c",))  # "e" lacks class 1 and agrees on the rest
    assert variety.other_fraction == pytest.approx(0.2)
    assert "1 of 5 training cases" in variety.describe({1: "csf", 2: "gm", 3: "wm"})
    assert "csf < gm < wm" in variety.describe({1: "csf", 2: "gm", 3: "wm"})
    assert contrast_variety(_Cases(orders), list(orders), (1,)) is None  # type: ignore[arg-type]


def _trainer_with(variety: ContrastVariety | None, threshold: float | None = 0.1) -> PediatricTrainer:
    setup = SimpleNamespace(configuration=SimpleNamespace(patch_size=(32, 32, 32)), plan=SimpleNamespace(labels={}))
    trainer = PediatricTrainer(setup, TrainOptions(epochs=40))  # type: ignore[arg-type]
    trainer.contrast_variety = variety  # type: ignore[misc]  # cached_property: the instance value wins
    trainer.remap_off_from_other_contrast = threshold  # type: ignore[misc]
    return trainer


def test_pediatric_remaps_unless_the_training_set_mixes_contrasts() -> None:
    remapping = PediatricTrainer.augmentation
    one_order = ContrastVariety(20, ((1, 2, 3),), ())
    assert _trainer_with(one_order).epoch_augmentations(0) == remapping
    assert _trainer_with(None).epoch_augmentations(0) == remapping  # nothing to order: remap
    one_in_ten = ContrastVariety(20, ((1, 2, 3),), ("a", "b"))
    one_in_twenty = ContrastVariety(20, ((1, 2, 3),), ("a",))
    for trainer, shown in (
        (_trainer_with(one_in_ten), "off: 2 of 20"),
        (_trainer_with(one_in_twenty, 0.05), "off: 1 of 20"),
    ):
        assert not trainer.remaps_contrast()
        assert all(trainer.epoch_augmentations(e) == AugmentationParams() for e in (0, 29, 30, 39))
        assert trainer.notes()["contrast_remap"].startswith(shown)
    assert _trainer_with(one_in_twenty).remaps_contrast()  # 5 % < 10 %
    assert _trainer_with(one_in_ten, threshold=None).epoch_augmentations(0) == remapping  # always remap
    assert _trainer_with(one_in_ten, threshold=None).notes()["contrast_remap"].startswith("on: 2 of 20")
    assert _trainer_with(one_in_ten, threshold=None).notes()["contrast_remap"].endswith("; always")


def test_pediatric_can_draw_the_cases_of_another_order_more_often() -> None:
    ids = [f"c{i}" for i in range(8)]
    two_of_eight = ContrastVariety(8, ((1, 2, 3),), ("c0", "c5"))
    trainer = _trainer_with(two_of_eight)
    assert trainer.other_contrast_share == 0.25  # shipped
    assert trainer.case_weights(ids) is None  # 2 of 8 are a quarter already
    assert trainer.notes()["other_contrast_share"].startswith("off: 25% of the training cases in another order")
    trainer.other_contrast_share = None  # type: ignore[misc]
    assert trainer.case_weights(ids) is None and "other_contrast_share" not in trainer.notes()
    trainer.other_contrast_share = 0.5  # type: ignore[misc]
    weights = np.asarray(trainer.case_weights(ids))
    share = weights[[0, 5]].sum() / weights.sum()
    assert share == pytest.approx(0.5) and len(set(weights[[1, 2, 3, 4, 6, 7]])) == 1
    assert trainer.notes()["other_contrast_share"].startswith("on: the cases in another order drawn as at least 50%")
    trainer.other_contrast_share = 0.2  # type: ignore[misc]
    assert trainer.case_weights(ids) is None  # 2 of 8 are already 25 %
    assert trainer.notes()["other_contrast_share"] == "off: 25% of the training cases in another order, at least 20%"
    trainer.other_contrast_share = 0.3  # type: ignore[misc]
    # the dataset decides (2 of 8): a fold with 1 of 4 would be below 30 % too, one with 2 of 4 is above it
    assert trainer.case_weights(["c0", "c1", "c2", "c3"]) is not None
    assert trainer.case_weights(["c0", "c1", "c5", "c3"]) is None
    trainer.other_contrast_share = 0.5  # type: ignore[misc]
    assert trainer.case_weights(["c1", "c2"]) is None  # none of this fold's cases is in another order
    assert trainer.case_weights(["c0", "c5"]) is None  # all of them are
    remapping = _trainer_with(ContrastVariety(20, ((1, 2, 3),), ("c0",)))  # 5 %: the remapping is on instead
    remapping.other_contrast_share = 0.5  # type: ignore[misc]
    assert remapping.remaps_contrast() and remapping.case_weights(ids) is None
    assert "other_contrast_share" not in remapping.notes()


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Paths]]:
    """8 mixed-contrast and 8 adult-contrast brain phantoms of 24^3, preprocessed for 3d_fullres."""
    root = tmp_path_factory.mktemp("contrast")
    made = {}
    for contrast in ("mixed", "adult"):
        raw = make_example_dataset(
            root / contrast / "raw",
            8,
            0,
            size=24,
            show_progress=False,
            contrast=None if contrast == "mixed" else contrast,
        )
        paths = Paths(root / contrast / "pre", root / contrast / "results")
        plan_and_preprocess(raw, paths, configurations=["3d_fullres"], num_workers=1, show_progress=False)
        made[contrast] = (raw, paths)
    return made


def test_the_phantoms_mixed_training_set_shows_other_orders_and_the_adult_one_none(phantoms) -> None:
    fractions = {}
    for contrast, (raw, paths) in phantoms.items():
        folder = next((paths.preprocessed / raw.name).glob("*_3d_fullres"))
        ids = sorted(p.name[: -len(".json")] for p in folder.glob("*.json") if p.name != "configuration.json")
        variety = contrast_variety(PreprocessedCases(folder, ids), ids, (1, 2, 3))
        assert variety is not None and variety.cases == 8
        fractions[contrast] = variety.other_fraction
    assert fractions["adult"] == 0.0 and fractions["mixed"] >= 0.1, fractions


def test_pediatric_trains_as_default_on_mixed_contrasts_and_remaps_on_adult_ones(phantoms) -> None:
    options = TrainOptions(epochs=2, iterations_per_epoch=2, val_iterations=1, num_workers=0, show_progress=False,
                           validation_mirroring=False, device="cpu")  # fmt: skip
    raw, paths = phantoms["mixed"]
    folds = {t: train(raw, paths, "3d_fullres", 0, trainer=t, options=options) for t in ("default", "pediatric")}
    run = json.loads((folds["pediatric"] / "run.json").read_text())
    assert run["trainer_notes"]["contrast_remap"].startswith("off: ")
    assert run["augmentation"]["p_contrast_remap"] == 0.0
    # a quarter or more of these phantoms are in another order: every case drawn equally often, as `default`
    assert run["trainer_notes"]["other_contrast_share"].startswith("off: ")
    assert run["train_case_probabilities"] is None
    states = {t: ckpt.load_checkpoint(f / "checkpoint_final.pt")[0]["network"] for t, f in folds.items()}
    assert all(torch.equal(states["default"][k], states["pediatric"][k]) for k in states["default"])

    raw, paths = phantoms["adult"]
    run = json.loads(
        (train(raw, paths, "3d_fullres", 0, trainer="pediatric", options=options) / "run.json").read_text()
    )
    assert run["trainer_notes"]["contrast_remap"].startswith("on: 0 of 8 training cases")
    assert run["augmentation"]["p_contrast_remap"] == 0.2


@register_trainer("test_ped_half_other")
class _HalfOther(PediatricTrainer):
    other_contrast_share = 0.5


def test_the_drawn_share_reaches_the_sampler_and_run_json(phantoms) -> None:
    options = TrainOptions(epochs=1, iterations_per_epoch=1, val_iterations=1, num_workers=0, show_progress=False,
                           validation_mirroring=False, device="cpu", overwrite=True)  # fmt: skip
    raw, paths = phantoms["mixed"]
    run = json.loads(
        (train(raw, paths, "3d_fullres", 0, trainer="test_ped_half_other", options=options) / "run.json").read_text()
    )
    other = set(run["trainer_notes"]["other_contrast_cases"]) & set(run["train_cases"])
    probabilities = run["train_case_probabilities"]
    assert 0 < len(other) < len(run["train_cases"]) / 2  # these phantoms: fewer than half in another order
    assert set(probabilities) == set(run["train_cases"])
    assert sum(probabilities[c] for c in other) == pytest.approx(0.5, abs=1e-5)
    assert run["trainer_notes"]["other_contrast_share"].startswith("on: the cases in another order")
    default = json.loads((train(raw, paths, "3d_fullres", 0, options=options) / "run.json").read_text())
    assert default["train_case_probabilities"] is None
