"""Training batches made in background worker processes, reproducible batch by batch.

Batch ``iteration`` of ``epoch`` is a pure function of ``(seed, rank, epoch, iteration)``: the sampler draws
from ``np.random.default_rng([seed, rank, epoch, iteration])`` and the augmentation gets a seed derived from
the same numbers. The batches therefore do not depend on the number of workers, and a run resumed at
epoch ``e`` sees exactly the batches an uninterrupted run would have seen.

Workers are a ``torch.utils.data.DataLoader`` over one "dataset" whose item ``i`` is the whole batch with
global index ``i = epoch * iterations_per_epoch + iteration``. They stay alive across epochs (persistent)
and keep ``prefetch_factor`` batches each in flight, so the accelerator does not wait for augmentation.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch.utils.data import DataLoader, Dataset, Sampler

from autoseg.augment.pipeline import BatchAugmenter, EpochAugmenters
from autoseg.data.sampling import PatchSampler


def batch_random(seed: int, rank: int, epoch: int, iteration: int) -> tuple[np.random.Generator, int]:
    """The sampling generator and the augmentation seed of one batch."""
    root = np.random.SeedSequence([seed, rank, epoch, iteration])
    # a spawned child is a stream independent of the root's, so sampling and augmentation do not correlate
    augment_seed = int(root.spawn(1)[0].generate_state(1)[0])
    return np.random.default_rng(root), augment_seed


class _BatchDataset(Dataset[dict[str, Any]]):
    """Item ``i`` is the whole batch with global index ``i``."""

    def __init__(
        self,
        sampler: PatchSampler,
        augmenter: BatchAugmenter | EpochAugmenters,
        iterations_per_epoch: int,
        seed: int,
        rank: int,
        compact: bool = False,
    ) -> None:
        self.sampler = sampler
        self.augmenter = augmenter
        self.iterations_per_epoch = iterations_per_epoch
        self.seed = seed
        self.rank = rank
        self.compact = compact

    def __getitem__(self, index: int) -> dict[str, Any]:
        epoch, iteration = divmod(index, self.iterations_per_epoch)
        rng, augment_seed = batch_random(self.seed, self.rank, epoch, iteration)
        image, label, keys = self.sampler.sample(rng)
        augmenter = self.augmenter.at(epoch) if isinstance(self.augmenter, EpochAugmenters) else self.augmenter
        image, label = augmenter(image, label, augment_seed)
        label = label[:, 0]
        if self.compact:
            image, label = compact_batch(image, label)
        return {
            "image": torch.from_numpy(image),
            "label": torch.from_numpy(label),
            "keys": keys,
        }


FLOAT16_MAX = float(np.finfo(np.float16).max)


def compact_batch(image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Half the bytes for the way to the GPU: the image as float16 and the label as int8 where they fit.

    Every batch crosses shared memory, pinned memory and the PCIe bus; at a 1 mm brain's sample size
    (two 199x213x199 crops) that is 100 MB a batch, and the copies, not the GPU, set the pace. float16
    keeps 11 significant bits, finer than the bfloat16 (8 bits) in which the mixed-precision step reads its
    input; a batch with values beyond float16's range (an image without normalisation) stays float32.
    Labels are -1 (ignore) to the largest class, so they fit int8 up to 127 classes.
    """
    if image.size and max(image.max(), -image.min()) <= FLOAT16_MAX:  # NaN compares False: stays float32
        image = image.astype(np.float16)
    if label.size and label.max() <= np.iinfo(np.int8).max:
        label = label.astype(np.int8)
    return image, label


class _EpochIndices(Sampler[int]):
    """The global indices of one epoch, from ``start`` on; the epoch is set before each pass."""

    def __init__(self, iterations_per_epoch: int) -> None:
        self.iterations_per_epoch = iterations_per_epoch
        self.epoch = 0
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        first = self.epoch * self.iterations_per_epoch
        return iter(range(first + self.start, first + self.iterations_per_epoch))

    def __len__(self) -> int:
        return self.iterations_per_epoch - self.start


def _init_worker(_worker_id: int) -> None:
    # each worker augments one batch at a time; more threads per worker only oversubscribe the CPU
    torch.set_num_threads(1)
    threadpool_limits(limits=1)
    # A SIGTERM sent to the whole process group (Slurm, `kill -- -PGID`, pkill) must reach the main process
    # alone: it saves checkpoint_latest and then shuts the workers down. A worker that died of it first made
    # torch raise "DataLoader worker killed" in the middle of that save, and the interrupt was lost.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _default_context() -> str:
    # fork starts workers fast and shares the parent's imports; spawn where fork is unavailable (Windows)
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


class BatchLoader:
    """``epoch(e)`` yields ``iterations_per_epoch`` batches, each a dict:

    ``image`` float32 tensor (B, C, *patch), ``label`` int16 tensor (B, *patch) with -1 = ignore (call
    ``.long()`` on the device for cross-entropy), ``keys`` the case ids. With ``compact`` (batches bound for
    a GPU whose step computes in reduced precision) the image comes as float16 and the label as int8 where
    they fit (``compact_batch``): the receiver converts them on the device.
    """

    prefetch_factor = 2  # batches in flight per worker (torch's default); more only costs memory

    def __init__(
        self,
        sampler: PatchSampler,
        augmenter: BatchAugmenter | EpochAugmenters,
        iterations_per_epoch: int,
        num_workers: int,
        seed: int,
        rank: int = 0,
        pin_memory: bool = False,
        multiprocessing_context: str | None = None,
        compact: bool = False,
    ) -> None:
        if iterations_per_epoch < 1:
            raise ValueError(f"iterations_per_epoch must be at least 1, got {iterations_per_epoch}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be at least 0, got {num_workers}")
        self.iterations_per_epoch = iterations_per_epoch
        self.dataset = _BatchDataset(sampler, augmenter, iterations_per_epoch, seed, rank, compact)
        self._indices = _EpochIndices(iterations_per_epoch)
        workers: dict[str, Any] = {}
        if num_workers > 0:
            workers = {
                "persistent_workers": True,
                "prefetch_factor": self.prefetch_factor,
                "worker_init_fn": _init_worker,
                "multiprocessing_context": multiprocessing_context or _default_context(),
            }
        self._loader: DataLoader[dict[str, Any]] | None = DataLoader(
            self.dataset,
            batch_size=None,  # an item already is a batch
            sampler=self._indices,
            num_workers=num_workers,
            pin_memory=pin_memory,
            **workers,
        )

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict[str, Any]]:
        """The batches of ``epoch`` in order, from iteration ``start`` (to resume within an epoch)."""
        if self._loader is None:
            raise RuntimeError("BatchLoader is closed")
        if not 0 <= start <= self.iterations_per_epoch or epoch < 0:
            raise ValueError(f"epoch {epoch} must be >= 0 and start {start} in [0, {self.iterations_per_epoch}]")
        self._indices.epoch = epoch
        self._indices.start = start
        return iter(self._loader)

    def to_device(self, batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch's image (float32) and label (int16) on ``device``; a compact batch widens there, after the
        copy, which does not block the host when the batch is in pinned memory."""
        image = batch["image"].to(device, non_blocking=True).float()
        label = batch["label"].to(device, non_blocking=True).to(torch.int16)
        return image, label

    def close(self) -> None:
        """Stop the worker processes."""
        loader, self._loader = self._loader, None
        if loader is not None:
            iterator = getattr(loader, "_iterator", None)
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:  # persistent workers otherwise live until the loader is collected
                shutdown()

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
