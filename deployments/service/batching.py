"""How a generator replica gathers the jobs sent to it into batches.

A batch starts when the model is free and takes every job queued by then (up to `max_size`), waiting
up to `wait_s` after its first job arrived for more to come. Jobs that arrive while a batch runs are
therefore run together as soon as it ends, however far apart they arrived.

Ray Serve's `@serve.batch` (2.60) does not do that: it closes a batch `batch_wait_timeout_s` after
its first request even while the previous batch still runs, and the closed batches then wait their
turn one by one. On a GPU that takes a song's seconds, requests arriving a second apart during a song
ran one at a time after it, each a batch of one.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(eq=False)  # removed by identity when its caller leaves
class _Waiting(Generic[T]):
    job_id: str
    arrived: float  # time.monotonic()
    result: asyncio.Future[T] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class JobBatcher(Generic[T]):
    """Runs `run(job_ids) -> one result per id` on batches of the ids passed to `submit`, one batch at
    a time. A caller that goes away while its job waits takes the job out of the queue; one that goes
    away while its batch runs leaves the batch alone. An exception of `run` reaches every caller of
    that batch, and the next batch runs as usual."""

    def __init__(self, run: Callable[[list[str]], Awaitable[list[T]]], max_size: int, wait_s: float):
        if max_size < 1 or wait_s < 0:
            raise ValueError(f"max_size must be >= 1 and wait_s >= 0, got {max_size} and {wait_s}")
        self._run, self.max_size, self.wait_s = run, max_size, wait_s
        self._queue: deque[_Waiting[T]] = deque()
        self._arrival = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self.batches = 0  # batches started

    def __len__(self) -> int:
        """Jobs waiting for a batch (not those of the batch running)."""
        return len(self._queue)

    async def submit(self, job_id: str) -> T:
        waiting = _Waiting[T](job_id, time.monotonic())
        self._queue.append(waiting)
        self._arrival.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work())
        try:
            return await waiting.result
        except asyncio.CancelledError:
            if waiting in self._queue:  # not started: it never runs
                self._queue.remove(waiting)
            raise

    async def _work(self) -> None:
        while True:
            batch = await self._next_batch()
            self.batches += 1
            try:
                results = await self._run([w.job_id for w in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"a batch of {len(batch)} jobs gave {len(results)} results")
            except asyncio.CancelledError:  # the replica is stopping
                for waiting in batch:
                    waiting.result.cancel()
                raise
            except Exception as exc:  # every caller of the batch hears of it
                for waiting in batch:
                    if not waiting.result.done():
                        waiting.result.set_exception(exc)
                continue
            for waiting, result in zip(batch, results, strict=True):
                if not waiting.result.done():
                    waiting.result.set_result(result)

    def _closes_in(self) -> float:
        return self._queue[0].arrived + self.wait_s - time.monotonic()

    async def _next_batch(self) -> list[_Waiting[T]]:
        while True:
            while not self._queue:
                self._arrival.clear()
                await self._arrival.wait()
            # counted from the first job's arrival: jobs that queued behind a running batch start at once
            while 0 < len(self._queue) < self.max_size and (left := self._closes_in()) > 0:
                self._arrival.clear()
                try:
                    await asyncio.wait_for(self._arrival.wait(), left)
                except TimeoutError:
                    break
            if self._queue:  # else every job waiting left while the batch filled
                return [self._queue.popleft() for _ in range(min(self.max_size, len(self._queue)))]
