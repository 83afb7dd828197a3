"""The torch twin of keep-the-largest-component postprocessing against the CPU's cc3d path, voxel for voxel.

Volumes are random blobs (smoothed noise over a threshold) and hand-made shapes whose answer is known:
ties, corner-only contacts (one component with full connectivity, several with face connectivity), and
long serpentines that take ids many voxels along. The predictor's ``device_postprocessing`` (the default
on CUDA) is checked on a CPU against its cc3d path, with test_predict's threshold models.
"""

from __future__ import annotations

import cc3d
import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from test_predict import (  # noqa: F401  (plan is a fixture, used by name)
    LEVELS,
    ON_GRID,
    asymmetric_case,
    plan,
    write_case,
    write_model,
)

import autoseg.evaluation.postprocessing as postprocessing
import autoseg.evaluation.postprocessing_torch as postprocessing_torch
from autoseg.errors import AutosegError
from autoseg.evaluation.best import Postprocessing
from autoseg.evaluation.postprocessing import apply_postprocessing, keep_largest_component
from autoseg.evaluation.postprocessing_torch import (
    apply_postprocessing_torch,
    component_ids,
    index_space_rules,
    keep_largest_component_torch,
)
from autoseg.inference.inputs import InputCase
from autoseg.inference.overlapped import predict_cases
from autoseg.inference.predictor import Predictor
from autoseg.io import read_image


def blobs(shape: tuple[int, ...], seed: int, fraction: float, sigma: float = 1.5) -> np.ndarray:
    """A mask of ``fraction`` of the voxels: smoothed noise above its quantile, many components of many sizes."""
    smooth = ndi.gaussian_filter(np.random.default_rng(seed).random(shape), sigma)
    return smooth > np.quantile(smooth, 1 - fraction)


def blob_labels(shape: tuple[int, ...], seed: int, num_labels: int) -> np.ndarray:
    """Labels 1..num_labels where each of num_labels blob masks holds (the last one drawn wins), else 0."""
    labels = np.zeros(shape, np.uint8)
    for label in range(1, num_labels + 1):
        labels[blobs(shape, seed * 10 + label, 0.15)] = label
    return labels


def torch_keep(mask: np.ndarray) -> np.ndarray:
    return keep_largest_component_torch(torch.from_numpy(mask)).numpy()


# ------------------------------------------------------------------------------------ components, hand-made


@pytest.mark.parametrize("shape", [(20, 24, 16), (40, 36), (1, 30, 30), (32, 1)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_cc3d_on_random_blobs(shape, seed):
    for fraction in (0.2, 0.45, 0.7):
        mask = blobs(shape, seed, fraction, sigma=1.0)
        expected = keep_largest_component(mask)
        assert np.array_equal(torch_keep(mask), expected), fraction
        if fraction == 0.2:
            assert not np.array_equal(expected, mask)  # several components here: something was removed


@pytest.mark.parametrize("shape", [(16, 18, 14), (30, 28)])
def test_component_ids_are_each_components_largest_linear_index_plus_one(shape):
    mask = blobs(shape, seed=3, fraction=0.2, sigma=1.0)
    components = cc3d.connected_components(mask, connectivity=26 if mask.ndim == 3 else 8)
    assert components.max() > 5  # several components, or the check proves little
    flat = np.arange(mask.size).reshape(shape)
    expected = np.zeros(shape, np.int64)
    for component in range(1, components.max() + 1):
        inside = components == component
        expected[inside] = flat[inside].max() + 1
    assert np.array_equal(component_ids(torch.from_numpy(mask)).numpy(), expected)


@pytest.mark.parametrize("shape", [(8, 8, 8), (8, 8), (0, 4, 4)])
def test_an_empty_mask_stays_empty(shape):
    mask = np.zeros(shape, bool)
    kept = keep_largest_component_torch(torch.from_numpy(mask))
    assert kept.dtype == torch.bool and kept.shape == shape and not kept.any()


def test_a_single_voxel_is_its_own_largest_component():
    mask = np.zeros((6, 7, 5), bool)
    mask[5, 0, 4] = True
    assert np.array_equal(torch_keep(mask), mask)


def test_components_tied_for_the_largest_are_all_kept():
    mask = np.zeros((12, 12, 12), bool)
    mask[1:4, 1:4, 1:4] = True  # 27 voxels
    mask[8:11, 7:10, 0:3] = True  # 27 voxels, apart
    mask[6, 0:5, 10] = True  # 5 voxels, removed
    expected = mask.copy()
    expected[6, 0:5, 10] = False
    assert np.array_equal(torch_keep(mask), expected)
    assert np.array_equal(keep_largest_component(mask), expected)


@pytest.mark.parametrize("ndim", [2, 3])
def test_corner_contacts_join_components(ndim):
    """A diagonal chain of 6 voxels touching only by corners (3D) or by corners (2D) is one component under
    full connectivity and beats a face-connected bar of 4; with face connectivity the bar would win."""
    mask = np.zeros((10,) * ndim, bool)
    for step in range(6):
        mask[(step,) * ndim] = True
    bar = (slice(1, 5), *[8] * (ndim - 1))  # a straight bar far from the chain
    mask[bar] = True
    expected = mask.copy()
    expected[bar] = False
    assert np.array_equal(torch_keep(mask), expected)
    assert np.array_equal(keep_largest_component(mask), expected)
    face = cc3d.connected_components(mask, connectivity=6 if ndim == 3 else 4)
    assert face.max() == 7  # the chain is 6 components for face connectivity


def test_edge_contacts_join_components_in_3d():
    """Voxels sharing only an edge (two coordinates differ by one) are neighbours among the 26."""
    mask = np.zeros((9, 9, 9), bool)
    for step in range(5):
        mask[step, step, 4] = True  # edge to edge in (z, y)
        mask[4, 8 - step, step] = True  # edge to edge in (y, x), meets the first chain at (4, 4, 4)
    mask[8, 0:8, 8] = True  # a bar of 8 voxels, smaller than the 9 of the two chains together
    expected = mask.copy()
    expected[8, 0:8, 8] = False
    assert np.array_equal(torch_keep(mask), expected)


def serpentine(shape: tuple[int, ...], diagonal_turns: bool) -> np.ndarray:
    """A one-voxel-wide path winding through every other row of every other plane (linked end to end).

    With ``diagonal_turns`` each turn to the next row is a single corner contact, which only full
    connectivity follows."""
    mask = np.zeros(shape, bool)
    *planes, rows, columns = shape
    plane_indices = range(0, planes[0], 2) if planes else [None]
    for p, plane in enumerate(plane_indices):
        row_order = list(range(0, rows, 2))
        if p % 2:
            row_order.reverse()
        for r, row in enumerate(row_order):
            where = (row,) if plane is None else (plane, row)
            mask[(*where, slice(1, columns - 1))] = True
            if r + 1 < len(row_order):
                end = columns - 1 if r % 2 == 0 else 0
                between = (row + row_order[r + 1]) // 2
                link = (between, end) if plane is None else (plane, between, end)
                mask[link] = True
                if not diagonal_turns:
                    mask[(*link[:-1], end - 1 if end else 1)] = True
        if plane is not None and p + 1 < len(plane_indices):
            last_row = row_order[-1]
            end = columns - 1 if (len(row_order) - 1) % 2 == 0 else 0
            mask[plane + 1, last_row, end] = True  # up to the next plane, where the path goes on
    return mask


@pytest.mark.parametrize("check_every", [1, postprocessing_torch.CONVERGENCE_CHECK_EVERY])
@pytest.mark.parametrize(("shape", "diagonal_turns"), [((15, 24), True), ((15, 24), False), ((7, 11, 16), True)])
def test_a_long_serpentine_is_one_component(shape, diagonal_turns, check_every, monkeypatch):
    monkeypatch.setattr(postprocessing_torch, "CONVERGENCE_CHECK_EVERY", check_every)
    path = np.pad(serpentine(shape, diagonal_turns), [(0, 0)] * (len(shape) - 1) + [(0, 2)])
    connectivity = 26 if len(shape) == 3 else 8
    assert cc3d.connected_components(path, connectivity=connectivity).max() == 1  # the path is one piece
    assert path.sum() > 3 * np.prod(shape) ** (1 / len(shape)) * len(shape)  # and a long one
    mask = path.copy()
    lone = (*[0] * (len(shape) - 1), -1)  # two columns apart from the path
    mask[lone] = True
    assert not keep_largest_component(mask)[lone]
    assert np.array_equal(torch_keep(mask), path)
    ids = component_ids(torch.from_numpy(path)).numpy()
    assert np.unique(ids[path]).tolist() == [np.flatnonzero(path.ravel()).max() + 1]


def test_keep_largest_component_refuses_other_dimensions():
    with pytest.raises(ValueError, match="2D or 3D"):
        keep_largest_component_torch(torch.ones(4, dtype=torch.bool))


# ------------------------------------------------------------------------------------ rules on label maps

RULE_SETS = [
    Postprocessing(),
    Postprocessing(largest_component_foreground=True),
    Postprocessing(largest_component_labels=(1, 3)),
    Postprocessing(largest_component_foreground=True, largest_component_labels=(2,)),
    Postprocessing(largest_component_foreground=True, largest_component_labels=(3, 1, 2)),
]


@pytest.mark.parametrize("rules", RULE_SETS)
@pytest.mark.parametrize("shape", [(18, 20, 16), (48, 40)])
def test_apply_postprocessing_equals_the_cpu_one(rules, shape):
    removed = []
    for seed in range(3):
        segmentation = blob_labels(shape, seed, num_labels=3)
        expected = apply_postprocessing(segmentation, rules, [1, 2, 3])
        for dtype in (torch.uint8, torch.int64):
            tensor = torch.from_numpy(segmentation).to(dtype)
            actual = apply_postprocessing_torch(tensor, rules, [1, 2, 3])
            assert actual.dtype == dtype
            assert np.array_equal(actual.numpy(), expected), (seed, dtype)
            assert np.array_equal(tensor.numpy(), segmentation)  # the input is left alone
        removed.append(not np.array_equal(expected, segmentation))
    if rules.is_identity:
        assert not any(removed)
    else:
        assert all(removed)  # every rule set removed something on every seed: the comparison is not vacuous


def test_apply_postprocessing_on_label_values_that_are_not_consecutive():
    values = np.array([0, 2, 5, 300], np.int64)
    segmentation = values[blob_labels((16, 18, 20), seed=4, num_labels=3)]
    rules = Postprocessing(largest_component_foreground=True, largest_component_labels=(300, 2))
    expected = apply_postprocessing(segmentation, rules, [2, 5, 300])
    actual = apply_postprocessing_torch(torch.from_numpy(segmentation), rules, [2, 5, 300])
    assert np.array_equal(actual.numpy(), expected)


def test_index_space_rules_give_the_label_space_result():
    label_values = [0, 2, 5, 300]
    index = blob_labels((16, 18, 20), seed=5, num_labels=3)
    labels = np.asarray(label_values)[index]
    rules = Postprocessing(largest_component_foreground=True, largest_component_labels=(300, 2))
    index_rules, foreground = index_space_rules(rules, label_values)
    assert index_rules == Postprocessing(True, (3, 1)) and foreground == [1, 2, 3]
    on_index = apply_postprocessing_torch(torch.from_numpy(index), index_rules, foreground).numpy()
    assert np.array_equal(np.asarray(label_values)[on_index], apply_postprocessing(labels, rules, [2, 5, 300]))


def test_rules_for_labels_that_are_not_foreground_are_refused():
    segmentation = torch.zeros((4, 4, 4), dtype=torch.uint8)
    with pytest.raises(AutosegError, match="largest_component_labels"):
        apply_postprocessing_torch(segmentation, Postprocessing(False, (3,)), [1, 2])
    with pytest.raises(AutosegError, match="largest_component_labels"):
        index_space_rules(Postprocessing(False, (3,)), [0, 1, 2])
    with pytest.raises(AutosegError, match="background 0"):
        index_space_rules(Postprocessing(True), [1, 2])


# ------------------------------------------------------------------------------------ the predictor


class CallCounter:
    def __init__(self, function):
        self.function, self.calls = function, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)


def speckled_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """test_predict's asymmetric case with a speck of label-1 intensity apart from the label-1 blob."""
    image, label = asymmetric_case((20, 22, 12), seed=seed)
    speck = (slice(2, 4), slice(10, 12), slice(5, 7))
    assert not label[speck].any()
    image[(0, *speck)] = LEVELS[1]
    return image, label


@pytest.fixture
def counted(monkeypatch):
    """Counts of the CPU's and the device's postprocessing calls (the predictor imports them when called)."""
    cpu = CallCounter(postprocessing.apply_postprocessing)
    device = CallCounter(postprocessing_torch.apply_postprocessing_torch)
    monkeypatch.setattr(postprocessing, "apply_postprocessing", cpu)
    monkeypatch.setattr(postprocessing_torch, "apply_postprocessing_torch", device)
    return cpu, device


def test_device_postprocessing_equals_the_cpu_one_once_per_case(plan, tmp_path, counted):  # noqa: F811
    cpu_calls, device_calls = counted
    rules = Postprocessing(largest_component_foreground=True, largest_component_labels=(1,))
    model = write_model(tmp_path / "model", plan, ("3d_fullres",), (0,), rules)
    on_cpu = Predictor(model, device="cpu", cpu_bf16=False)
    on_device = Predictor(model, device="cpu", cpu_bf16=False, device_postprocessing=True)
    assert not on_cpu.device_postprocessing  # the default off CUDA: cc3d on the writer thread
    image, label = speckled_case(seed=5)
    raw = on_cpu.predict_prepared(on_cpu.prepare(image, ON_GRID, "case")).segmentation
    assert (raw[2:4, 10:12, 5:7] == 1).all()  # the speck is there before postprocessing
    expected, _ = on_cpu.predict_case(image, ON_GRID)
    assert (cpu_calls.calls, device_calls.calls) == (1, 0)
    actual, _ = on_device.predict_case(image, ON_GRID)
    assert (cpu_calls.calls, device_calls.calls) == (1, 1)
    assert actual.dtype == expected.dtype and np.array_equal(actual, expected)
    assert np.array_equal(actual, label)  # the speck went, the blobs stayed
    with_uncertainty = on_device.predict_case_with_uncertainty(image, ON_GRID)
    assert (cpu_calls.calls, device_calls.calls) == (1, 2)
    assert np.array_equal(with_uncertainty.segmentation, expected)


def test_device_postprocessing_in_the_overlapped_folder_run(plan, tmp_path, counted):  # noqa: F811
    cpu_calls, device_calls = counted
    rules = Postprocessing(largest_component_labels=(1, 2))
    model = write_model(tmp_path / "model", plan, ("3d_fullres",), (0,), rules)
    cases = []
    for seed in (6, 7):
        write_case(tmp_path / "input", f"case{seed}", speckled_case(seed)[0], ON_GRID)
        files = tuple(tmp_path / "input" / f"case{seed}_{c:04d}.nii.gz" for c in range(2))
        cases.append(InputCase(f"case{seed}", files))
    for name, device_postprocessing in (("cpu", False), ("device", True)):
        predictor = Predictor(model, device="cpu", cpu_bf16=False, device_postprocessing=device_postprocessing)
        todo = [(case, case.output_file(tmp_path / name, ".nii.gz")) for case in cases]
        predict_cases(predictor, todo, num_workers=1, show_progress=False)
    assert (cpu_calls.calls, device_calls.calls) == (2, 2)
    for case in cases:
        on_cpu, on_device = (read_image(tmp_path / name / f"{case.case_id}.nii.gz")[0] for name in ("cpu", "device"))
        assert np.array_equal(on_cpu, on_device) and not on_cpu[2:4, 10:12, 5:7].any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_equals_cc3d():
    for seed in range(3):
        mask = blobs((40, 48, 36), seed, 0.45)
        on_cuda = keep_largest_component_torch(torch.from_numpy(mask).cuda()).cpu().numpy()
        assert np.array_equal(on_cuda, keep_largest_component(mask))
        segmentation = blob_labels((40, 48, 36), seed, num_labels=3)
        rules = Postprocessing(True, (1, 3))
        actual = apply_postprocessing_torch(torch.from_numpy(segmentation).cuda(), rules, [1, 2, 3]).cpu().numpy()
        assert np.array_equal(actual, apply_postprocessing(segmentation, rules, [1, 2, 3]))
