"""A fold's trained network weights and the facts needed to use them, from a checkpoint or a bundle file.

A training run leaves ``checkpoint_final.pt`` (tensors + JSON, read with ``weights_only=True``); a model
bundle carries ``model.safetensors`` instead: the network's tensors only, with the same JSON metadata in
the safetensors header. Neither format can hold code, and both are checked (a checksum for checkpoints,
safetensors' own header validation plus the bundle manifest's SHA-256 for bundles).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from autoseg import atomic
from autoseg.errors import AutosegError

SAFETENSORS_FILE = "model.safetensors"
METADATA_KEY = "autoseg"
# The metadata an inference needs from a checkpoint; the training log and optimiser state stay behind.
INFERENCE_METADATA = ("trainer", "dataset", "planner", "configuration", "fold", "num_input_channels", "labels",
                      "network", "mirror_axes", "epochs")  # fmt: skip


def inference_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    return {key: metadata[key] for key in INFERENCE_METADATA if key in metadata}


def save_safetensors(path: str | Path, network_state: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write the network's tensors and ``metadata`` (JSON) as one safetensors file, atomically."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().cpu().contiguous() for name, t in network_state.items()}
    header = {METADATA_KEY: json.dumps(inference_metadata(metadata))}
    atomic.write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=header), suffix=".safetensors")


def load_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
        metadata = json.loads(header[METADATA_KEY])
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise AutosegError(f"{path}: not an autoseg model file ({exc}). Fix: export the model again") from exc
    if not isinstance(metadata, dict):
        raise AutosegError(f"{path}: its metadata is not a JSON object. Fix: export the model again")
    return tensors, metadata


def load_fold_weights(
    fold_dir: str | Path, checkpoint: str = "checkpoint_final.pt"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(network state dict, metadata) of one fold: ``checkpoint`` if the folder has it, else ``model.safetensors``."""
    from autoseg.training.checkpoint import load_checkpoint

    fold_dir = Path(fold_dir)
    if (fold_dir / checkpoint).is_file():
        state, metadata = load_checkpoint(fold_dir / checkpoint)
        return state["network"], metadata
    if (fold_dir / SAFETENSORS_FILE).is_file():
        return load_safetensors(fold_dir / SAFETENSORS_FILE)
    raise AutosegError(
        f"{fold_dir}: neither {checkpoint} nor {SAFETENSORS_FILE}. Fix: finish training this fold"
        " (autoseg train ... --resume) or predict with the folds that exist (--folds)"
    )
