"""Hand on a partition's records only in offset order, with none missing.

Why: the local broker, tansu 0.6 (the design notes' platform facts), makes a record batch
readable before an earlier batch of the same partition is stored.  Its produce first advances
the partition's high watermark, then writes the batch object; its fetch lists the stored
batch objects below the high watermark and returns those from the requested offset on, without
checking that they are contiguous.  With two producers on one partition (the feature job has a
Kafka producer per sink operator and sink subtask), a consumer at the tail can receive offsets
N+k.. while N..N+k-1 are still being stored, and moves past them for good: those records are
never read.  The chaos run lost samples this way (docs/operations.md).

The guard: a consumer remembers the next offset it expects per partition.  A record beyond it
is a gap: the consumer drops the record (and the rest of that partition in the same poll),
seeks back to the expected offset and fetches again; the missing batch appears once stored,
within milliseconds.  A gap that outlasts ``wait_s`` is stepped over with a warning and counted
-- a hole that will never fill (a broker that failed between the two writes) must not stall
the consumer for ever.

ODL's topics are written by at-least-once producers and never compacted, so on Apache Kafka
their offsets have no gaps and the guard never waits.  A topic with transaction markers or
compaction has legitimate gaps; there ``kafka.offset_gap_wait_ms: 0`` turns the wait off.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from prometheus_client import Counter

log = logging.getLogger("odl.kafka.gaps")

GAPS = Counter("odl_kafka_offset_gaps_total",
               "offset gaps a consumer met: waited for (refilled) or stepped over after the wait",
               ["consumer", "outcome"])

R = TypeVar("R", bound=tuple)


@dataclass
class _Gap:
    expected: int     # the offset the partition's next record must have
    since: float      # when the gap was first seen (monotonic)


class GapGuard:
    """Per-partition contiguity for one consumer.  Records are tuples whose first two items are
    (partition, offset).  ``start`` sets where a partition is read from (unknown partitions
    trust their first record); ``admit`` filters one poll's records and says where to seek."""

    def __init__(self, name: str, wait_s: float, clock: Callable[[], float] = time.monotonic):
        self.name = name
        self.wait_s = wait_s
        self._clock = clock
        self.next: dict[int, int] = {}
        self._gaps: dict[int, _Gap] = {}
        self.waited = 0          # gaps that filled while the consumer waited
        self.stepped_over = 0    # offsets given up on after the wait

    def start(self, partition: int, offset: int) -> None:
        self.next[partition] = offset
        self._gaps.pop(partition, None)

    def forget(self, partition: int) -> None:
        """The partition was reassigned (a group rebalance): its next record sets the start."""
        self.next.pop(partition, None)
        self._gaps.pop(partition, None)

    @property
    def waiting(self) -> dict[int, int]:
        """Partitions now waiting for a missing offset: partition -> that offset."""
        return {p: g.expected for p, g in self._gaps.items()}

    def admit(self, records: Iterable[R]) -> tuple[list[R], dict[int, int]]:
        """(the records to hand on, in order; {partition: offset to seek back to})."""
        out: list[R] = []
        rewind: dict[int, int] = {}
        for rec in records:
            p, off = rec[0], rec[1]
            if p in rewind:
                continue
            expected = self.next.get(p)
            if expected is None or off == expected:
                self._filled(p, off)
            elif off < expected:      # fetched again after a seek back: already handed on
                continue
            elif not self._may_step_over(p, expected, off):
                rewind[p] = expected
                continue
            self.next[p] = off + 1
            out.append(rec)
        return out, rewind

    def _filled(self, p: int, off: int) -> None:
        gap = self._gaps.pop(p, None)
        if gap is not None:
            self.waited += 1
            GAPS.labels(self.name, "waited").inc()
            log.info("%s: partition %d: offset %d arrived %.0f ms after a later one",
                     self.name, p, off, 1000 * (self._clock() - gap.since))

    def _may_step_over(self, p: int, expected: int, off: int) -> bool:
        now = self._clock()
        gap = self._gaps.get(p)
        if gap is None or gap.expected != expected:
            gap = self._gaps[p] = _Gap(expected, now)
            log.debug("%s: partition %d jumped from %d to %d: waiting", self.name, p, expected, off)
        if now - gap.since < self.wait_s:
            return False
        del self._gaps[p]
        self.stepped_over += off - expected
        GAPS.labels(self.name, "stepped_over").inc()
        # with no wait configured, gaps are expected (transaction markers): no warning each time
        log.log(logging.WARNING if self.wait_s > 0 else logging.DEBUG,
                "%s: partition %d: offsets %d..%d did not appear in %.1f s; stepped over them",
                self.name, p, expected, off - 1, self.wait_s)
        return True
