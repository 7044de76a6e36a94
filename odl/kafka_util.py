"""Kafka plumbing shared by every component (kafka-python, the project's client)."""
from __future__ import annotations

import time
from typing import Iterable

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from odl import names
from odl.config import Config


def topic_names(cfg: Config) -> dict[str, str]:
    p = cfg.kafka.topic_prefix
    return {n: names.topic(n, p) for n in names.ALL_TOPICS}


def ensure_topics(cfg: Config, timeout_s: float = 30.0) -> list[str]:
    """Create the ODL topics if missing (idempotent).  Returns the topics created now."""
    return create_topics(cfg.kafka.bootstrap_servers, topic_names(cfg).values(),
                         cfg.kafka.partitions, timeout_s)


def create_topics(bootstrap: str, topics: Iterable[str], partitions: int,
                  timeout_s: float = 30.0) -> list[str]:
    """Create whichever of ``topics`` do not exist yet, with ``partitions`` each (replication
    1: one local broker); idempotent, and a topic created meanwhile by another client is
    fine.  Returns the topics created now."""
    admin = _admin(bootstrap, timeout_s)
    try:
        existing = set(admin.list_topics())
        created = []
        for t in dict.fromkeys(topics):
            if t in existing:
                continue
            try:
                admin.create_topics([NewTopic(t, partitions, 1)])
                created.append(t)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        admin.close()


def _admin(bootstrap: str, timeout_s: float) -> KafkaAdminClient:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return KafkaAdminClient(bootstrap_servers=bootstrap, client_id="odl-admin",
                                    request_timeout_ms=10000)
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def producer(cfg: Config, **overrides) -> KafkaProducer:
    opts = dict(bootstrap_servers=cfg.kafka.bootstrap_servers, linger_ms=5, acks=1,
                retries=5, max_in_flight_requests_per_connection=1, client_id="odl-producer")
    opts.update(overrides)
    return KafkaProducer(**opts)


def consumer(cfg: Config, topic: str, group_id: str | None, listener=None,
             **overrides) -> KafkaConsumer:
    """A kafka-python consumer of ``topic`` in ``group_id``, told of rebalances through
    ``listener`` (a ``ConsumerRebalanceListener``) if given."""
    opts = dict(bootstrap_servers=cfg.kafka.bootstrap_servers, group_id=group_id,
                auto_offset_reset="earliest", enable_auto_commit=False,
                session_timeout_ms=cfg.kafka.session_timeout_ms,
                heartbeat_interval_ms=max(500, cfg.kafka.session_timeout_ms // 3),
                max_poll_records=2000, client_id=f"odl-{group_id or 'reader'}")
    opts.update(overrides)
    if listener is None:
        return KafkaConsumer(topic, **opts)
    c = KafkaConsumer(**opts)
    c.subscribe([topic], listener=listener)
    return c


class TopicCounter:
    """Sums of end offsets of topics through one long-lived consumer (cheap to ask every few
    seconds).  Exact on Apache Kafka; tansu may report an end offset short of the true end, by
    up to a batch per partition (docs/operations.md#end-offsets-that-tansu-reports-short)."""

    def __init__(self, cfg: Config):
        self._c = KafkaConsumer(bootstrap_servers=cfg.kafka.bootstrap_servers,
                                client_id="odl-counter", enable_auto_commit=False)

    def count(self, topic: str) -> int:
        parts = self._c.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in parts]
        return int(sum(self._c.end_offsets(tps).values())) if tps else 0

    def close(self) -> None:
        self._c.close()


def read_topic(cfg: Config, topic: str, timeout_s: float = 120.0,
               quiet_s: float = 2.0) -> list[tuple[int, int, bytes]]:
    """Every record of ``topic`` now in the log, as (partition, offset, value): an audit's view
    of a topic nothing writes to any more.  Read from the beginning of each partition until
    every partition is at its end offset *and* polls have brought nothing for ``quiet_s`` (tansu
    can report an end offset short of the true end, so the reported end alone is not trusted).
    TimeoutError if that takes longer than ``timeout_s``."""
    c = KafkaConsumer(bootstrap_servers=cfg.kafka.bootstrap_servers, group_id=None,
                      enable_auto_commit=False, client_id="odl-topic-reader", max_poll_records=20_000)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or ())]
        if not tps:
            return []
        c.assign(tps)
        c.seek_to_beginning(*tps)
        out: list[tuple[int, int, bytes]] = []
        deadline = time.monotonic() + timeout_s
        quiet_since = None
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: not read to its end in {timeout_s:.0f} s")
            got = c.poll(timeout_ms=500)
            for tp, recs in got.items():
                out.extend((tp.partition, r.offset, r.value) for r in recs)
            if got:
                quiet_since = None
                continue
            ends = c.end_offsets(tps)
            if any(c.position(tp) < ends[tp] for tp in tps):
                quiet_since = None
                continue
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= quiet_s:
                return out
    finally:
        c.close()
