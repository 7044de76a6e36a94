"""Fetching ahead of training.

Done in the training thread, fetching and decoding left the model idle for most of each step
(``odl bench trainer``).  A prefetcher owns the sample source (``trainers.kafka_source``) away
from the training thread, fetches and decodes there and queues the decoded chunks, while
TensorFlow -- which releases the GIL -- trains on the previous batch.  Every other operation on
the source (pause, commit, end offsets, backlog) is a call by name, run where the source lives.

* ``Prefetcher``: the source and the decode in a thread of the trainer's process
  (``trainer.decode_process: false``).
* ``ProcessPrefetcher``: both in a child process (``trainers.decode_process``); the thread here
  only reads the child's decoded chunks and replies.  Neither the fetch's nor the decode's Python
  then holds the GIL that training needs.

Prefetched records are not consumed in the exactly-once sense: the trainer's positions advance
only for records it has taken, so a restart re-fetches whatever was still queued.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

from odl.offset_gaps import GAPS
from trainers.decode_process import (Call, Chunk, Credit, DecodeFailed, Failed, Open, Ready, Reply,
                                     StreamProcess)
from trainers.samples import ROW_WIDTH, Records, decode_records

log = logging.getLogger("odl.trainer.prefetch")


class Prefetcher:
    """The source and the decode on a thread of this process (see the module docstring)."""

    def __init__(self, make_source: Callable[[], Any], max_chunks: int = 64, poll_records: int = 2000,
                 decode: Callable[..., Records] = decode_records, width: int = ROW_WIDTH):
        self._make = make_source
        self._decode = decode      # the sample shape's (``SampleCodec.decode_records``)
        self._width = width
        self._chunks: queue.Queue[Records] = queue.Queue(maxsize=max_chunks)
        self._calls: queue.Queue[tuple[str, tuple, Future]] = queue.Queue()
        self._carry = Records.empty(width)
        self.waited_s = 0.0   # time take() spent waiting for records: the trainer starved
        self._poll_records = poll_records
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._ready = threading.Event()
        # calls are taken until the source's side ends; a call made after that fails at once
        # instead of waiting out its timeout for an answer nobody gives
        self._calls_lock = threading.Lock()
        self._taking_calls = True
        self._thread = threading.Thread(target=self._run, name="odl-prefetch", daemon=True)
        self._thread.start()

    # --- the source's thread ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            source = self._make()
        except BaseException as exc:  # noqa: BLE001 - surfaced by take()
            self._error = exc
            self._stop_taking_calls()
            self._ready.set()
            return
        try:
            self._ready.set()
            while not self._stop.is_set():
                self._run_calls(source)
                if source.paused:
                    time.sleep(0.02)
                    continue
                fetched = source.fetch(self._poll_records, 0.1)
                if fetched:
                    self._put(self._decode(*zip(*fetched)), source)
        except BaseException as exc:  # noqa: BLE001
            log.error("prefetch failed: %s", exc)
            self._error = exc
        finally:
            self._stop_taking_calls()
            self._ready.set()
            self._run_calls(source)     # those taken before
            source.close()

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
                name, args, fut = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                fut.set_result(getattr(source, name)(*args))
            except BaseException as exc:  # noqa: BLE001
                fut.set_exception(exc)

    def _stop_taking_calls(self) -> None:
        with self._calls_lock:
            self._taking_calls = False

    # --- the training thread -----------------------------------------------------------------
    def _check(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"sample consumer failed: {self._error}") from self._error

    def _refuse_if_ended(self) -> None:
        """(Under ``_calls_lock``.)  Raise if the source's side takes no more calls."""
        self._check()
        if not self._taking_calls:
            raise RuntimeError("sample consumer closed")

    def call(self, name: str, *args: Any, timeout_s: float = 30.0) -> Any:
        """``source.<name>(*args)``, run where the source lives; its result."""
        self._ready.wait(timeout_s)
        fut: Future = Future()
        with self._calls_lock:
            self._refuse_if_ended()
            self._calls.put((name, args, fut))
        return fut.result(timeout_s)

    def _took(self) -> None:
        """A chunk left the queue (the process prefetcher grants the child credit for one)."""

    def take(self, want: int, timeout_s: float) -> Records:
        """Up to ``want`` records, waiting at most ``timeout_s`` for them."""
        self._check()
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
            self._took()
            need = want - have
            out.append(chunk[:need])
            self._carry = chunk[need:]
            have += len(out[-1])
        parts = [r for r in out if len(r)]
        return Records.concat(parts) if parts else Records.empty(self._width)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


class ProcessPrefetcher(Prefetcher):
    """The source and the decode in a child process (``trainers.decode_process``).  ``make_source``
    must pickle (it runs in the child); each chunk's ``Decoded`` goes to ``absorb`` here (its
    refusals, the moments after it)."""

    def __init__(self, make_source: Callable[[], Any], decoder: Any, max_chunks: int = 64,
                 poll_records: int = 2000, width: int = ROW_WIDTH,
                 absorb: Callable[[Any], None] | None = None):
        self._absorb = absorb
        self._pending: dict[int, Future] = {}
        self._ids = itertools.count()
        self._gaps = (0, 0)
        self._child = StreamProcess(Open(make_source, decoder, poll_records, max_chunks))
        log.info("fetching and decoding in process %d", self._child.pid)
        # the child sends at most max_chunks untaken: this queue never blocks its reader
        super().__init__(make_source, max_chunks=0, poll_records=poll_records, width=width)

    def _run(self) -> None:
        """The reader: the child's chunks into the queue, its replies to their callers."""
        try:
            first = self._child.receive()
            if isinstance(first, Failed):
                raise DecodeFailed(f"decode process {self._child.pid}: {first.reason}")
            assert isinstance(first, Ready), first
            self._ready.set()
            while True:
                msg = self._child.receive()
                if isinstance(msg, Chunk):
                    self._chunks.put(self._records(msg))
                elif isinstance(msg, Reply):
                    fut = self._pending.pop(msg.id)
                    if msg.ok:
                        fut.set_result(msg.value)
                    else:
                        fut.set_exception(RuntimeError(msg.value))
                elif isinstance(msg, Failed):
                    raise DecodeFailed(f"decode process {self._child.pid}: {msg.reason}")
        except BaseException as exc:  # noqa: BLE001 - surfaced by take() and call()
            if not self._stop.is_set():
                log.error("prefetch failed: %s", exc)
                self._error = exc
            else:
                self._error = self._error or RuntimeError("prefetcher closed")
        finally:
            self._stop_taking_calls()       # no call adds to _pending from now on
            pending, self._pending = list(self._pending.values()), {}
            self._ready.set()
            for fut in pending:
                if not fut.done():
                    fut.set_exception(RuntimeError(f"sample consumer failed: {self._error}"))

    def _records(self, msg: Chunk) -> Records:
        d = msg.decoded
        if self._absorb is not None:
            self._absorb(d)
        for outcome, now, before in zip(("waited", "stepped_over"), msg.gaps, self._gaps):
            if now > before:     # the child's guard counts; this process exports the metric
                GAPS.labels("trainer", outcome).inc(now - before)
        self._gaps = msg.gaps
        return Records(msg.partitions, msg.offsets, d.rows, d.valid, d.moments_after)

    def call(self, name: str, *args: Any, timeout_s: float = 30.0) -> Any:
        self._ready.wait(timeout_s)
        fut: Future = Future()
        with self._calls_lock:          # also orders the writes to the child's pipe
            self._refuse_if_ended()
            call_id = next(self._ids)
            self._pending[call_id] = fut
            self._child.send(Call(call_id, name, args))
        return fut.result(timeout_s)

    def _took(self) -> None:
        try:
            with self._calls_lock:
                self._child.send(Credit(1))
        except DecodeFailed as exc:    # the reader reports the child's end
            log.debug("credit not sent: %s", exc)

    def close(self) -> None:
        self._stop.set()
        self._child.close()
        self._thread.join(10)     # the child has exited: the reader meets the end of its output
        if not self._thread.is_alive():
            self._child.release()
