"""What a model bundle is: its manifest, the file types it may hold, and the limits an import enforces."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoseg.errors import AutosegError
from autoseg.evaluation.best import ModelRef

FORMAT = "autoseg-bundle"
MANIFEST_FILE = "manifest.json"
REPORT_FILES = ("report.md", "report/*.png")  # find-best's report, shipped so the receiver sees the scores
ALLOWED_SUFFIXES = (".json", ".safetensors", ".md", ".png", ".txt")
TEXT_SUFFIXES = (".json", ".md", ".txt")  # read into memory and checked before anything is written
STORED_SUFFIXES = (".safetensors", ".png")  # float weights and PNGs barely deflate; storing them is faster
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".npy", ".npz", ".joblib", ".bin")
PICKLE_PROTOCOL_OPCODE = b"\x80"  # PROTO, the first byte of pickle protocols 2-5 and of legacy torch.save files
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The largest JSON autoseg writes (a plan, best.json with every candidate) is well under 1 MiB.
MAX_TEXT_BYTES = 64 * 2**20
# An ensemble of three nnU-Net 3d_fullres models (~31 M parameters, 125 MB of float32 each) over five folds
# is 1.9 GB; eight times that is room for larger networks and still refuses a zip bomb's claimed size.
MAX_BUNDLE_BYTES = 16 * 2**30
COPY_CHUNK_BYTES = 2**20
ZIP64_FROM_BYTES = 2**31  # zipfile needs force_zip64 up front for an entry it streams past 2 GiB
REFUSED = "Fix: ask for a bundle written by `autoseg export-model` (autoseg never runs code from a bundle)"


@dataclass(frozen=True)
class BundleFile:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    SCHEMA_VERSION = 1

    format: str
    schema_version: int
    dataset: str
    autoseg_version: str
    created: str  # ISO 8601, UTC
    files: dict[str, BundleFile]  # path under the top folder -> checksum; every file but the manifest
    trainers: tuple[str, ...]  # the plug-ins the models need, so a reader sees them without unpacking
    networks: tuple[str, ...]


def _check_weights_belong(metadata: dict[str, Any], member: ModelRef, fold: int, where: str | Path) -> None:
    expected = {
        "trainer": member.trainer,
        "planner": member.planner,
        "configuration": member.configuration,
        "fold": fold,
    }
    for key, value in expected.items():
        if key in metadata and metadata[key] != value:
            raise AutosegError(
                f"{where}: the weights there belong to {key} {metadata[key]!r}, not {value!r}. Fix: the folder"
                " holds another model's files; retrain this fold or restore the right files"
            )
