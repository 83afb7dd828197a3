"""Checkpoints that hold tensors and JSON only, written atomically and checked when read.

A checkpoint is one ``torch.save`` file whose content is plain containers of tensors, numbers and strings,
so it is read with ``torch.load(..., weights_only=True)``: loading a shared model can never run code. The
metadata (epoch, run settings, the log so far) is a JSON string inside it, and a SHA-256 digest of every
tensor's bytes detects a file that was damaged after it was written (a truncated or bit-flipped file is
refused with a message instead of training on garbage).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from autoseg import atomic
from autoseg.errors import AutosegError

FORMAT = "autoseg-checkpoint"
SCHEMA_VERSION = 1


def _tensors(obj: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Every tensor inside nested dicts/lists, with a stable path, in a stable order."""
    if isinstance(obj, torch.Tensor):
        return [(prefix, obj)]
    if isinstance(obj, Mapping):
        out = []
        for key in sorted(obj, key=str):
            out += _tensors(obj[key], f"{prefix}/{key}")
        return out
    if isinstance(obj, list | tuple):
        out = []
        for i, item in enumerate(obj):
            out += _tensors(item, f"{prefix}/{i}")
        return out
    return []


def digest(state: Mapping[str, Any]) -> str:
    h = hashlib.sha256()
    for name, tensor in _tensors(state):
        h.update(name.encode())
        t = tensor.detach().cpu().contiguous()
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(path: Path, state: dict[str, Any], metadata: dict[str, Any]) -> None:
    """``state``: nested dicts of tensors and numbers (state dicts); ``metadata``: anything JSON can hold."""
    payload = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "metadata_json": json.dumps(metadata),
        "state": state,
        "sha256": digest(state),
    }
    atomic.write_with(path, lambda tmp: torch.save(payload, tmp), suffix=".pt")


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Returns (state, metadata); a file that is not an intact autoseg checkpoint is refused with a message."""
    path = Path(path)
    fix = "delete it and resume from another checkpoint (or retrain without --resume)"
    if not path.is_file():
        raise AutosegError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise AutosegError(
            f"checkpoint {path} holds objects other than tensors and plain data, and autoseg never unpickles"
            f" code from a model file ({str(exc).splitlines()[0]}). Fix: re-save it with autoseg."
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise AutosegError(f"checkpoint {path} is damaged or not a checkpoint ({exc}). Fix: {fix}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise AutosegError(f"checkpoint {path} was not written by autoseg. Fix: {fix}")
    if payload.get("schema_version") != SCHEMA_VERSION:
        raise AutosegError(
            f"checkpoint {path} has schema version {payload.get('schema_version')}, this autoseg reads {SCHEMA_VERSION}"
        )
    state = payload.get("state")
    if not isinstance(state, dict) or digest(state) != payload.get("sha256"):
        raise AutosegError(f"checkpoint {path} is damaged: its tensors do not match their checksum. Fix: {fix}")
    try:
        metadata = json.loads(payload["metadata_json"])
    except (KeyError, TypeError, ValueError) as exc:
        raise AutosegError(f"checkpoint {path} has unreadable metadata ({exc}). Fix: {fix}") from exc
    return state, metadata
