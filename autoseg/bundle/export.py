"""Writing a bundle: the chosen models' weights as safetensors, their plans and runs, best.json, a manifest."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import stat
import tempfile
import zipfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

import autoseg
from autoseg import atomic, serialization
from autoseg.bundle.format import (
    COPY_CHUNK_BYTES,
    FORMAT,
    MANIFEST_FILE,
    REPORT_FILES,
    STORED_SUFFIXES,
    ZIP64_FROM_BYTES,
    BundleFile,
    Manifest,
    _check_weights_belong,
)
from autoseg.errors import AutosegError
from autoseg.evaluation.best import BEST_FILE, DATASET_FILE, PLAN_FILE, RUN_FILE, BestChoice, ModelRef, load_best
from autoseg.inference.weights import SAFETENSORS_FILE, load_fold_weights, save_safetensors
from autoseg.plan import Plan


def export_bundle(
    results_dataset_dir: str | Path,
    output: str | Path,
    folds: Sequence[int] | None = None,
    checkpoint: str | None = None,
) -> Path:
    """Write best.json's models (``folds``, default best.json's; ``checkpoint``, default best.json's) as a bundle."""
    results_dataset_dir, output = Path(results_dataset_dir), Path(output)
    best = load_best(results_dataset_dir)
    checkpoint = checkpoint or best.checkpoint
    if Path(checkpoint).name != checkpoint or checkpoint in ("", ".", ".."):
        raise AutosegError(
            f"checkpoint {checkpoint!r} must be a file name in each fold folder, e.g. checkpoint_final.pt"
        )
    chosen = _chosen_folds(best, folds, results_dataset_dir)
    exported = dataclasses.replace(best, folds=chosen, checkpoint=checkpoint)
    with tempfile.TemporaryDirectory(prefix="autoseg-export-") as staging_name:
        staging = Path(staging_name)
        serialization.save(exported, staging / BEST_FILE)
        sources = {BEST_FILE: staging / BEST_FILE}
        networks = {_stage_model(results_dataset_dir, m, chosen, checkpoint, staging, sources) for m in best.members}
        for pattern in REPORT_FILES:
            for path in sorted(results_dataset_dir.glob(pattern)):
                sources[path.relative_to(results_dataset_dir).as_posix()] = path
        trainers = sorted({m.trainer for m in best.members})
        atomic.write_with(output, lambda tmp: _write_zip(tmp, best.dataset, sources, trainers, sorted(networks)))
    return output


def _chosen_folds(best: BestChoice, folds: Sequence[int] | None, where: Path) -> tuple[int, ...]:
    chosen = tuple(sorted(set(folds))) if folds else best.folds
    unknown = [k for k in chosen if k not in best.folds]
    if unknown:
        raise AutosegError(
            f"{where / BEST_FILE}: fold(s) {', '.join(map(str, unknown))} are not among the folds find-best chose"
            f" ({', '.join(map(str, best.folds))}). Fix: --folds with some of those, or rerun find-best after training"
        )
    return chosen


def _stage_model(
    results_dataset_dir: Path, member: ModelRef, folds: tuple[int, ...], checkpoint: str, staging: Path,
    sources: dict[str, Path],
) -> str:  # fmt: skip
    """Add one model's files to ``sources`` (its weights converted to safetensors); returns its architecture."""
    model_dir = results_dataset_dir / member.folder
    for name in (PLAN_FILE, DATASET_FILE):
        if not (model_dir / name).is_file():
            raise AutosegError(
                f"{model_dir / name} is missing; a bundle needs the plan and the dataset description of each"
                " model. Fix: train the model with this version of autoseg (training writes both)"
            )
        sources[f"{member.folder}/{name}"] = model_dir / name
    plan = serialization.load(Plan, model_dir / PLAN_FILE)
    architecture = plan.configuration(member.configuration).network.architecture
    for fold in folds:
        fold_dir = model_dir / f"fold_{fold}"
        weights = [fold_dir / name for name in (checkpoint, SAFETENSORS_FILE) if (fold_dir / name).is_file()]
        if not weights or not (fold_dir / RUN_FILE).is_file():
            missing = RUN_FILE if weights else f"{checkpoint} (or {SAFETENSORS_FILE})"
            raise AutosegError(
                f"{fold_dir}: no {missing}. Fix: finish training this fold (autoseg train ... --resume), or"
                " export the folds that exist with --folds"
            )
        network_state, metadata = load_fold_weights(fold_dir, checkpoint)
        _check_weights_belong(metadata, member, fold, fold_dir)
        relative = f"{member.folder}/fold_{fold}"
        save_safetensors(staging / relative / SAFETENSORS_FILE, network_state, metadata)
        sources[f"{relative}/{SAFETENSORS_FILE}"] = staging / relative / SAFETENSORS_FILE
        sources[f"{relative}/{RUN_FILE}"] = fold_dir / RUN_FILE
    return architecture


def _write_zip(path: Path, dataset: str, sources: dict[str, Path], trainers: list[str], networks: list[str]) -> None:
    files: dict[str, BundleFile] = {}
    with zipfile.ZipFile(path, "w") as archive:
        for relative, source in sorted(sources.items()):
            with source.open("rb") as src:
                files[relative] = _add_entry(archive, f"{dataset}/{relative}", src, source.stat().st_size)
        manifest = Manifest(FORMAT, Manifest.SCHEMA_VERSION, dataset, autoseg.__version__,
                            datetime.now(timezone.utc).isoformat(timespec="seconds"), files, tuple(trainers),
                            tuple(networks))  # fmt: skip
        text = json.dumps(serialization.to_jsonable(manifest), indent=2).encode() + b"\n"
        _add_entry(archive, f"{dataset}/{MANIFEST_FILE}", io.BytesIO(text), len(text))


def _add_entry(archive: zipfile.ZipFile, name: str, src: IO[bytes], size: int) -> BundleFile:
    """Copy ``src`` into the zip as a regular file, hashing what is written (not what was read earlier)."""
    info = zipfile.ZipInfo(name, date_time=datetime.now().timetuple()[:6])
    info.compress_type = zipfile.ZIP_STORED if name.endswith(STORED_SUFFIXES) else zipfile.ZIP_DEFLATED
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    digest, written = hashlib.sha256(), 0
    with archive.open(info, "w", force_zip64=size >= ZIP64_FROM_BYTES) as dst:
        while chunk := src.read(COPY_CHUNK_BYTES):
            digest.update(chunk)
            dst.write(chunk)
            written += len(chunk)
    return BundleFile(digest.hexdigest(), written)
