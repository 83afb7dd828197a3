"""Reading a bundle: validated completely before anything is written, then unpacked atomically."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from autoseg import serialization
from autoseg.bundle.format import (
    ALLOWED_SUFFIXES,
    COPY_CHUNK_BYTES,
    FORMAT,
    MANIFEST_FILE,
    MAX_BUNDLE_BYTES,
    MAX_TEXT_BYTES,
    PICKLE_PROTOCOL_OPCODE,
    PICKLE_SUFFIXES,
    PNG_SIGNATURE,
    REFUSED,
    TEXT_SUFFIXES,
    BundleFile,
    Manifest,
    _check_weights_belong,
)
from autoseg.errors import AutosegError
from autoseg.evaluation.best import BEST_FILE, DATASET_FILE, PLAN_FILE, RUN_FILE, BestChoice, ModelRef
from autoseg.inference.weights import SAFETENSORS_FILE, load_safetensors
from autoseg.plan import Plan


def import_bundle(bundle: str | Path, results_root: str | Path, overwrite: bool = False) -> Path:
    """Validate ``bundle`` and unpack it as ``<results_root>/<dataset>``; returns that folder."""
    return extract_bundle(bundle, results_root, overwrite=overwrite)


def is_bundle(path: str | Path) -> bool:
    """A file (not a results folder) that is a zip: what ``predict -m`` treats as a bundle."""
    return Path(path).is_file() and zipfile.is_zipfile(path)


@contextmanager
def opened_bundle(bundle: str | Path) -> Iterator[Path]:
    """The bundle validated and unpacked into a temporary folder (removed afterwards): a results/<dataset> dir."""
    with tempfile.TemporaryDirectory(prefix="autoseg-bundle-") as tmp:
        yield extract_bundle(bundle, tmp)


def extract_bundle(bundle: str | Path, target_dir: str | Path, overwrite: bool = False) -> Path:
    """Validate ``bundle`` completely, then unpack it as ``target_dir/<dataset>``; returns that folder."""
    bundle, target_dir = Path(bundle), Path(target_dir)
    if not bundle.is_file():
        raise AutosegError(f"model bundle {bundle} does not exist. Fix: the path given to import-model / predict -m")
    try:
        archive = zipfile.ZipFile(bundle)
    except (zipfile.BadZipFile, OSError) as exc:
        raise AutosegError(f"{bundle}: not a model bundle (not a zip file: {exc}). {REFUSED}") from exc
    with archive:
        dataset, entries = _checked_entries(bundle, archive)
        manifest, texts = _read_manifest(bundle, archive, dataset, entries)
        _check_listing(bundle, manifest, entries)
        for name in sorted(set(manifest.files) & set(entries)):
            if name.endswith(TEXT_SUFFIXES):
                texts[name] = _read_text(bundle, archive, entries[name], manifest.files[name])
        members, folds = _check_models(bundle, manifest, texts)
        destination = target_dir / dataset
        if destination.exists() and not overwrite:
            raise AutosegError(
                f"{destination} already exists. Fix: import into another --results folder, or pass --overwrite"
                " to replace it (the models in it are deleted)"
            )
        _check_free_space(bundle, target_dir, manifest)
        created = not target_dir.exists()
        target_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dataset}.importing-", dir=target_dir))
        try:
            metadata = _unpack(bundle, archive, entries, manifest, texts, staging)
            for member in members:
                for fold in folds:
                    name = f"{member.folder}/fold_{fold}/{SAFETENSORS_FILE}"
                    _check_weights_belong(metadata[name], member, fold, f"{bundle}:{dataset}/{name}")
            _move_into_place(staging, destination)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            if created and not any(target_dir.iterdir()):
                target_dir.rmdir()
            raise
    return destination


def _checked_entries(bundle: Path, archive: zipfile.ZipFile) -> tuple[str, dict[str, zipfile.ZipInfo]]:
    """(top folder, {path under it: entry}); any name that could land outside the target is refused."""
    entries: dict[str, zipfile.ZipInfo] = {}
    seen: set[str] = set()
    tops: set[str] = set()
    for info in archive.infolist():
        name = info.filename
        parts = name.split("/")
        problem = None
        if name.startswith("/") or ":" in name or "\\" in name:
            problem = "an absolute path, a drive letter or a backslash"
        elif any(part in ("", ".", "..") for part in parts) or len(parts) < 2:
            problem = "not a plain relative file path under the top folder"
        elif any(ord(c) < 32 for c in name):
            problem = "a control character"
        elif stat.S_ISLNK(info.external_attr >> 16):
            problem = "a symbolic link"
        elif stat.S_IFMT(info.external_attr >> 16) not in (0, stat.S_IFREG):  # 0: a tool that writes no type
            problem = "not a regular file"
        elif info.flag_bits & 0x1:
            problem = "encrypted"
        elif name.casefold() in seen:  # two names that one case-insensitive file system would merge
            problem = "a duplicate name"
        if problem:
            raise AutosegError(f"{bundle}: entry {name!r} is refused: {problem}. {REFUSED}")
        seen.add(name.casefold())
        tops.add(parts[0])
        entries["/".join(parts[1:])] = info
    if len(tops) != 1:
        raise AutosegError(f"{bundle}: a bundle has one top folder, this has {len(tops)}. {REFUSED}")
    return tops.pop(), entries


def _read_manifest(
    bundle: Path, archive: zipfile.ZipFile, dataset: str, entries: dict[str, zipfile.ZipInfo]
) -> tuple[Manifest, dict[str, bytes]]:
    """The manifest, and ``{manifest.json: its bytes}`` to which the checked text files are added."""
    where = f"{bundle}:{dataset}/{MANIFEST_FILE}"
    if MANIFEST_FILE not in entries:
        raise AutosegError(f"{bundle}: no {dataset}/{MANIFEST_FILE}, so this is not a model bundle. {REFUSED}")
    raw = io.BytesIO()
    _copy_capped(archive, entries[MANIFEST_FILE], raw, MAX_TEXT_BYTES, where)
    try:
        data = json.loads(raw.getvalue().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise AutosegError(f"{where}: not valid JSON ({exc}). {REFUSED}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise AutosegError(f"{where}: format is not {FORMAT!r}, so this is not a model bundle. {REFUSED}")
    manifest = serialization.from_jsonable(Manifest, data, where=where)
    if manifest.dataset != dataset:
        raise AutosegError(f"{where}: dataset {manifest.dataset!r} differs from the top folder {dataset!r}. {REFUSED}")
    return manifest, {MANIFEST_FILE: raw.getvalue()}


def _check_listing(bundle: Path, manifest: Manifest, entries: dict[str, zipfile.ZipInfo]) -> None:
    """Only data types; the zip and the manifest list the same files with the same sizes."""
    for name in entries:
        if name.endswith(PICKLE_SUFFIXES):
            raise AutosegError(
                f"{bundle}: {name} is a pickle or torch file; a bundle holds only JSON and safetensors, because"
                f" unpickling can run code. {REFUSED}"
            )
        if name != MANIFEST_FILE and not name.endswith(ALLOWED_SUFFIXES):
            raise AutosegError(
                f"{bundle}: {name} is not one of the file types a bundle may hold ({', '.join(ALLOWED_SUFFIXES)})."
                f" {REFUSED}"
            )
    present = set(entries) - {MANIFEST_FILE}
    unlisted = sorted(present - set(manifest.files))
    if unlisted:
        raise AutosegError(f"{bundle}: {', '.join(unlisted)} not listed in the manifest. {REFUSED}")
    missing = sorted(set(manifest.files) - present)
    if missing:
        raise AutosegError(f"{bundle}: {', '.join(missing)} listed in the manifest but missing. Fix: download it again")
    total = 0
    for name in sorted(present):
        expected = manifest.files[name].bytes
        if entries[name].file_size != expected:
            raise AutosegError(
                f"{bundle}: {name} holds {entries[name].file_size} bytes, the manifest says {expected}."
                " Fix: download the bundle again"
            )
        total += expected
    if total > MAX_BUNDLE_BYTES:
        raise AutosegError(f"{bundle}: unpacks to {total / 2**30:.1f} GiB, more than any model needs. {REFUSED}")


def _copy_capped(archive: zipfile.ZipFile, info: zipfile.ZipInfo, out: IO[bytes], cap: int, where: str) -> str:
    """Decompress into ``out`` without ever writing more than ``cap`` bytes; returns the SHA-256."""
    digest, copied = hashlib.sha256(), 0
    try:
        with archive.open(info) as src:
            while chunk := src.read(COPY_CHUNK_BYTES):
                copied += len(chunk)
                if copied > cap:
                    raise AutosegError(f"{where}: unpacks to more than its {cap} bytes. {REFUSED}")
                digest.update(chunk)
                out.write(chunk)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:  # a bad CRC, a truncated download
        raise AutosegError(f"{where}: damaged ({exc}). Fix: download the bundle again") from exc
    return digest.hexdigest()


def _copy_verified(
    bundle: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, expected: BundleFile, out: IO[bytes]
) -> None:
    where = f"{bundle}:{info.filename}"
    digest = _copy_capped(archive, info, out, expected.bytes, where)
    if digest != expected.sha256:
        raise AutosegError(
            f"{where}: its SHA-256 does not match the manifest (damaged or altered). Fix: download it again, or"
            " ask for a new export"
        )


def _read_text(bundle: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, expected: BundleFile) -> bytes:
    """A JSON, Markdown or text file, checked against the manifest and for being what its name says."""
    where = f"{bundle}:{info.filename}"
    if expected.bytes > MAX_TEXT_BYTES:
        raise AutosegError(f"{where}: {expected.bytes} bytes is too large for a text file. {REFUSED}")
    out = io.BytesIO()
    _copy_verified(bundle, archive, info, expected, out)
    data = out.getvalue()
    if data.startswith(PICKLE_PROTOCOL_OPCODE):
        raise AutosegError(f"{where}: is a pickle under another name; unpickling can run code. {REFUSED}")
    try:
        text = data.decode("utf-8")
        if info.filename.endswith(".json"):
            json.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise AutosegError(f"{where}: not the text its name says ({exc}). {REFUSED}") from exc
    return data


def _check_models(
    bundle: Path, manifest: Manifest, texts: dict[str, bytes]
) -> tuple[tuple[ModelRef, ...], tuple[int, ...]]:
    """best.json, each model's plan and folds are there and valid, and their plug-ins are installed."""
    from autoseg.networks import NETWORKS
    from autoseg.training.trainer import TRAINERS

    def load_json(name: str) -> Any:
        if name not in texts:
            raise AutosegError(f"{bundle}: {name} is missing; predict needs it. Fix: export the model again")
        return json.loads(texts[name])

    best = serialization.from_jsonable(BestChoice, load_json(BEST_FILE), where=f"{bundle}:{BEST_FILE}")
    if best.dataset != manifest.dataset:
        raise AutosegError(
            f"{bundle}: best.json is for {best.dataset!r}, the bundle for {manifest.dataset!r}. {REFUSED}"
        )
    trainers: dict[str, str] = {}  # name -> where it is needed, for the error message
    networks: dict[str, str] = {}
    for member in best.members:
        trainers.setdefault(member.trainer, f"used by {member.folder}")
        where = f"{bundle}:{member.folder}/{PLAN_FILE}"
        plan = serialization.from_jsonable(Plan, load_json(f"{member.folder}/{PLAN_FILE}"), where=where)
        networks.setdefault(plan.configuration(member.configuration).network.architecture, f"used by {member.folder}")
        load_json(f"{member.folder}/{DATASET_FILE}")
        for fold in best.folds:
            run = load_json(f"{member.folder}/fold_{fold}/{RUN_FILE}")
            if isinstance(run, dict) and isinstance(run.get("trainer"), str):
                trainers.setdefault(run["trainer"], f"used by {member.folder}/fold_{fold}")
            if f"{member.folder}/fold_{fold}/{SAFETENSORS_FILE}" not in manifest.files:
                raise AutosegError(f"{bundle}: no weights for {member.folder} fold {fold}. Fix: export the model again")
    for name in manifest.trainers:
        trainers.setdefault(name, "listed in the manifest")
    for name in manifest.networks:
        networks.setdefault(name, "listed in the manifest")
    for kind, registry, needed in (("trainer", TRAINERS, trainers), ("network", NETWORKS, networks)):
        for name, used_by in sorted(needed.items()):
            if name not in registry:
                raise AutosegError(
                    f"{bundle}: the {kind} {name!r} ({used_by}) is not installed here (installed:"
                    f" {', '.join(registry.names()) or 'none'}). Fix: pip install the package that provides it, or"
                    f" pass the file that registers it: autoseg --plugins FILE.py ..."
                )
    return best.members, best.folds


def _check_free_space(bundle: Path, target_dir: Path, manifest: Manifest) -> None:
    existing = next(p for p in (target_dir, *target_dir.parents) if p.exists())
    needed = sum(f.bytes for f in manifest.files.values())
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise AutosegError(
            f"{bundle}: unpacking needs {needed / 2**20:.0f} MiB, {existing} has {free / 2**20:.0f} MiB free."
            " Fix: free some space or import into another --results folder"
        )


def _unpack(
    bundle: Path, archive: zipfile.ZipFile, entries: dict[str, zipfile.ZipInfo], manifest: Manifest,
    texts: dict[str, bytes], staging: Path,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Write every file under ``staging``, checking the binary ones; returns each safetensors file's metadata."""
    metadata = {}
    for name, info in sorted(entries.items()):
        path = staging.joinpath(*name.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        if name in texts:
            path.write_bytes(texts[name])
            continue
        with path.open("xb") as out:
            _copy_verified(bundle, archive, info, manifest.files[name], out)
        if name.endswith(".png") and not path.read_bytes().startswith(PNG_SIGNATURE):
            raise AutosegError(f"{bundle}:{info.filename}: not a PNG image. {REFUSED}")
        if name.endswith(".safetensors"):
            metadata[name] = load_safetensors(path)[1]  # safetensors checks the header and every tensor's extent
    return metadata


def _move_into_place(staging: Path, destination: Path) -> None:
    """Rename the checked folder onto ``destination``; an old folder there is set aside until that worked."""
    if not destination.exists():
        staging.rename(destination)
        return
    set_aside = Path(tempfile.mkdtemp(prefix=f".{destination.name}.replaced-", dir=destination.parent))
    destination.rename(set_aside / destination.name)
    try:
        staging.rename(destination)
    except BaseException:
        (set_aside / destination.name).rename(destination)
        set_aside.rmdir()
        raise
    shutil.rmtree(set_aside)
