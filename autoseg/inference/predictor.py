"""Predicting new images with what ``best.json`` chose: all members, all folds, mirroring, postprocessing.

``Predictor`` loads the models once and predicts one case in three stages, each timed (``timings``):

1. preprocess (CPU): ``preprocess_case`` once per distinct plan configuration of the members; with
   ``device_preprocessing`` (the default on CUDA) only reading, transposing and cropping run here, and
   normalisation and resampling run on the device at the start of stage 2
   (``autoseg.inference.preprocess_torch``, equal to ``preprocess_case`` to float32 rounding; timed
   apart as ``device_preprocess_s``);
2. network (device): the sliding window of each member, its folds averaged inside each tile;
3. export: softmax, resampling back, member averaging and argmax on the device (``restore_torch``),
   then postprocessing and writing on the CPU. With ``device_postprocessing`` (the default on CUDA) the
   postprocessing runs on the device too, on the class indices before they cross to the host
   (``autoseg.evaluation.postprocessing_torch``, equal to the CPU's cc3d path voxel for voxel), and
   ``postprocess`` then has nothing left to do.

``predict_folder`` predicts a folder (``autoseg predict``), running the stages of consecutive cases side by
side (``autoseg.inference.overlapped``). Outputs are ``CASE<file_ending>`` with the input's spacing, origin
and direction, written atomically (a killed run leaves whole files only, so ``--continue`` can trust every
file it finds).

How the averages are taken: over a member's folds the logits are averaged, as nnU-Net's predictor does,
so that a single model's prediction is exactly ``export_prediction`` of the fold-averaged logits (the path
validation takes, whose one difference from nnU-Net's export export.py describes); over the members of an
ensemble the class probabilities are averaged, as find-best scored its ensembles in cross-validation (and
as nnU-Net's ``nnUNetv2_ensemble`` does). Averaging probabilities over folds as well would need one
softmax'ed accumulator per fold instead of one sliding window for all of them (``FoldAverage``).

The uncertainty map (``save_uncertainty``, ``autoseg predict --save-uncertainty``) is the one place where
probabilities are averaged over the passes (folds x mirrorings) too: its entropy must see the passes
disagree, which the softmax of averaged logits hides. The sliding window then accumulates, beside the
logits, the mean of every pass's softmax (``models.PassProbabilities``). These are resampled back like the
segmentation's probabilities, averaged over the members, and turned into the entropy divided by log K
(``restore_torch.restore_entropy``): a float32 map in [0, 1], 0 where one class is certain (below 1e-6:
``PassProbabilities.probability_floor``; exactly 0 outside the crop box, which is background), 1 where all
K classes are equally likely. The segmentation is unchanged: still the argmax of the averaged logits. The
map is written to ``OUT_DIR/uncertainty/CASE_entropy<file_ending>`` (``export.uncertainty_file``) with the
input's geometry: a folder of its own, so that the commands that read every ``CASE<ending>`` of a
prediction folder (evaluate, postprocess) never take an entropy map for a segmentation.
Memory: one more (K, *shape) volume on the device in the sliding window's accumulator (float16 on CUDA,
float32 on a CPU) and in its float32 result, plus one float32 volume of the input's size for the map.
Time: one softmax per fold, mirrored copy and tile; measured on one CPU thread (2-level U-Net, 2 folds x 8
mirrorings, a 32x40x32 case) 3.05 s without and 3.02 s with the map, i.e. lost in the noise; with a
network that costs nothing (a 1x1 convolution) 0.049 s against 0.079 s.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from autoseg.evaluation.best import BestChoice, load_best
from autoseg.inference.export import (
    DEFAULT_PROBABILITIES_DTYPE,
    label_values,
    labels_from_index,
    probabilities_files,
    uncertainty_file,
)
from autoseg.inference.inputs import checked_input_cases
from autoseg.inference.models import Member, PassProbabilities, load_members
from autoseg.inference.preprocess_torch import CroppedCase, crop_case, finish_on_device
from autoseg.inference.restore_torch import MemberLogits, restore_argmax, restore_entropy
from autoseg.io import Geometry
from autoseg.preprocessing.case import CaseProperties, PreprocessedCase, preprocess_case

# Preprocessing without a label samples no class locations, so the seed only keeps the call deterministic.
PREPROCESSING_SEED = 0
# Network inputs per forward pass on a CPU: one. Batches only add memory traffic there (measured on 2 cores,
# a 6-stage U-Net on four 128^3 tiles: 24.1 s one at a time, 27.5 s as one batch of 4). Other devices use
# predict.py's default, which keeps a GPU busier.
CPU_TILE_BATCH_SIZE = 1


@dataclass(frozen=True)
class CaseTiming:
    """Seconds one case spent in each stage (measured where the stage ran, so stages of cases overlap)."""

    case_id: str
    preprocess_s: float  # reading the files and preprocess_case (with device_preprocessing: up to the crop)
    network_s: float  # the sliding windows of every member and fold
    export_s: float  # resampling back, argmax, postprocessing and writing
    device_preprocess_s: float = 0.0  # normalisation and resampling on the device (device_preprocessing)

    @property
    def total_s(self) -> float:
        return self.preprocess_s + self.network_s + self.export_s + self.device_preprocess_s


@dataclass
class PreparedCase:
    """A case read and preprocessed for every member (members with the same configuration share one).

    With device preprocessing, ``preprocessed`` is empty and ``cropped`` holds each member's CPU crop
    (members with the same transpose share one); ``predict_logits`` finishes them on the device and books
    its seconds in ``device_preprocess_s``.
    """

    case_id: str
    geometry: Geometry
    preprocessed: list[PreprocessedCase]  # one per member, in member order
    preprocess_s: float
    cropped: list[CroppedCase] | None = None  # one per member, in member order, with device preprocessing
    device_preprocess_s: float = 0.0


@dataclass
class CasePrediction:
    """A case's label map (z, y, x) before postprocessing (after it with the predictor's
    ``device_postprocessing``), and what else was asked for, in the input's grid."""

    segmentation: np.ndarray
    probabilities: np.ndarray | None  # (K, z, y, x) averaged over the members
    entropy: np.ndarray | None  # (z, y, x) float32 in [0, 1]: the normalised entropy (see the module docstring)
    timing: CaseTiming


class Predictor:
    """The models of ``model_dir/best.json``, loaded once, predicting cases given as arrays.

    ``device``: "cuda", "cpu", ... (default: CUDA when available, else Apple MPS, else CPU); on CUDA the
    network runs under fp16 autocast and the sliding window accumulates in fp16, as validation does.
    ``tile_batch_size``: network inputs per forward pass (mirrored copies included); default
    ``CPU_TILE_BATCH_SIZE`` on a CPU, else predict.py's. ``cpu_bf16``: on a CPU, bf16 autocast (default:
    where the CPU has native bf16 instructions, see ``autoseg.inference.precision``).
    ``device_preprocessing``: normalise and resample on the device instead of in ``prepare`` (default: on
    CUDA, where the CPU's cubic-spline resampling would hold the GPU up; off elsewhere, where both would
    share the same cores). ``device_postprocessing``: apply best.json's postprocessing in ``restore``, on the
    device, and make ``postprocess`` return its input (default: on CUDA; elsewhere cc3d on the CPU is faster).
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        folds: Sequence[int] | None = None,
        use_mirroring: bool = True,
        device: str | torch.device | None = None,
        step_size: float = 0.5,
        tile_batch_size: int | None = None,
        cpu_bf16: bool | None = None,
        device_preprocessing: bool | None = None,
        device_postprocessing: bool | None = None,
    ) -> None:
        from autoseg.inference.precision import cpu_has_native_bf16
        from autoseg.training.distributed import DistributedContext, choose_device

        self.model_dir = Path(model_dir)
        self.best: BestChoice = load_best(self.model_dir)
        self.device = choose_device(str(device) if device is not None else None, DistributedContext())
        if self.device.type == "cuda":
            # Every forward pass has the patch's shape, so cuDNN's search for the fastest kernels pays off
            # after the first tile (nnU-Net's predictor and autoseg's training loop switch it on too).
            torch.backends.cudnn.benchmark = True
        self.use_mirroring = use_mirroring
        self.step_size = step_size
        self.cpu_bf16 = cpu_has_native_bf16() if cpu_bf16 is None else cpu_bf16
        self.device_preprocessing = self.device.type == "cuda" if device_preprocessing is None else device_preprocessing
        self.device_postprocessing = (
            self.device.type == "cuda" if device_postprocessing is None else device_postprocessing
        )
        self.tile_batch_size = tile_batch_size or (CPU_TILE_BATCH_SIZE if self.device.type == "cpu" else None)
        self.members: list[Member] = load_members(self.model_dir, self.best, self.device, folds)
        self.label_values = label_values(self.members[0].plan)
        self.foreground_labels = [v for v in self.label_values if v != 0]
        self.timings: list[CaseTiming] = []

    # -- the stages -----------------------------------------------------------------------------------------
    def prepare(self, images: np.ndarray, geometry: Geometry, case_id: str) -> PreparedCase:
        """Stage 1 (CPU, thread-safe): ``images`` (C, z, y, x) preprocessed once per distinct configuration,
        or with ``device_preprocessing`` only transposed and cropped, once per distinct transpose."""
        started = time.perf_counter()
        if images.ndim != 4 or images.shape[0] != len(self.best.channel_names):
            raise ValueError(
                f"case {case_id}: images of shape {images.shape}; expected (C, z, y, x) with C ="
                f" {len(self.best.channel_names)} ({', '.join(self.best.channel_names)})"
            )
        if self.device_preprocessing:
            crops: dict[tuple[int, ...], CroppedCase] = {}
            for member in self.members:
                axes = tuple(member.plan.transpose_forward)
                if axes not in crops:
                    crops[axes] = crop_case(images, geometry, axes, case_id)
            cropped = [crops[tuple(member.plan.transpose_forward)] for member in self.members]
            return PreparedCase(case_id, geometry, [], time.perf_counter() - started, cropped=cropped)
        shared: dict[object, PreprocessedCase] = {}
        preprocessed = []
        for member in self.members:
            key = _preprocessing_key(member)
            if key not in shared:
                shared[key] = preprocess_case(
                    images, None, geometry, member.plan, member.configuration, case_id, PREPROCESSING_SEED
                )
            preprocessed.append(shared[key])
        return PreparedCase(case_id, geometry, preprocessed, time.perf_counter() - started)

    def predict_logits(self, case: PreparedCase, pass_probabilities: bool = False) -> list[MemberLogits]:
        """Stage 2 (device): each member's fold-averaged logits (K, *shape_after_resampling), on the device;
        with ``pass_probabilities`` also the mean softmax over its passes (fold x mirroring), for the entropy.
        A case prepared for device preprocessing is normalised and resampled here first (its seconds go
        to ``case.device_preprocess_s``)."""
        from autoseg.inference.predict import predict_preprocessed_case

        on_cuda = self.device.type == "cuda"
        result = []
        for member, (image, properties) in zip(self.members, self._device_inputs(case)):
            channels = member.num_classes
            logits = predict_preprocessed_case(
                PassProbabilities(member.network) if pass_probabilities else member.network,
                image,
                member.configuration,
                member.mirror_axes,
                device=self.device,
                step_size=self.step_size,
                use_mirroring=self.use_mirroring,
                num_classes=2 * channels if pass_probabilities else channels,
                tile_batch_size=self.tile_batch_size,
                use_amp=on_cuda,
                cpu_bf16=self.cpu_bf16,
                # as validation: half the accumulator's memory, within 2e-2 of float32 (tests/test_inference.py)
                accumulate_dtype=torch.float16 if on_cuda else None,
            )
            probabilities = None
            if pass_probabilities:  # two views of the one (2K, *shape) result
                logits, probabilities = logits[:channels], logits[channels:]
            result.append(MemberLogits(logits, properties, member.plan, member.configuration, probabilities))
        return result

    def _device_inputs(self, case: PreparedCase) -> list[tuple[torch.Tensor, CaseProperties]]:
        """Each member's preprocessed image on the device and its properties, shared where members agree."""
        if case.cropped is None:
            uploads: dict[int, torch.Tensor] = {}  # members that share a preprocessed case share its upload
            inputs = []
            for preprocessed in case.preprocessed:
                image = uploads.get(id(preprocessed))
                if image is None:
                    # One upload of the whole image: tiles are then cut on the device, not copied one by one.
                    image = uploads[id(preprocessed)] = torch.from_numpy(preprocessed.image).to(self.device)
                inputs.append((image, preprocessed.properties))
            return inputs
        started = time.perf_counter()
        finished: dict[object, tuple[torch.Tensor, CaseProperties]] = {}
        for member, cropped in zip(self.members, case.cropped):
            key = _preprocessing_key(member)
            if key not in finished:
                done = finish_on_device(cropped, member.plan, member.configuration, self.device)
                finished[key] = (done.image, done.properties)
        self.synchronize()
        case.device_preprocess_s = time.perf_counter() - started
        return [finished[_preprocessing_key(member)] for member in self.members]

    def restore(
        self, logits: list[MemberLogits], keep_probabilities: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Stage 3a (device): the label map (z, y, x) in the input's grid, before postprocessing (after it
        with ``device_postprocessing``), and the averaged probabilities (K, z, y, x) when asked. The logits
        are consumed (overwritten)."""
        index, probabilities = restore_argmax(logits, keep_probabilities, DEFAULT_PROBABILITIES_DTYPE)
        if self.device_postprocessing and not self.best.postprocessing.is_identity:
            from autoseg.evaluation.postprocessing_torch import apply_postprocessing_torch, index_space_rules

            rules, foreground = index_space_rules(self.best.postprocessing, self.label_values)
            index = apply_postprocessing_torch(index, rules, foreground)
        return labels_from_index(index.cpu().numpy(), self.label_values), probabilities

    def restore_uncertainty(self, logits: list[MemberLogits]) -> np.ndarray:
        """Stage 3a' (device): the normalised entropy (z, y, x) float32 in [0, 1] in the input's grid, of
        the pass probabilities of ``predict_logits(..., pass_probabilities=True)`` (consumed)."""
        return restore_entropy(logits, normalize=True).cpu().numpy()

    def postprocess(self, segmentation: np.ndarray) -> np.ndarray:
        """Stage 3b (CPU): best.json's postprocessing rules (connected components); with
        ``device_postprocessing`` ``restore`` applied them already, and ``segmentation`` comes back as is."""
        rules = self.best.postprocessing
        if rules.is_identity or self.device_postprocessing:
            return segmentation
        from autoseg.evaluation.postprocessing import apply_postprocessing

        return apply_postprocessing(segmentation, rules, self.foreground_labels)

    # -- one case, all stages -------------------------------------------------------------------------------
    def predict_case(
        self, images: np.ndarray, geometry: Geometry, case_id: str = "case", keep_probabilities: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The postprocessed label map (z, y, x) of ``images`` (C, z, y, x) with the input's ``geometry``, and
        the class probabilities (K, z, y, x) if ``keep_probabilities``. Its timing goes to ``timings``."""
        prediction = self.predict_case_with_uncertainty(images, geometry, case_id, keep_probabilities, False)
        return prediction.segmentation, prediction.probabilities

    def predict_case_with_uncertainty(
        self,
        images: np.ndarray,
        geometry: Geometry,
        case_id: str = "case",
        keep_probabilities: bool = False,
        keep_uncertainty: bool = True,
    ) -> CasePrediction:
        """``predict_case`` (its segmentation postprocessed), with the normalised entropy when
        ``keep_uncertainty``. The segmentation is the same either way."""
        case = self.prepare(images, geometry, case_id)
        started = time.perf_counter()
        prediction = self.predict_prepared(case, keep_probabilities, keep_uncertainty)
        prediction.segmentation = self.postprocess(prediction.segmentation)
        timing = prediction.timing
        elapsed = time.perf_counter() - started
        prediction.timing = dataclasses.replace(
            timing, export_s=elapsed - timing.network_s - timing.device_preprocess_s
        )
        self.timings.append(prediction.timing)
        return prediction

    def predict_prepared(
        self, case: PreparedCase, keep_probabilities: bool = False, keep_uncertainty: bool = False
    ) -> CasePrediction:
        """Stages 2 and 3 up to the label map (not postprocessed, unless ``device_postprocessing``), with their
        times (``export_s``: restore)."""
        started = time.perf_counter()
        logits = self.predict_logits(case, pass_probabilities=keep_uncertainty)
        self.synchronize()
        network_s = time.perf_counter() - started - case.device_preprocess_s
        started = time.perf_counter()
        entropy = self.restore_uncertainty(logits) if keep_uncertainty else None
        segmentation, probabilities = self.restore(logits, keep_probabilities)
        timing = CaseTiming(
            case.case_id, case.preprocess_s, network_s, time.perf_counter() - started, case.device_preprocess_s
        )
        return CasePrediction(segmentation, probabilities, entropy, timing)

    def synchronize(self) -> None:
        """Wait for the device, so that a stage's time is not booked to the next one."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @property
    def configuration_names(self) -> str:
        """The members' configurations, as probability files name what produced them."""
        return "+".join(member.configuration.name for member in self.members)


def _preprocessing_key(member: Member) -> object:
    """Members with equal keys get the same preprocessed image."""
    return (member.plan.transpose_forward, member.plan.foreground_intensity_per_channel, member.configuration)


def predict_folder(
    model_dir: Path,
    input_dir: Path,
    output_dir: Path,
    *,
    folds: Sequence[int] | None = None,
    use_mirroring: bool = True,
    save_probabilities: bool = False,
    skip_existing: bool = False,
    device: str | None = None,
    step_size: float = 0.5,
    num_workers: int | None = None,
    show_progress: bool = True,
    cpu_bf16: bool | None = None,
    save_uncertainty: bool = False,
    device_preprocessing: bool | None = None,
) -> list[Path]:
    """Predict every case of ``input_dir`` into ``output_dir``; returns the files written (skipped ones not).

    ``model_dir``: results/<dataset> (holding best.json) or a model bundle (.zip). The input is checked
    first (headers only) and every problem of every case is reported at once, before any model is loaded.
    ``skip_existing``: cases whose output (and, with ``save_probabilities``, probability files; with
    ``save_uncertainty``, the entropy map) exist are skipped. ``save_uncertainty``: also write each case's
    normalised entropy map, ``uncertainty/CASE_entropy<ending>`` (see the module docstring).
    ``num_workers``: reader threads (default: by the cores, at most ``MAX_DEFAULT_READERS``).
    ``device_preprocessing``: see ``Predictor`` (default: on CUDA).
    """
    model_dir, input_dir, output_dir = Path(model_dir), Path(input_dir), Path(output_dir)
    if model_dir.is_file():  # a model bundle: validated and unpacked into a temporary folder first
        from autoseg.bundle import opened_bundle

        with opened_bundle(model_dir) as extracted:
            return predict_folder(
                extracted, input_dir, output_dir, folds=folds, use_mirroring=use_mirroring,
                save_probabilities=save_probabilities, skip_existing=skip_existing, device=device,
                step_size=step_size, num_workers=num_workers, show_progress=show_progress, cpu_bf16=cpu_bf16,
                save_uncertainty=save_uncertainty, device_preprocessing=device_preprocessing,
            )  # fmt: skip
    best = load_best(model_dir)
    cases = checked_input_cases(input_dir, best.file_ending, best.channel_names)
    outputs = [case.output_file(output_dir, best.file_ending) for case in cases]
    todo = [
        (c, o)
        for c, o in zip(cases, outputs)
        if not (skip_existing and _already_written(o, save_probabilities, save_uncertainty))
    ]
    if not todo:
        return []
    predictor = Predictor(
        model_dir, folds=folds, use_mirroring=use_mirroring, device=device, step_size=step_size, cpu_bf16=cpu_bf16,
        device_preprocessing=device_preprocessing,
    )  # fmt: skip
    from autoseg.inference.overlapped import predict_cases

    return predict_cases(predictor, todo, save_probabilities, num_workers, show_progress, save_uncertainty)


def _already_written(output_file: Path, save_probabilities: bool, save_uncertainty: bool = False) -> bool:
    """Every file of the case is there (each was written atomically, so each is whole)."""
    if not output_file.is_file():
        return False
    if save_uncertainty and not uncertainty_file(output_file).is_file():
        return False
    return not save_probabilities or all(p.is_file() for p in probabilities_files(output_file))
