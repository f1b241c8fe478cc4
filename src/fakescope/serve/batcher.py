"""Dynamic batching: concurrent requests share one forward pass.

Each request submits its images; a collector task gathers items from a bounded queue until it holds
``max_batch`` images or ``max_wait_ms`` have passed since the first one arrived, then runs the batch
in an executor thread (never on the event loop) and hands every request its own scores. While a batch
runs, new items queue up, so under load batches fill by themselves. The wait is only spent when more
images are on their way (requests announced with :meth:`Batcher.expect` that are still being read
or decoded): a lone request runs at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """More images are waiting than the queue allows; the client should retry later."""

    def __init__(self, pending: int, limit: int) -> None:
        super().__init__(f"the queue is full ({pending} images waiting, limit {limit}): retry shortly")
        self.pending = pending
        self.limit = limit


@dataclass
class _Item:
    value: Any
    future: asyncio.Future


@dataclass
class BatchStats:
    """What the batcher has done: forward passes, images, and the largest batch."""

    batches: int = 0
    images: int = 0
    largest: int = 0
    sizes: list[int] = field(default_factory=list)  # the last 1,000 batch sizes

    def record(self, n: int) -> None:
        self.batches += 1
        self.images += n
        self.largest = max(self.largest, n)
        self.sizes.append(n)
        del self.sizes[:-1000]


class _Expectation:
    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher
        self.active = False

    def __enter__(self) -> _Expectation:
        self.batcher.incoming += 1
        self.active = True
        return self

    def arrived(self) -> None:
        if self.active:
            self.batcher.incoming -= 1
            self.active = False

    def __exit__(self, *exc) -> None:
        self.arrived()


class Batcher:
    """Gathers items into batches for ``fn(list_of_items) -> sequence_of_results`` (one result per item).

    ``max_queue`` bounds the items waiting or running; :meth:`submit` raises :class:`QueueFull`
    beyond it instead of letting memory grow. ``fn`` runs in ``executor`` (a single thread shared by
    every model keeps the cores for one forward pass at a time)."""

    def __init__(self, fn: Callable[[list], Sequence], executor: Executor, *, max_batch: int = 32,
                 max_wait_ms: float = 10.0, max_queue: int = 256) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError(f"expected max_batch >= 1, max_queue >= 1, max_wait_ms >= 0, got {max_batch}, "
                             f"{max_queue}, {max_wait_ms}")
        self.fn = fn
        self.executor = executor
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.pending = 0  # items submitted and not yet answered
        self.incoming = 0  # requests announced by expect() that have not submitted yet
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._collect())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._queue is not None and not self._queue.empty():  # answer whoever is still waiting
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(RuntimeError("the server is shutting down"))

    def expect(self) -> _Expectation:
        """``with batcher.expect(): ... await batcher.submit(...)``: tells the collector that a request
        is being read or decoded, so that a forward pass waits (up to ``max_wait_ms``) for its images."""
        return _Expectation(self)

    async def submit(self, values: list, expectation: _Expectation | None = None) -> list:
        """The results for ``values``, in order, once their batch(es) have run (``expectation``: the
        request's :meth:`expect`, which ends as its images enter the queue)."""
        if self._queue is None:
            raise RuntimeError("the batcher is not started")
        if self.pending + len(values) > self.max_queue:
            raise QueueFull(self.pending, self.max_queue)
        loop = asyncio.get_running_loop()
        items = [_Item(v, loop.create_future()) for v in values]
        self.pending += len(items)
        try:
            for it in items:
                self._queue.put_nowait(it)
            if expectation is not None:
                expectation.arrived()
            return list(await asyncio.gather(*(it.future for it in items)))
        finally:
            self.pending -= len(items)

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or self.incoming <= 0:  # nothing else on its way: do not wait
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), left))
                except asyncio.TimeoutError:
                    break
            batch = [it for it in batch if not it.future.done()]  # a client that went away
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self.executor, self.fn, [it.value for it in batch])
            except Exception as e:  # the whole batch failed: every waiting request hears it
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(e)
                continue
            self.stats.record(len(batch))
            for it, r in zip(batch, results):
                if not it.future.done():
                    it.future.set_result(r)
