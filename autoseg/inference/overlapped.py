"""Predicting many cases with the stages of consecutive cases overlapped (``predict_folder``'s engine).

While the device predicts case i, reader threads read and preprocess case i+1 (and further ahead with
more workers), and a writer thread postprocesses and writes case i-1. Reading (SimpleITK), resampling
(BLAS) and the network (torch) release the GIL, so the threads run side by side. Memory stays bounded:
at most ``num_workers`` cases are read ahead and ``MAX_PENDING_WRITES`` wait to be written. With the
predictor's ``device_preprocessing`` (the default on CUDA) the reader threads only read and crop; normalisation
and resampling run with the network on the device.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from autoseg import atomic, serialization
from autoseg.inference.export import ProbabilitiesInfo, probabilities_files, uncertainty_file
from autoseg.inference.inputs import InputCase, read_input_case
from autoseg.inference.predictor import CasePrediction, CaseTiming, Predictor, PreparedCase
from autoseg.io import Geometry, write_image, write_segmentation
from autoseg.parallel import available_cores

# Segmentations (and probabilities) computed but not yet written; the device waits beyond this, so a
# slow disk cannot pile up cases in memory. Two keep the writer busy while the next case is computed.
MAX_PENDING_WRITES = 2
# Reader threads by default: one keeps a GPU fed on a brain-sized case (nnU-Net's 3.8 s of CPU
# preprocessing against ~1 s of network); more help when the cores are there and cases are small.
MAX_DEFAULT_READERS = 3


def predict_cases(
    predictor: Predictor,
    cases: Sequence[tuple[InputCase, Path]],
    save_probabilities: bool = False,
    num_workers: int | None = None,
    show_progress: bool = True,
    save_uncertainty: bool = False,
) -> list[Path]:
    """Predict each (case, output file) with ``predictor``, stages overlapped; timings go to ``predictor.timings``.

    ``save_uncertainty``: also each case's entropy map (``uncertainty_file``), written before its segmentation.
    """
    from tqdm import tqdm

    readers = num_workers if num_workers is not None else max(1, min(MAX_DEFAULT_READERS, available_cores() // 2))
    readers = max(1, readers)
    written: list[Path] = []
    with (
        ThreadPoolExecutor(readers, thread_name_prefix="autoseg-read") as read_pool,
        ThreadPoolExecutor(1, thread_name_prefix="autoseg-write") as write_pool,
        tqdm(total=len(cases), desc="predicting", unit="case", disable=not show_progress) as bar,
    ):
        reads: deque[Future[PreparedCase]] = deque()
        # a write in flight, its output file and the case's timing so far (export: restoring only)
        writes: deque[tuple[Future[float], Path, CaseTiming]] = deque()
        upcoming = iter(cases)

        def read_ahead() -> None:
            while len(reads) < readers and (item := next(upcoming, None)) is not None:
                reads.append(read_pool.submit(_read_and_prepare, predictor, item[0]))

        def finish_oldest_write() -> None:
            future, output_file, timing = writes.popleft()
            write_s = future.result()  # a failed write stops the run here, naming its error
            predictor.timings.append(dataclasses.replace(timing, export_s=timing.export_s + write_s))
            written.append(output_file)
            bar.update()

        try:
            read_ahead()
            for _case, output_file in cases:
                prepared = reads.popleft().result()
                read_ahead()  # the next case is read while this one is on the device
                prediction = predictor.predict_prepared(prepared, save_probabilities, save_uncertainty)
                while len(writes) >= MAX_PENDING_WRITES:
                    finish_oldest_write()
                future = write_pool.submit(
                    _postprocess_and_write, predictor, prediction, prepared.geometry, prepared.case_id, output_file
                )
                writes.append((future, output_file, prediction.timing))
                del prepared, prediction  # the writer holds what it needs; the images can go
            while writes:
                finish_oldest_write()
        finally:
            for pending in reads:
                pending.cancel()
    return written


def _read_and_prepare(predictor: Predictor, case: InputCase) -> PreparedCase:
    started = time.perf_counter()
    images, geometry = read_input_case(case)
    read_s = time.perf_counter() - started
    prepared = predictor.prepare(images, geometry, case.case_id)
    prepared.preprocess_s += read_s
    return prepared


def _postprocess_and_write(
    predictor: Predictor, prediction: CasePrediction, geometry: Geometry, case_id: str, output_file: Path
) -> float:
    """Runs on the writer thread; returns its seconds. Every file is written atomically."""
    started = time.perf_counter()
    if prediction.entropy is not None:
        write_image(prediction.entropy.astype(np.float32, copy=False), geometry, uncertainty_file(output_file))
    write_segmentation(predictor.postprocess(prediction.segmentation), geometry, output_file)
    if prediction.probabilities is not None:
        save_probabilities(prediction.probabilities, predictor, geometry, case_id, output_file)
    return time.perf_counter() - started


def save_probabilities(
    probabilities: np.ndarray, predictor: Predictor, geometry: Geometry, case_id: str, output_file: Path
) -> None:
    """``CASE.npz`` + ``CASE_probabilities.json`` in ``autoseg.inference.export``'s format, atomically."""
    npz_file, json_file = probabilities_files(output_file)

    def _write(path: Path) -> None:
        with open(path, "wb") as f:  # a file object: np.savez_compressed would append ".npz" to a temp name
            np.savez_compressed(f, probabilities=probabilities)  # the key is PROBABILITIES_KEY

    atomic.write_with(npz_file, _write, suffix=".npz")
    info = ProbabilitiesInfo(
        schema_version=ProbabilitiesInfo.SCHEMA_VERSION,
        case_id=case_id,
        configuration=predictor.configuration_names,
        labels=dict(predictor.best.labels),
        channel_label_values=tuple(predictor.label_values),
        geometry=geometry,
        shape=tuple(int(s) for s in probabilities.shape),
        dtype=str(probabilities.dtype),
    )
    serialization.save(info, json_file)
