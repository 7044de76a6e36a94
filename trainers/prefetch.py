"""Fetching ahead of training.

Done in the training thread, fetching and decoding left the model idle for most of each step
(``odl bench trainer``).  The ``Prefetcher`` owns the sample source (``trainers.kafka_source``)
in a background thread: it fetches, decodes the JSON of each sample and queues the results
(bounded), while TensorFlow -- which releases the GIL -- trains on the previous batch.  Every other
operation on the source (pause, commit, end offsets) is a call executed by that thread.

Prefetched records are not consumed in the exactly-once sense: the trainer's positions advance
only for records it has taken, so a restart re-fetches whatever was still queued.

With a ``process_decoder`` the decode runs in a child process (``trainers.decode_process``) and
the thread only fetches: chunk k is decoded there while chunk k+1 is fetched here, and neither
holds the GIL that training needs.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

import numpy as np

from trainers.decode_process import DecodeProcess
from trainers.samples import ROW_WIDTH, Records, decode_records

log = logging.getLogger("odl.trainer.prefetch")


class Prefetcher:
    def __init__(self, make_source: Callable[[], Any], max_chunks: int = 64, poll_records: int = 2000,
                 decode: Callable[..., Records] = decode_records, width: int = ROW_WIDTH,
                 process_decoder: Any = None, absorb: Callable[[Any], None] | None = None):
        self._make = make_source
        self._decode = decode      # the sample shape's (``SampleCodec.decode_records``)
        # or, in a child process, this (``SampleCodec.process_decoder()``); each chunk's
        # ``Decoded`` then goes to ``absorb`` here (its refusals, the moments after it)
        self._process_decoder = process_decoder
        self._absorb = absorb
        self._width = width
        self._chunks: queue.Queue[Records] = queue.Queue(maxsize=max_chunks)
        self._calls: queue.Queue[tuple[Callable, Future]] = queue.Queue()
        self._carry = Records.empty(width)
        self.waited_s = 0.0   # time take() spent waiting for records: the trainer starved
        self._poll_records = poll_records
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="odl-prefetch", daemon=True)
        self._thread.start()

    # --- the source's thread ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            source = self._make()
        except BaseException as exc:  # noqa: BLE001 - surfaced by take()
            self._error = exc
            self._ready.set()
            return
        worker: DecodeProcess | None = None
        pending: tuple | None = None       # (partitions, offsets) of the chunk in the child
        try:
            if self._process_decoder is not None:
                worker = DecodeProcess(self._process_decoder)
                log.info("decoding in process %d", worker.pid)
            self._ready.set()
            while not self._stop.is_set():
                self._run_calls(source)
                if source.paused:
                    if pending is not None and worker.ready(0):
                        self._put(self._collect(worker, pending), source)
                        pending = None
                    time.sleep(0.02)
                    continue
                fetched = source.fetch(self._poll_records, 0.1)
                if worker is None:
                    if fetched:
                        self._put(self._decode(*zip(*fetched)), source)
                    continue
                if pending is not None and (fetched or worker.ready(0.05)):
                    self._put(self._collect(worker, pending), source)
                    pending = None
                if fetched:
                    partitions, offsets, values = zip(*fetched)
                    worker.submit(values)
                    pending = (partitions, offsets)
        except BaseException as exc:  # noqa: BLE001
            log.error("prefetch failed: %s", exc)
            self._error = exc
        finally:
            self._ready.set()
            self._run_calls(source)
            source.close()
            if worker is not None:
                worker.close()

    def _collect(self, worker: DecodeProcess, pending: tuple) -> Records:
        decoded = worker.result()
        if self._absorb is not None:
            self._absorb(decoded)
        partitions, offsets = pending
        return Records(np.asarray(partitions, np.int32), np.asarray(offsets, np.int64),
                       decoded.rows, decoded.valid, decoded.moments_after)

    def _put(self, chunk: Records, source) -> None:
        while not self._stop.is_set():
            try:
                self._chunks.put(chunk, timeout=0.1)
                return
            except queue.Full:
                self._run_calls(source)

    def _run_calls(self, source) -> None:
        while True:
            try:
                fn, fut = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                fut.set_result(fn(source))
            except BaseException as exc:  # noqa: BLE001
                fut.set_exception(exc)

    # --- the training thread -----------------------------------------------------------------
    def call(self, fn: Callable[[Any], Any], timeout_s: float = 30.0) -> Any:
        """Run ``fn(source)`` on the source's thread and return its result."""
        self._ready.wait(timeout_s)
        if self._error is not None:
            raise RuntimeError(f"sample consumer failed: {self._error}") from self._error
        fut: Future = Future()
        self._calls.put((fn, fut))
        return fut.result(timeout_s)

    def take(self, want: int, timeout_s: float) -> Records:
        """Up to ``want`` records, waiting at most ``timeout_s`` for them."""
        if self._error is not None:
            raise RuntimeError(f"sample consumer failed: {self._error}") from self._error
        out, self._carry = [self._carry[:want]], self._carry[want:]
        have = len(out[0])
        deadline = time.monotonic() + timeout_s
        while have < want:
            left = deadline - time.monotonic()
            try:
                chunk = self._chunks.get_nowait()
            except queue.Empty:   # the trainer waits for the stream: count it ("starved")
                if left <= 0:
                    break
                t0 = time.perf_counter()
                try:
                    chunk = self._chunks.get(timeout=left)
                except queue.Empty:
                    break
                finally:
                    self.waited_s += time.perf_counter() - t0
            need = want - have
            out.append(chunk[:need])
            self._carry = chunk[need:]
            have += len(out[-1])
        parts = [r for r in out if len(r)]
        return Records.concat(parts) if parts else Records.empty(self._width)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
