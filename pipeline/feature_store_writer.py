"""`odl run feature-store`: materialise the feature job's entity-state updates into Redis.

Consumes the ``features`` topic, applies each poll's updates through ``FeatureStore.write``
(newest version per key wins, so at-least-once replays are harmless) and commits the offsets only
after Redis has them.  Malformed records are counted and skipped with a log line: the topic is
written by our own job, so one is a bug to see, not a reason to stop serving fresh features.
"""
from __future__ import annotations

import json
import time

from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.errors import KafkaError
from prometheus_client import Counter
from redis import RedisError

from odl import names
from odl.config import Config
from odl.redis_conn import redis_client
from odl.feature_store import FeatureStore, FeatureUpdate, FeatureUpdateError
from odl.kafka_util import consumer
from odl.offset_gaps import GapGuard
from odl.runtime import Component
from odl.spec import is_default, running_spec
from odl.spec.realtime import store_parts

UPDATES = Counter("odl_feature_store_updates_total", "feature updates consumed", ["result"])


def decode(values: list[bytes], parts: dict[str, tuple[str, ...]] | None = None
           ) -> tuple[list[FeatureUpdate], int]:
    """(updates, number of malformed records) of one poll; ``parts``: the running spec's
    kinds and parts (``FeatureUpdate.from_dict``)."""
    out, bad = [], 0
    for v in values:
        try:
            out.append(FeatureUpdate.from_dict(json.loads(v), parts))
        except (ValueError, FeatureUpdateError, TypeError):
            bad += 1
    return out, bad


class _Reassigned(ConsumerRebalanceListener):
    """A partition this writer gets (back) in a rebalance starts where the group left it."""

    def __init__(self, gaps: GapGuard):
        self.gaps = gaps

    def on_partitions_revoked(self, revoked) -> None:
        for tp in revoked:
            self.gaps.forget(tp.partition)

    def on_partitions_assigned(self, assigned) -> None:
        for tp in assigned:
            self.gaps.forget(tp.partition)


def run(cfg: Config) -> int:
    comp = Component(cfg, "feature-store")
    comp.install_signal_handlers()
    topic = names.topic(names.FEATURES, cfg.kafka.topic_prefix)
    store = FeatureStore(redis_client(cfg, decode=False), cfg.feature_job.store_ttl_s)
    spec = running_spec(cfg)
    parts = None if is_default(spec) else store_parts(spec)
    gaps = GapGuard("feature-store", cfg.kafka.offset_gap_wait_ms / 1000.0)
    c = consumer(cfg, topic, cfg.feature_job.store_group_id, listener=_Reassigned(gaps),
                 max_poll_records=5000)
    stats = {"updates": 0, "written": 0, "malformed": 0, "redis_errors": 0}
    started = time.time()
    comp.start_heartbeat(lambda: ("paused" if comp.paused else "running", None, {
        **stats, "updates_per_s": round(stats["updates"] / max(1e-3, time.time() - started), 1)}))
    try:
        while not comp.stop.is_set():
            comp.work.beat("consume")
            batch = c.poll(timeout_ms=500)
            got, rewind = gaps.admit((tp.partition, r.offset, r.value)
                                     for tp, recs in batch.items() for r in recs)
            for p, off in rewind.items():   # a later batch came first: read the missing again
                c.seek(TopicPartition(topic, p), off)
            values = [v for _, _, v in got]
            if not values:
                continue
            updates, bad = decode(values, parts)
            if bad:
                comp.log.error("%d malformed feature updates skipped", bad)
            while not comp.stop.is_set():
                try:
                    stats["written"] += store.write(updates)
                    break
                except RedisError as exc:  # keep the offsets: retry until Redis is back
                    stats["redis_errors"] += 1
                    comp.log.warning("redis write failed (%s); retrying", exc)
                    comp.work.beat("consume", waiting=f"redis unavailable ({exc})")
                    comp.stop.wait(1.0)
            else:
                break
            try:
                c.commit()
            except KafkaError as exc:  # replayed after a rebalance; writes are idempotent
                comp.log.warning("commit failed: %s", exc)
            stats["updates"] += len(updates)
            stats["malformed"] += bad
            UPDATES.labels("applied").inc(len(updates))
            UPDATES.labels("malformed").inc(bad)
        return 0
    finally:
        c.close()
        comp.close()
