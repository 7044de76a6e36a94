"""Sample records as the trainer sees them: decoding, the duplicate window, batches.

A decoded sample is a ``Row`` of int64s (so ids above 2**53 survive a round trip through a
checkpoint): user, item, position, hour, label, impression time, and a 64-bit hash of its
``sample_id`` -- the key of the duplicate window and of the checkpoint ledger.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from trainers.model import Batch

Row = tuple[int, int, int, int, int, int, int]   # user, item, position, hour, label, ts_ms, sid
ROW_WIDTH = 7


def sample_hash(sample_id: str) -> int:
    """A stable signed 64-bit hash of a sample id (collisions ~ n^2 / 2^65: none in practice)."""
    return int.from_bytes(hashlib.blake2b(sample_id.encode(), digest_size=8).digest(), "little",
                          signed=True)


class DedupWindow:
    """The last ``capacity`` distinct sample-id hashes, first sighting first out, to drop
    at-least-once repeats.  FIFO, not LRU: the window is then a function of the sequence of new
    ids alone, so a checkpoint can store just the ids added since the previous one and a restore
    rebuilds exactly the same window."""

    def __init__(self, capacity: int = 200_000):
        self.capacity = capacity
        self._ids: OrderedDict[int, None] = OrderedDict()
        self.added = 0   # ids ever added (the checkpoint's mark)

    def __len__(self) -> int:
        return len(self._ids)

    def seen(self, sid: int) -> bool:
        if sid in self._ids:
            return True
        self._ids[sid] = None
        self.added += 1
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return False

    def state(self, since_added: int | None = None) -> np.ndarray:
        """All ids in the window, or those added after the mark ``since_added``."""
        n = len(self._ids) if since_added is None else min(len(self._ids), self.added - since_added)
        ids = np.fromiter(self._ids, np.int64, len(self._ids))
        return ids[len(ids) - n:]

    def load(self, ids: np.ndarray, added: int, append: bool = False) -> None:
        if not append:
            self._ids = OrderedDict()
        for i in ids.tolist():   # added after the mark: evicted meanwhile if also older
            self._ids.pop(i, None)
            self._ids[i] = None
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        self.added = added


@dataclass(frozen=True)
class Rec:
    """What the trainer keeps of a consumed sample record (``row``: decoded ahead, if it could be)."""
    partition: Any      # a TopicPartition
    offset: int
    value: bytes
    row: Row | None = None


def decode(value: bytes) -> Row:
    """One sample record -> Row; raises ValueError/KeyError/TypeError when malformed."""
    d = orjson.loads(value)
    label = int(d["label"])
    if label not in (0, 1):
        raise ValueError(f"label {label} is not 0 or 1")
    return (int(d["user_id"]), int(d["item_id"]), int(d["position"]), int(d.get("hour") or 0),
            label, int(d["impression_ts_ms"]), sample_hash(str(d["sample_id"])))


def parse_records(recs: list[Rec], dedup: DedupWindow) -> tuple[list[tuple[Rec, Row]], int, int]:
    """Decode sample records; returns ([(rec, row)], duplicates, malformed)."""
    out, dup, bad = [], 0, 0
    for rec in recs:
        row = rec.row
        if row is None:
            try:
                row = decode(rec.value)
            except (ValueError, KeyError, TypeError, OverflowError):
                bad += 1
                continue
        if dedup.seen(row[6]):
            dup += 1
            continue
        out.append((rec, row))
    return out, dup, bad


def rows_array(rows: list[Row]) -> np.ndarray:
    return np.asarray(rows, dtype=np.int64).reshape(-1, ROW_WIDTH)


def to_batch(rows: list[Row]) -> Batch | None:
    if not rows:
        return None
    a = rows_array(rows)
    return Batch(a[:, 0], a[:, 1], a[:, 2], a[:, 3], a[:, 4].astype(np.float32), a[:, 5])
