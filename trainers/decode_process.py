"""The trainer's sample stream in a child process: fetch and decode there, off the trainer's GIL.

A decode is Python (orjson, then keys and transforms column by column: ~20 us a criteo record),
and so are the fetch's per-record steps (librdkafka's message objects, the offset-gap guard).
Both hold the GIL, which TensorFlow's step needs between its ops.  Here a child process owns the
sample source (``trainers.kafka_source.SampleSource``) and the decoder, and sends the trainer's
process decoded chunks; the trainer keeps only the unpickling of int64 rows.  First the decode
alone moved here (2026-12-06), then the consumer with it (docs/training.md has the figures).

The child is a plain ``python -m trainers.decode_process`` (not ``multiprocessing``: spawning
that re-imports the parent's ``__main__``, a Ray worker's or pytest's); it never imports
TensorFlow.  Messages are length-prefixed pickles on its stdin and stdout:

    parent -> child   Open(make_source, decoder, poll_records, credit)
    child -> parent   Ready(partitions) -- or Failed(reason), and it exits
    parent -> child   Credit(n)         n more chunks may come (one per chunk the trainer took)
    parent -> child   Call(id, name, args)   a source method: backlog, end_offsets, commit, ...
    child -> parent   Chunk(partitions, offsets, Decoded, gap counts) / Reply(id, ok, value)
    parent closes stdin                  child closes the source and exits

Flow control is by credit, not by a full pipe: the child sends at most ``credit`` chunks the
trainer has not taken, so the parent's reader never has to stop reading, and a call's reply
never waits behind chunks that nobody reads.  The decoder's stream state (key caches, running
moments) lives in the child; each chunk carries the moments after each record
(``Decoded.moments_after``), and a restore starts a new child from the restored ones.  A child
that dies fails the prefetcher with its exit code (the trainer fails and is restarted by its
supervisor); a parent that dies closes the pipes and the child exits.
"""
from __future__ import annotations

import logging
import os
import pickle
import select
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

log = logging.getLogger("odl.trainer.decode")

_HEADER = struct.Struct("<Q")
IDLE_WAIT_S = 0.05     # the child's wait for a message while it may not fetch (paused, no credit)


@dataclass
class Decoded:
    """One chunk's rows (zeros where a record was malformed), which decoded, why the others did
    not, and the decoder's running moments after it (``SampleReader.moments``; {} for a shape
    that standardises nothing) and after each record (``SampleBatch.moments_after``)."""
    rows: np.ndarray
    valid: np.ndarray
    errors: list[str] = field(default_factory=list)
    moments: dict[str, list[float]] = field(default_factory=dict)
    moments_after: np.ndarray | None = None


class DecodeFailed(RuntimeError):
    """The child failed: it could not open the source, a decode raised (a bug, not a bad record:
    those come back refused), the source failed, or the child died."""


@dataclass
class Open:
    make_source: Callable[[], Any]    # picklable: builds the source in the child
    decoder: Any                      # ``SampleCodec.process_decoder()``: ``decode(values)``
    poll_records: int
    credit: int


@dataclass
class Ready:
    partitions: list[int] | None


@dataclass
class Credit:
    chunks: int


@dataclass
class Call:
    id: int
    name: str
    args: tuple


@dataclass
class Reply:
    id: int
    ok: bool
    value: Any        # the result, or the error's text (a client's exception may not pickle)


@dataclass
class Chunk:
    partitions: np.ndarray    # int32 [n]
    offsets: np.ndarray       # int64 [n]
    decoded: Decoded
    gaps: tuple[int, int]     # the source's offset gaps so far: (waited, stepped over)


@dataclass
class Failed:
    reason: str


def _write(fd: int, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=5)
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def _read_exactly(fd: int, n: int) -> bytes | None:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = os.readv(fd, [view[got:]])
        if k == 0:
            return None
        got += k
    return bytes(buf)


def _read(fd: int) -> Any:
    """The next message, or EOFError when the other side closed its end."""
    head = _read_exactly(fd, _HEADER.size)
    if head is None:
        raise EOFError
    body = _read_exactly(fd, _HEADER.unpack(head)[0])
    if body is None:
        raise EOFError
    return pickle.loads(body)


class StreamProcess:
    """The parent's handle on the child: ``send`` messages, ``receive`` them (one reader)."""

    def __init__(self, opening: Open):
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [root, *filter(None, [os.environ.get("PYTHONPATH")])])}
        self._proc = subprocess.Popen([sys.executable, "-m", "trainers.decode_process"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                      close_fds=True)
        self._to, self._from = self._proc.stdin.fileno(), self._proc.stdout.fileno()
        self.send(opening)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def send(self, message: Any) -> None:
        try:
            _write(self._to, message)
        except (BrokenPipeError, OSError, ValueError) as exc:
            raise DecodeFailed(f"decode process {self.pid} is gone ({self.exit_status()})") from exc

    def receive(self) -> Any:
        """The next message; DecodeFailed once the child has gone."""
        try:
            return _read(self._from)
        except (EOFError, OSError, ValueError):
            raise DecodeFailed(f"decode process {self.pid} died ({self.exit_status()})") from None

    def exit_status(self) -> str:
        try:
            return f"exit code {self._proc.wait(5)}"
        except subprocess.TimeoutExpired:
            return "not exited"

    def close(self) -> None:
        """Close its stdin (it closes the source and exits), then wait for it.  Its stdout stays
        open for the reader to see the end; ``release`` closes it once nobody reads."""
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        try:
            self._proc.wait(15)
        except subprocess.TimeoutExpired:
            log.warning("decode process %d did not exit: killing it", self.pid)
            self._proc.kill()
            self._proc.wait(10)

    def release(self) -> None:
        self._proc.stdout.close()


def _answer(source: Any, call: Call) -> Reply:
    try:
        return Reply(call.id, True, getattr(source, call.name)(*call.args))
    except Exception as exc:  # noqa: BLE001 - the caller raises it, naming the cause
        return Reply(call.id, False, f"{type(exc).__name__}: {exc}")


def _serve(inp: int, out: int, source: Any, opening: Open) -> int:
    """Fetch, decode and send while there is credit; answer calls in between."""
    decoder, credit = opening.decoder, opening.credit
    while True:
        busy = credit > 0 and not source.paused
        if select.select([inp], [], [], 0 if busy else IDLE_WAIT_S)[0]:
            msg = _read(inp)                  # EOFError: the parent closed
            if isinstance(msg, Credit):
                credit += msg.chunks
            else:
                _write(out, _answer(source, msg))
            continue
        if not busy:
            continue
        fetched = source.fetch(opening.poll_records, 0.1)
        if not fetched:
            continue
        partitions, offsets, values = zip(*fetched)
        try:
            decoded = decoder.decode(values)
        except Exception as exc:  # noqa: BLE001 - the parent fails with it
            log.exception("decode failed")
            _write(out, Failed(f"decode failed: {type(exc).__name__}: {exc}"))
            return 1
        _write(out, Chunk(np.asarray(partitions, np.int32), np.asarray(offsets, np.int64),
                          decoded, getattr(source, "gap_counts", (0, 0))))
        credit -= 1


def main() -> int:
    inp, out = sys.stdin.fileno(), sys.stdout.fileno()
    sys.stdout = sys.stderr        # nothing else may write into the reply channel
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s decode-process[{os.getpid()}] %(name)s %(levelname)s "
                               "%(message)s")
    try:
        opening = _read(inp)
    except EOFError:
        return 0
    try:
        source = opening.make_source()
    except Exception as exc:  # noqa: BLE001 - the parent fails with it
        _write(out, Failed(f"{type(exc).__name__}: {exc}"))
        return 1
    try:
        _write(out, Ready(getattr(source, "partitions", None)))
        return _serve(inp, out, source, opening)
    except (EOFError, BrokenPipeError):
        return 0                    # the parent closed its end, or went
    except Exception as exc:  # noqa: BLE001 - a failing source: the parent fails with it
        log.exception("sample source failed")
        try:
            _write(out, Failed(f"sample source: {type(exc).__name__}: {exc}"))
        except OSError:
            pass
        return 1
    finally:
        source.close()


if __name__ == "__main__":
    # by its importable name, so that what the child pickles (Chunk, Reply) unpickles in the parent
    from trainers.decode_process import main as _main
    sys.exit(_main())
