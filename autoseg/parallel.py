"""Map a function over cases in worker processes, with a progress bar and results in input order."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from threadpoolctl import threadpool_limits
from tqdm import tqdm

A = TypeVar("A")
R = TypeVar("R")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def parallel_map(
    fn: Callable[[A], R], items: Sequence[A], num_workers: int | None, desc: str, show_progress: bool = True
) -> list[R]:
    """``[fn(x) for x in items]``, in ``num_workers`` processes (1 or 0: in this process).

    ``fn`` must be a module-level function so that it can be sent to the workers.
    """
    workers = available_cores() if num_workers is None else num_workers
    workers = min(workers, len(items))
    bar = tqdm(total=len(items), desc=desc, unit="case", disable=not show_progress or not items, leave=False)
    try:
        if workers <= 1:
            out = []
            for item in items:
                out.append(fn(item))
                bar.update()
            return out
        with ProcessPoolExecutor(max_workers=workers, initializer=_one_thread_per_worker) as pool:
            futures = [pool.submit(fn, item) for item in items]
            results: Iterable[R] = (_tick(f.result(), bar) for f in futures)
            return list(results)
    finally:
        bar.close()


def _one_thread_per_worker() -> None:
    """Resampling runs on BLAS; with one worker per core, BLAS threads would only fight each other."""
    threadpool_limits(1)


def _tick(result: R, bar: tqdm) -> R:
    bar.update()
    return result
