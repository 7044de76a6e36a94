"""Request batching: concurrent requests' rows coalesced into one model call.

A TensorFlow call costs ~0.3 ms before it does any arithmetic and a Redis round trip ~0.1 ms;
both are per call, not per row.  The batcher queues requests; a collector takes the first one
as soon as an inference worker is free, then adds whatever else is queued (waiting at most
``max_wait_s`` for more) up to ``max_rows``, and hands the batch to a worker thread.  While all
workers are busy, requests accumulate, so batches grow with load by themselves: the latency cost
of batching is paid only when the replica is idle enough to afford it.

A batch holds requests of one key only (the loaded model they started on, and the kind of
call), so a version swap never mixes versions inside a batch and a request in flight finishes on
the version it started with.  ``enabled=False`` gives one call per request on the same workers:
the baseline ``odl bench serving`` compares against.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

log = logging.getLogger("odl.serving.batching")


@dataclass(frozen=True)
class BatchPolicy:
    max_rows: int = 1024
    max_wait_s: float = 0.002
    workers: int = 2
    enabled: bool = True


@dataclass
class _Pending:
    key: Hashable
    rows: int
    payload: Any
    future: asyncio.Future = field(repr=False)


# run(key, payloads) -> one result per payload, on a worker thread
RunBatch = Callable[[Hashable, list[Any]], list[Any]]


class Batcher:
    def __init__(self, run: RunBatch, policy: BatchPolicy = BatchPolicy(),
                 on_batch: Callable[[int, int], None] | None = None):
        self.run, self.policy = run, policy
        self.on_batch = on_batch or (lambda requests, rows: None)
        self._pool: ThreadPoolExecutor | None = None
        self._queue: asyncio.Queue[_Pending] | None = None
        self._slots: asyncio.Semaphore | None = None
        self._collector: asyncio.Task | None = None
        self.batches = 0

    async def start(self) -> None:
        self._pool = ThreadPoolExecutor(self.policy.workers, thread_name_prefix="infer")
        self._queue = asyncio.Queue()
        self._slots = asyncio.Semaphore(self.policy.workers)
        self._collector = asyncio.create_task(self._collect(), name="batch-collector")

    async def stop(self) -> None:
        if self._collector:
            self._collector.cancel()
            try:
                await self._collector
            except asyncio.CancelledError:
                pass
        while self._queue and not self._queue.empty():
            p = self._queue.get_nowait()
            if not p.future.done():
                p.future.set_exception(RuntimeError("replica is shutting down"))
        if self._pool:
            self._pool.shutdown(wait=True, cancel_futures=False)

    async def submit(self, key: Hashable, rows: int, payload: Any) -> Any:
        """The result for ``payload`` once its batch has run (exceptions are re-raised here)."""
        fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(key, rows, payload, fut))
        return await fut

    @property
    def queued(self) -> int:
        return self._queue.qsize() if self._queue else 0

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        carry: _Pending | None = None
        while True:
            first = carry or await self._queue.get()
            carry = None
            await self._slots.acquire()      # requests queue up while every worker is busy
            batch, rows = [first], first.rows
            if self.policy.enabled:
                deadline = loop.time() + self.policy.max_wait_s
                while rows < self.policy.max_rows:
                    nxt = await self._next(deadline - loop.time())
                    if nxt is None:
                        break
                    if nxt.key != first.key or rows + nxt.rows > self.policy.max_rows:
                        carry = nxt          # starts the next batch
                        break
                    batch.append(nxt)
                    rows += nxt.rows
            batch = [p for p in batch if not p.future.done()]   # clients that gave up
            if not batch:
                self._slots.release()
                continue
            self.batches += 1
            self.on_batch(len(batch), rows)
            work = loop.run_in_executor(self._pool, self.run, first.key, [p.payload for p in batch])
            work.add_done_callback(lambda f, batch=batch: self._finish(f, batch))

    async def _next(self, timeout: float) -> _Pending | None:
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            if timeout <= 0:
                return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    def _finish(self, work: asyncio.Future, batch: list[_Pending]) -> None:
        self._slots.release()
        exc = work.exception()
        if exc is None and len(work.result()) != len(batch):
            exc = RuntimeError(f"batch of {len(batch)} requests gave {len(work.result())} results")
        if exc is not None:
            log.error("batch of %d requests failed: %r", len(batch), exc)
        for k, p in enumerate(batch):
            if p.future.done():
                continue
            if exc is not None:
                p.future.set_exception(exc)
            else:
                p.future.set_result(work.result()[k])
