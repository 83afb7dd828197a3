"""From a preprocessed case's logits back to a segmentation file in the original image's geometry.

``export_prediction`` turns logits into class probabilities (softmax), resamples the probabilities to the
cropped shape at the original spacing, puts them back into the uncropped volume, undoes the transpose
(``restore_probabilities``) and writes the argmax as a label map with the original spacing, origin and
direction. Probabilities, not labels, are resampled, as in nnU-Net. One difference: nnU-Net v2 resamples
the logits and applies the softmax afterwards; here the softmax comes first, so that the volume outside
the crop is plain background (probability 1) and resampled probabilities still sum to 1 (linear
interpolation is a convex combination). Both interpolate linearly; argmaxes differ only at near-ties.

With ``save_probabilities`` the restored probabilities go to ``CASE.npz`` (key ``probabilities``,
(K, z, y, x) in the original grid) with ``CASE_probabilities.json`` beside them, for ensembling.
``autoseg predict --save-uncertainty`` adds ``uncertainty/CASE_entropy<ending>`` (``uncertainty_file``;
see ``autoseg.inference.predictor``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from autoseg import atomic, serialization
from autoseg.errors import AutosegError
from autoseg.io import Geometry, file_ending, write_segmentation
from autoseg.plan import Configuration, Plan
from autoseg.preprocessing.case import CaseProperties, restore_probabilities

if TYPE_CHECKING:
    import torch

# Stored probabilities are rounded to half precision: half the disk of float32 (a 14-class CT is
# gigabytes per case uncompressed), and a rounding error of < 5e-4 is far below what ensembled models
# disagree by. nnU-Net v2 stores float32; pass ``probabilities_dtype=np.float32`` for that.
DEFAULT_PROBABILITIES_DTYPE = np.float16
PROBABILITIES_KEY = "probabilities"
# The uncertainty map of OUT_DIR/CASE<ending>: OUT_DIR/uncertainty/CASE_entropy<ending> (``uncertainty_file``)
UNCERTAINTY_FOLDER = "uncertainty"
ENTROPY_SUFFIX = "_entropy"


@dataclass(frozen=True)
class ProbabilitiesInfo:
    """What ``CASE_probabilities.json`` says about ``CASE.npz``; load it with ``autoseg.serialization.load``.

    The geometry is the original image's, so an ensemble of stored probabilities can write its segmentation
    without any other file.
    """

    SCHEMA_VERSION = 2

    schema_version: int
    case_id: str
    configuration: str
    labels: dict[str, int]  # the plan's label names -> values
    channel_label_values: tuple[int, ...]  # label value of each probability channel, in channel order
    geometry: Geometry  # of the original image (spacing (z, y, x), origin, direction)
    shape: tuple[int, ...]  # (K, z, y, x) of the stored array
    dtype: str


def label_values(plan: Plan) -> tuple[int, ...]:
    """The label value of each output channel: the plan's label values in ascending order.

    The network's channel k predicts the k-th smallest label value, so the argmax index maps to a label
    value by this table (for the usual labels 0..K-1 it is the identity).
    """
    return tuple(sorted(plan.labels.values()))


def probabilities_files(output_file: str | Path) -> tuple[Path, Path]:
    """``CASE.npz`` and ``CASE_probabilities.json`` beside ``output_file`` (``CASE`` + its file ending)."""
    output_file = Path(output_file)
    stem, _ = _stem_and_ending(output_file)
    return output_file.with_name(f"{stem}.npz"), output_file.with_name(f"{stem}_probabilities.json")


def _stem_and_ending(output_file: Path) -> tuple[str, str]:
    """``CASE`` and ``<ending>`` of ``CASE<ending>`` (the ending as ``autoseg.io`` knows it, else the suffix)."""
    ending = file_ending(output_file) or output_file.suffix
    return (output_file.name[: len(output_file.name) - len(ending)] if ending else output_file.name), ending


def uncertainty_file(output_file: str | Path) -> Path:
    """Where ``autoseg predict --save-uncertainty`` writes the entropy map of ``OUT_DIR/CASE<ending>``:
    ``OUT_DIR/uncertainty/CASE_entropy<ending>`` (a subfolder, so that no command that reads a prediction
    folder's ``CASE<ending>`` files mistakes it for a segmentation)."""
    output_file = Path(output_file)
    stem, ending = _stem_and_ending(output_file)
    return output_file.parent / UNCERTAINTY_FOLDER / f"{stem}{ENTROPY_SUFFIX}{ending}"


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over axis 0, in float32, one channel at a time to keep temporaries small."""
    logits = np.asarray(logits, dtype=np.float32)
    top = logits.max(axis=0)
    probabilities = np.empty_like(logits)
    for k in range(logits.shape[0]):
        np.subtract(logits[k], top, out=probabilities[k])
        np.exp(probabilities[k], out=probabilities[k])
    probabilities /= probabilities.sum(axis=0, keepdims=True)
    return probabilities


def export_prediction(
    logits: np.ndarray | torch.Tensor,
    properties: CaseProperties,
    plan: Plan,
    configuration: Configuration,
    output_file: str | Path,
    save_probabilities: bool = False,
    probabilities_dtype: type[np.floating] = DEFAULT_PROBABILITIES_DTYPE,
) -> None:
    """Write the segmentation of ``logits`` (K, *shape_after_resampling) to ``output_file``, atomically.

    The file ending picks the format; the geometry is the original image's (``properties.geometry``).
    The argmax channel k becomes the k-th smallest label value of ``plan.labels`` (see ``label_values``).
    """
    values = label_values(plan)
    array = _as_numpy(logits)
    _check_logits_shape(array.shape, properties, plan, configuration)
    probabilities = restore_probabilities(softmax(array), properties, plan, configuration)
    write_segmentation(labels_from_probabilities(probabilities, values), properties.geometry, output_file)
    if save_probabilities:
        _save_probabilities(probabilities, properties, plan, configuration, output_file, probabilities_dtype)


def _check_logits_shape(
    shape: tuple[int, ...], properties: CaseProperties, plan: Plan, configuration: Configuration
) -> None:
    expected = (len(plan.labels), *properties.shape_after_resampling)
    if tuple(shape) != expected:
        raise AutosegError(
            f"case {properties.case_id}: logits of shape {tuple(shape)} do not fit the preprocessed case;"
            f" expected {expected} ({len(plan.labels)} labels of plan {plan.planner!r} x the shape after resampling"
            f" of configuration {configuration.name!r}). Was the case preprocessed for another configuration?"
        )


def export_prediction_torch(
    logits: torch.Tensor,
    properties: CaseProperties,
    plan: Plan,
    configuration: Configuration,
    output_file: str | Path,
    save_probabilities: bool = False,
    probabilities_dtype: type[np.floating] = DEFAULT_PROBABILITIES_DTYPE,
) -> None:
    """``export_prediction`` with the resampling back and the argmax done where ``logits`` are (the GPU): the
    predictor's ``restore_argmax``, so only the label map (and the probabilities when asked) cross to the host.
    The logits are consumed (overwritten). Equal to ``export_prediction`` up to float32 rounding."""
    from autoseg.inference.restore_torch import MemberLogits, restore_argmax

    values = label_values(plan)
    _check_logits_shape(tuple(logits.shape), properties, plan, configuration)
    member = MemberLogits(logits.float(), properties, plan, configuration)
    index, probabilities = restore_argmax([member], save_probabilities, probabilities_dtype)
    write_segmentation(labels_from_index(index.cpu().numpy(), values), properties.geometry, output_file)
    if probabilities is not None:
        _save_probabilities(probabilities, properties, plan, configuration, output_file, probabilities_dtype)


def _as_numpy(logits: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(logits, np.ndarray):
        return logits
    return logits.detach().float().cpu().numpy()


def labels_from_probabilities(probabilities: np.ndarray, values: Sequence[int]) -> np.ndarray:
    return labels_from_index(probabilities.argmax(axis=0), values)


def labels_from_index(index: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """Class indices -> label values (channel k is the k-th smallest label value, see ``label_values``)."""
    if tuple(values) == tuple(range(len(values))):
        return index.astype(np.uint8 if len(values) <= 256 else np.int16, copy=False)
    return np.asarray(values, dtype=np.int64)[index]


def _save_probabilities(
    probabilities: np.ndarray,
    properties: CaseProperties,
    plan: Plan,
    configuration: Configuration,
    output_file: str | Path,
    dtype: type[np.floating],
) -> None:
    info = ProbabilitiesInfo(
        schema_version=ProbabilitiesInfo.SCHEMA_VERSION,
        case_id=properties.case_id,
        configuration=configuration.name,
        labels=dict(plan.labels),
        channel_label_values=label_values(plan),
        geometry=properties.geometry,
        shape=tuple(int(s) for s in probabilities.shape),
        dtype="",  # set by write_probabilities
    )
    write_probabilities(probabilities, info, output_file, dtype)


def write_probabilities(
    probabilities: np.ndarray,
    info: ProbabilitiesInfo,
    output_file: str | Path,
    dtype: type[np.floating] = DEFAULT_PROBABILITIES_DTYPE,
) -> None:
    """``CASE.npz`` + ``CASE_probabilities.json`` beside ``output_file`` (``CASE<ending>``), atomically.

    ``info``'s shape and dtype are replaced by those of the stored array.
    """
    npz_file, json_file = probabilities_files(output_file)
    stored = probabilities.astype(dtype, copy=False)

    def _write(path: Path) -> None:
        # a file object, because np.savez_compressed would append ".npz" to a temporary name
        with open(path, "wb") as f:
            np.savez_compressed(f, probabilities=stored)  # the key is PROBABILITIES_KEY

    atomic.write_with(npz_file, _write, suffix=".npz")
    shape = tuple(int(s) for s in stored.shape)
    serialization.save(dataclasses.replace(info, shape=shape, dtype=str(stored.dtype)), json_file)


def load_probabilities(npz_file: str | Path) -> tuple[np.ndarray, ProbabilitiesInfo]:
    """Read ``CASE.npz`` and its ``CASE_probabilities.json`` (no pickles) and check that they agree."""
    npz_file = Path(npz_file)
    json_file = npz_file.with_name(f"{npz_file.name[: -len('.npz')]}_probabilities.json")
    info = serialization.load(ProbabilitiesInfo, json_file)
    try:
        with np.load(npz_file, allow_pickle=False) as data:
            probabilities = data[PROBABILITIES_KEY]
    except (OSError, ValueError, KeyError) as exc:
        raise AutosegError(
            f"{npz_file}: cannot read the stored probabilities ({exc}); predict the case again"
        ) from None
    if probabilities.shape != info.shape:
        raise AutosegError(
            f"{npz_file}: probabilities of shape {probabilities.shape}, but {json_file.name} says {info.shape};"
            " predict the case again"
        )
    return probabilities, info
