"""Decoding sample records in a child process, off the trainer's GIL.

The prefetch thread (``trainers.prefetch``) overlaps fetching and decoding with training, but a
decode is Python (orjson, then keys and transforms column by column: ~15-20 us a criteo record)
and holds the GIL, which TensorFlow's step needs between its ops: on ``odl bench trainer --spec
specs/criteo.yaml`` the stream ran at 0.74-0.89 of the in-memory loop (docs/training.md).  Here
the thread hands each fetched chunk's values to a child process and gets the decoded rows back;
the trainer's process keeps only the fetch (librdkafka, in C) and two copies.

The child is a plain ``python -m trainers.decode_process`` (not ``multiprocessing``: spawning
that re-imports the parent's ``__main__``, a Ray worker's or pytest's); it never imports
TensorFlow.  Messages are length-prefixed pickles on its stdin and stdout:

    parent -> child   the decoder (``SampleCodec.process_decoder()``: ``spec_rows.SpecRows``,
                      spec, spans and stream state, or ``samples.DefaultRows``)
    parent -> child   values (list[bytes])          child -> parent   Decoded, or DecodeFailed
    parent closes stdin                              child exits

The decoder's stream state (key caches, running moments) lives in the child from then on; each
``Decoded`` carries the moments after its chunk, and a new trainer state (a restore) starts a
new child from the parent's.  A child that dies takes the prefetcher down with a clear error
(the trainer fails and is restarted by its supervisor); a parent that dies closes the pipe and
the child exits.
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
from typing import Any

import numpy as np

log = logging.getLogger("odl.trainer.decode")

_HEADER = struct.Struct("<Q")


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
    """The child could not decode a chunk (a bug, not a bad record: those come back refused)."""


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


class DecodeProcess:
    """The parent's handle: ``submit`` a chunk's values, then ``result`` (one in flight at a
    time: with two, parent and child could each block writing a chunk the other is not yet
    reading)."""

    def __init__(self, decoder: Any, start_timeout_s: float = 60.0):
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [root, *filter(None, [os.environ.get("PYTHONPATH")])])}
        self._proc = subprocess.Popen([sys.executable, "-m", "trainers.decode_process"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                      close_fds=True)
        self._to, self._from = self._proc.stdin.fileno(), self._proc.stdout.fileno()
        self.in_flight = False
        _write(self._to, decoder)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def submit(self, values: list[bytes]) -> None:
        if self.in_flight:
            raise RuntimeError("one chunk at a time: take the result first")
        try:
            _write(self._to, list(values))
        except (BrokenPipeError, OSError) as exc:
            raise DecodeFailed(f"decode process {self.pid} is gone ({self._exit()})") from exc
        self.in_flight = True

    def ready(self, timeout_s: float) -> bool:
        """Whether the chunk in flight has its result waiting (or the child died)."""
        return self.in_flight and bool(select.select([self._from], [], [], timeout_s)[0])

    def result(self) -> Any:
        """The chunk's ``Decoded``; waits for it."""
        try:
            out = _read(self._from)
        except EOFError:
            raise DecodeFailed(f"decode process {self.pid} died ({self._exit()})") from None
        finally:
            self.in_flight = False
        if isinstance(out, DecodeFailed):
            raise out
        return out

    def _exit(self) -> str:
        try:
            return f"exit code {self._proc.wait(5)}"
        except subprocess.TimeoutExpired:
            return "not exited"

    def close(self) -> None:
        for f in (self._proc.stdin, self._proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(10)


def main() -> int:
    inp, out = sys.stdin.fileno(), sys.stdout.fileno()
    sys.stdout = sys.stderr        # nothing else may write into the reply channel
    try:
        decoder = _read(inp)
    except EOFError:
        return 0
    while True:
        try:
            values = _read(inp)
        except EOFError:
            return 0
        try:
            reply = decoder.decode(values)
        except Exception as exc:  # noqa: BLE001 - the parent raises it, naming the cause
            log.exception("decode failed")
            reply = DecodeFailed(f"decode failed: {type(exc).__name__}: {exc}")
        try:
            _write(out, reply)
        except (BrokenPipeError, OSError):
            return 0


if __name__ == "__main__":
    # by its importable name, so that what the child pickles (DecodeFailed) unpickles in the parent
    from trainers.decode_process import main as _main
    sys.exit(_main())
