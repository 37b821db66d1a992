"""Micro-batching for a served model: concurrent requests grouped into batches, one inference thread.

Requests wait in a bounded queue; one worker thread takes the oldest, then whatever else arrives
within a short wait, up to the batch, and runs them as one batch. A full queue refuses at once
(:class:`QueueFull`, which a server answers with 503) instead of letting latency grow without bound.
Standard library and numpy only.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from .errors import BimExportError

# A batch of pixels [B, 3, S, S] in, one array [B, ...] per output out.
RunBatch = Callable[[np.ndarray], Sequence[np.ndarray]]


class QueueFull(BimExportError):
    """The request queue is full: the server is busy (HTTP 503)."""


@dataclass(frozen=True)
class BatchResult:
    """One request's share of a batch run.

    Attributes:
        outputs: the request's row of each output, in the order the run function returns them.
        batch: how many requests the batch it ran in held.
    """

    outputs: tuple[np.ndarray, ...]
    batch: int


@dataclass
class _Job:
    pixels: np.ndarray  # [3, S, S]
    future: Future


class MicroBatcher:
    """Groups concurrent requests into batches of at most ``batch`` and runs them on one thread.

    Args:
        run: runs a batch [B, 3, S, S]; returns one array [B, ...] per output.
        batch: the largest batch formed (the profile's).
        max_wait_ms: how long the first request of a batch waits for others to join it; requests
            already queued join at once, so a busy server fills batches without waiting.
        queue_size: requests that may wait beyond the one batch running; more are refused.
        fixed_batch: the model takes exactly this batch: a short batch is filled up with copies
            of its last image, whose outputs are dropped.
    """

    def __init__(self, run: RunBatch, batch: int, max_wait_ms: float = 5.0, queue_size: int | None = None,
                 fixed_batch: int | None = None):
        if batch < 1:
            raise ValueError(f"batch must be >= 1 (got {batch})")
        self.run, self.batch, self.fixed_batch = run, int(batch), fixed_batch
        self.max_wait_s = max(0.0, max_wait_ms) / 1e3
        self.queue_size = int(queue_size or 4 * self.batch)
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=self.queue_size)
        self._lock = threading.Lock()
        self.batch_sizes: Counter[int] = Counter()  # batch size -> batches run
        self.run_ms: Counter[int] = Counter()  # batch size -> ms spent in ``run`` on such batches
        self.refused = self.failed = 0
        self._thread = threading.Thread(target=self._loop, name="inference", daemon=True)
        self._thread.start()

    def submit(self, pixels: np.ndarray) -> Future:
        """Queues one image [3, S, S]; the future's result is its :class:`BatchResult`.

        Raises:
            QueueFull: ``queue_size`` requests are already waiting.
        """
        job = _Job(np.asarray(pixels, dtype=np.float32), Future())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            with self._lock:
                self.refused += 1
            raise QueueFull(f"server busy: {self.queue_size} requests already queued") from None
        return job.future

    def close(self, timeout: float = 10.0) -> None:
        """Runs what is queued, then stops the worker thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def stats(self) -> dict:
        """Batches run by size (and the ms their runs took in all), requests answered, refused (queue
        full) and failed, and the queue now."""
        with self._lock:
            sizes = dict(sorted(self.batch_sizes.items()))
            return {"batches": {str(k): v for k, v in sizes.items()},
                    "run_ms": {str(k): round(self.run_ms[k], 3) for k in sizes},
                    "requests": sum(k * v for k, v in sizes.items()), "refused": self.refused,
                    "failed": self.failed, "queued": self._queue.qsize(), "max_batch": self.batch,
                    "max_wait_ms": self.max_wait_s * 1e3, "queue_size": self.queue_size}

    # ------------------------------------------------------------------------------- the worker

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        """The first job and those that join it; and whether the stop sentinel came."""
        jobs, deadline = [first], time.monotonic() + self.max_wait_s
        while len(jobs) < self.batch:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
        return jobs, False

    def _run(self, jobs: list[_Job]) -> None:
        x = np.stack([j.pixels for j in jobs])
        short = self.fixed_batch - len(jobs) if self.fixed_batch else 0
        if short > 0:
            x = np.concatenate([x, np.repeat(x[-1:], short, axis=0)])
        t0 = time.perf_counter()
        try:
            outputs = [np.asarray(o) for o in self.run(x)]
        except Exception as e:  # noqa: BLE001 - one failed batch fails its requests, never the worker
            with self._lock:
                self.failed += len(jobs)
            for j in jobs:
                j.future.set_exception(e)
            return
        with self._lock:
            self.batch_sizes[len(jobs)] += 1
            self.run_ms[len(jobs)] += (time.perf_counter() - t0) * 1e3
        for i, j in enumerate(jobs):
            j.future.set_result(BatchResult(tuple(o[i] for o in outputs), len(jobs)))

    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                return
            jobs, stop = self._collect(first)
            self._run(jobs)
