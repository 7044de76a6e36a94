"""The trainer's sample source: librdkafka (confluent-kafka) with manual partition assignment.

The trainer reads the samples topic at the model's pace; kafka-python decodes every record in
Python (~16 us each, `odl bench trainer`), librdkafka fetches and decodes in C threads of its own.
DESIGN.md allows a faster client on a hot path that a benchmark shows to be the bottleneck; the
rest of ODL keeps kafka-python.  Only the prefetcher touches a source, on its thread or in its
child process (``trainers.prefetch``; librdkafka consumers are not meant to be shared between
threads either).

Partitions are assigned, not subscribed: a trainer owns a fixed set (all, or its shard's), and
starts where its checkpoint says -- else at the group's committed offset, else the beginning.
"""
from __future__ import annotations

import logging
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException
from confluent_kafka import TopicPartition as CTopicPartition

from odl.config import Config
from odl.offset_gaps import GapGuard

log = logging.getLogger("odl.trainer.source")

GAP_RETRY_S = 0.01   # between fetches of a missing offset (odl/offset_gaps.py), when idle


class SampleSource:
    def __init__(self, cfg: Config, topic: str, group_id: str, partitions: list[int] | None,
                 positions: dict[int, int], metadata_timeout_s: float = 30.0):
        self.topic = topic
        self.paused = False
        self._c = Consumer({
            "bootstrap.servers": cfg.kafka.bootstrap_servers, "group.id": group_id,
            "enable.auto.commit": False, "auto.offset.reset": "earliest",
            "enable.partition.eof": False, "client.id": f"odl-{group_id}",
            "fetch.max.bytes": 64 << 20, "max.partition.fetch.bytes": 8 << 20,
            "queued.max.messages.kbytes": 64 << 10})
        try:
            mine = self._partitions(metadata_timeout_s, partitions)
            start = []
            unknown = [CTopicPartition(topic, p) for p in mine if p not in positions]
            # the group's offsets matter only where the checkpoint has none (a broker round trip)
            committed = ({tp.partition: tp.offset for tp in self._c.committed(unknown, timeout=10)}
                         if unknown else {})
            self._gaps = GapGuard("trainer", cfg.kafka.offset_gap_wait_ms / 1000.0)
            self._began: dict[int, int] = {}    # where each partition was taken up, if known
            for p in mine:
                off = positions.get(p, committed.get(p, -1))
                if off is None or off < 0:
                    off = OFFSET_BEGINNING
                    low = self._low_offset(p)
                    if low is not None:
                        self._gaps.start(p, low)
                        self._began[p] = low
                else:
                    self._gaps.start(p, off)
                    self._began[p] = off
                start.append(CTopicPartition(topic, p, off))
            self._c.assign(start)
        except BaseException:
            self._c.close()
            raise
        self.partitions = mine

    def _low_offset(self, p: int) -> int | None:
        """The partition's first offset (None if the broker does not say: then the first
        record read sets where the partition starts)."""
        try:
            got = self._c.get_watermark_offsets(CTopicPartition(self.topic, p), timeout=10)
        except KafkaException as exc:
            log.warning("first offset of %s/%d: %s", self.topic, p, exc)
            return None
        return None if got is None else got[0]

    def _partitions(self, timeout_s: float, wanted: list[int] | None) -> list[int]:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                meta = self._c.list_topics(self.topic, timeout=2.0).topics.get(self.topic)
                if meta is not None and meta.error is None and meta.partitions:
                    return sorted(p for p in meta.partitions if wanted is None or p in wanted)
            except KafkaException as exc:
                log.warning("metadata for %s: %s", self.topic, exc)
            if time.monotonic() > deadline:
                raise RuntimeError(f"topic {self.topic} has no partitions (is the broker up?)")
            time.sleep(0.2)

    def fetch(self, max_records: int, timeout_s: float) -> list[tuple[int, int, bytes]]:
        """Up to ``max_records`` (partition, offset, value), each partition's in offset order
        with none missing (``odl.offset_gaps``); non-fatal client errors are logged (librdkafka
        retries them), fatal ones raise."""
        out = []
        for m in self._c.consume(num_messages=max_records, timeout=timeout_s):
            err = m.error()
            if err is not None:
                if err.fatal():
                    raise KafkaException(err)
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("sample consumer: %s", err)
                continue
            out.append((m.partition(), m.offset(), m.value()))
        out, rewind = self._gaps.admit(out)
        for p, off in rewind.items():   # a later batch came first: fetch the missing one again
            self._c.seek(CTopicPartition(self.topic, p, off))
        if rewind and not out:
            time.sleep(GAP_RETRY_S)
        return out

    @property
    def gap_counts(self) -> tuple[int, int]:
        """Offset gaps met so far: (waited for until they filled, stepped over)."""
        return self._gaps.waited, self._gaps.stepped_over

    def commit(self, positions: dict[int, int]) -> None:
        self._c.commit(offsets=[CTopicPartition(self.topic, p, o) for p, o in positions.items()],
                       asynchronous=False)

    def set_paused(self, paused: bool) -> None:
        (self._c.pause if paused else self._c.resume)(self._c.assignment())
        self.paused = paused

    def end_offsets(self) -> dict[int, int]:
        """Each partition's end: the broker's answer, or the latest fetch response's high
        watermark where that is further (tansu answers ListOffsets with its last batch's base
        offset + 1, short by that batch's length - 1).  Still a lower bound on tansu."""
        ends = {}
        for p in self.partitions:
            tp = CTopicPartition(self.topic, p)
            ends[p] = max(self._c.get_watermark_offsets(tp, timeout=10)[1],
                          self._c.get_watermark_offsets(tp, cached=True)[1])
        return ends

    def backlog(self, taken: dict[int, int], timeout_s: float = 2.0) -> int:
        """How many records the broker holds past ``taken`` (partition -> the next offset the
        trainer will take; where it has taken none yet, where this source took the partition
        up).  The high watermarks are those of the latest fetch responses, which tansu reports
        in full (unlike its ListOffsets answers, see ``end_offsets``); a partition not fetched
        from yet is asked for."""
        total = 0
        for p in self.partitions:
            tp = CTopicPartition(self.topic, p)
            low, high = self._c.get_watermark_offsets(tp, cached=True)
            if high < 0:
                low, high = self._c.get_watermark_offsets(tp, timeout=timeout_s)
            low = max(low, 0)
            total += max(0, high - max(low, taken.get(p, self._began.get(p, low))))
        return total

    def close(self) -> None:
        self._c.close()
