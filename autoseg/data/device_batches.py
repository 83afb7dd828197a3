"""Batches moved to the training device one step ahead, and augmented there when augmentation runs on the device.

With ``--augmentation device`` the worker processes of ``BatchLoader`` only cut the enlarged samples (with
the foreground oversampling) into pinned memory. ``DeviceBatches`` then, for batch ``i + 1`` while the step of
batch ``i`` runs:

1. copies the sample to the device without blocking the host (pinned memory, ``non_blocking=True``);
2. augments it there with the phase's ``DeviceAugmenter`` (``autoseg.augment.device``), seeded with the
   very seed the CPU pipeline would have used for that batch (``loader.batch_random``), so a batch stays a
   pure function of (seed, rank, epoch, iteration) and a resumed run sees what an uninterrupted one saw;
3. does both on a side CUDA stream, so the copy and the augmentation overlap the step on the default
   stream; the step's stream waits on an event of the batch, not on the whole device.

When the fold's cases are kept on the device (``autoseg.data.resident``) there are no workers: step 1 is
``ResidentLoader.to_device``, which cuts the batch from those cases on the same side stream.

Without a CUDA device there is no side stream: the same code runs in order, which is how the tests drive it
on CPU tensors. With ``--augmentation cpu`` (no augmenters) it only moves the already augmented batches
ahead of time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from autoseg.augment.pipeline import EpochAugmenters
from autoseg.data.loader import BatchLoader, batch_random
from autoseg.data.resident import ResidentLoader


class DeviceBatches:
    """``epoch(e, start)`` yields dicts with ``image`` (B, C, *patch) float32 and ``label`` (B, *patch) int64 on
    ``device`` (augmented there when ``augmenters`` is given), plus the CPU batch's ``keys``."""

    def __init__(
        self,
        loader: BatchLoader | ResidentLoader,
        device: torch.device,
        augmenters: EpochAugmenters | None = None,
        seed: int = 0,
        rank: int = 0,
    ) -> None:
        self.loader = loader
        self.device = device
        self.augmenters = augmenters
        self.seed = seed
        self.rank = rank
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _stream_context(self) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()

    def _prepare(self, batch: dict[str, Any], epoch: int, iteration: int) -> tuple[dict[str, Any], Any]:
        with self._stream_context():
            image, label = self.loader.to_device(batch, self.device)
            if self.augmenters is not None:
                _, augment_seed = batch_random(self.seed, self.rank, epoch, iteration)
                augment: Any = self.augmenters.at(epoch)  # a DeviceAugmenter: tensors in, tensors out
                image, label = augment(image, label, augment_seed)
            label = label.long()
            event = None
            if self._stream is not None:
                event = torch.cuda.Event()
                event.record(self._stream)
        return {"image": image, "label": label, "keys": batch.get("keys")}, event

    def _hand_over(self, prepared: dict[str, Any], event: Any) -> dict[str, Any]:
        """Make the consuming stream wait for the batch, and tell the allocator it is used there."""
        if event is not None:
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_event(event)
            prepared["image"].record_stream(consumer)
            prepared["label"].record_stream(consumer)
        return prepared

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict[str, Any]]:
        """The batches of ``epoch`` from iteration ``start``, each prepared while the previous one is used."""
        batches = self.loader.epoch(epoch, start)
        iteration = start
        pending: tuple[dict[str, Any], Any] | None = None
        for batch in batches:
            ready = self._prepare(batch, epoch, iteration)
            iteration += 1
            if pending is not None:
                yield self._hand_over(*pending)
            pending = ready
        if pending is not None:
            yield self._hand_over(*pending)

    def close(self) -> None:
        self.loader.close()
