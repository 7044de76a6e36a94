"""Idleness in-band: watermark ticks appended to the quiet partitions of the events topic.

Flink's source idleness (``table.exec.source.idle-timeout``) judges a partition idle by the time
since its reader last emitted one of its records.  During a catch-up the reader can be busy with
other partitions' records (or inside chained operators) for longer than the timeout while this
partition still has unread records; it is marked idle, the watermark passes them, and valid
events go to the DLQ as ``late_event`` (FLINK-40234; docs/features.md#idleness-and-catch-up).
Raising the timeout only moves that threshold.

So the job runs without Flink's idleness, and the job's driver does what idleness is for: a
partition to which nothing has been *produced* for ``feature_job.idle_timeout_s`` gets a tick --
a record whose payload is ``TICK`` and whose timestamp is the newest event time in the topic
(never later than now) -- appended after its last record.  Flink reads the tick only after every
earlier record of that partition, so a tick can never overtake unread events: the watermark
passes a partition only once the partition is read to its end.  The job drops ticks right after
the source (``pipeline.feature_sql.source_rows``); they move the watermark and nothing else.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

log = logging.getLogger("odl.feature_job.ticks")

TICK = "odl.watermark-tick"      # the payload: not an event, so no event can look like it


class WatermarkTicker:
    """``step()`` once a second or so; returns the ticks it wrote."""

    def __init__(self, bootstrap: str, topic: str, idle_timeout_s: float,
                 clock: Callable[[], float] = time.monotonic,
                 wall_ms: Callable[[], int] = lambda: int(time.time() * 1000)):
        self.topic, self.idle_s, self.clock, self.wall_ms = topic, idle_timeout_s, clock, wall_ms
        self._c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                enable_auto_commit=False, client_id="odl-watermark-ticker")
        self._p = KafkaProducer(bootstrap_servers=bootstrap, client_id="odl-watermark-ticker",
                                acks="all")
        self._end: dict[TopicPartition, int] = {}       # end offset as of the last change
        self._changed: dict[TopicPartition, float] = {}  # when a record was last produced
        self._last_ts: dict[TopicPartition, int] = {}    # each partition's newest record time
        self._stale: set[TopicPartition] = set()         # produced to since _last_ts was read
        self.ticks = 0

    def _partitions(self) -> list[TopicPartition]:
        parts = self._c.partitions_for_topic(self.topic) or set()
        return [TopicPartition(self.topic, p) for p in sorted(parts)]

    def _read_last(self, timeout_s: float = 5.0) -> None:
        """The timestamp of the last record of each partition produced to since it was read."""
        want = {tp for tp in self._stale if self._end[tp] > 0}
        self._stale.clear()
        if not want:
            return
        self._c.assign(sorted(want))
        for tp in want:
            self._c.seek(tp, self._end[tp] - 1)
        deadline = time.monotonic() + timeout_s
        while want and time.monotonic() < deadline:
            for tp, recs in self._c.poll(timeout_ms=200).items():
                if tp in want and recs:
                    self._last_ts[tp] = max(r.timestamp for r in recs)
                    want.discard(tp)

    def step(self) -> int:
        now = self.clock()
        tps = self._partitions()
        ends = self._c.end_offsets(tps) if tps else {}
        for tp, end in ends.items():
            if self._end.get(tp) != end:
                self._end[tp], self._changed[tp] = end, now
                self._stale.add(tp)
        quiet = [tp for tp in tps if now - self._changed[tp] >= self.idle_s]
        if not quiet:
            return 0                       # a busy topic costs one end-offsets request a step
        self._read_last()
        if not self._last_ts:
            return 0                       # no record anywhere yet: nothing to tick to
        newest = min(max(self._last_ts.values()), self.wall_ms())
        quiet = [tp for tp in quiet if self._last_ts.get(tp, -1) < newest]
        futures = [(tp, self._p.send(self.topic, value=TICK.encode(), partition=tp.partition,
                                     timestamp_ms=newest)) for tp in quiet]
        self._p.flush()
        for tp, fut in futures:
            meta = fut.get(timeout=10)
            # the tick is this partition's last record now; producing it is not a change
            self._end[tp], self._last_ts[tp] = meta.offset + 1, newest
        self.ticks += len(futures)
        if futures:
            log.debug("ticked %s to %d", [tp.partition for tp, _ in futures], newest)
        return len(futures)

    def close(self) -> None:
        self._p.close()
        self._c.close()
