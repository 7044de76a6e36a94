"""The driver's watermark ticks against the real broker: a partition gets a tick only once
nothing has been produced to it for the idle timeout, after its last record, stamped with the
newest event time in the topic (never later than now), and only when that moves it on; and
through the feature job, where ticks alone let the watermark pass empty partitions."""
from __future__ import annotations

import time
import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from odl.control import ControlPlane
from odl.kafka_util import ensure_topics
from odl.schemas import Impression
from pipeline.watermark_ticks import TICK, WatermarkTicker
from tests.conftest import make_config
from tests.integration.test_feature_job import _collect, _job_env, _start

pytestmark = pytest.mark.slow
NOW_MS = 10_000_000


def _records(bootstrap: str, topic: str, p: int) -> list[tuple[bytes, int]]:
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    tp = TopicPartition(topic, p)
    c.assign([tp])
    c.seek_to_beginning(tp)
    end = c.end_offsets([tp])[tp]
    out = []
    while len(out) < end:
        for recs in c.poll(timeout_ms=1000).values():
            out += [(r.value, r.timestamp) for r in recs]
    c.close()
    return out


def test_quiet_partitions_are_ticked_after_their_last_record(tmp_path, broker_port):
    prefix = f"wt{uuid.uuid4().hex[:6]}."
    cfg = make_config(tmp_path, kafka={"bootstrap_servers": f"127.0.0.1:{broker_port}",
                                       "topic_prefix": prefix, "partitions": 3})
    ensure_topics(cfg)
    topic, bootstrap = prefix + "events", cfg.kafka.bootstrap_servers
    prod = KafkaProducer(bootstrap_servers=bootstrap)

    def send(p: int, ts: int) -> None:
        prod.send(topic, value=b"{}", partition=p, timestamp_ms=ts)
        prod.flush()

    now = [0.0]
    ticker = WatermarkTicker(bootstrap, topic, idle_timeout_s=5, clock=lambda: now[0],
                             wall_ms=lambda: NOW_MS)
    try:
        send(0, 1_000)
        send(1, 2_000)
        assert ticker.step() == 0                 # just seen: nothing is quiet yet
        now[0] = 4.9
        assert ticker.step() == 0
        now[0] = 5.0                              # partition 0 (at 1,000) and the empty 2 are quiet;
        assert ticker.step() == 2                 # 1 holds the newest time and needs no tick
        assert _records(bootstrap, topic, 0) == [(b"{}", 1_000), (TICK.encode(), 2_000)]
        assert _records(bootstrap, topic, 2) == [(TICK.encode(), 2_000)]
        now[0] = 20.0
        assert ticker.step() == 0                 # nothing newer to tick to: no repeats
        send(1, 3_000)                            # 1 moves on: 0 and 2 follow once quiet
        now[0] = 21.0
        assert ticker.step() == 2
        assert _records(bootstrap, topic, 2)[-1] == (TICK.encode(), 3_000)
        send(0, 4_000)                            # produced to: 0's (and 1's) quiet time restarts
        now[0] = 22.0
        assert ticker.step() == 1                 # only 2 has been quiet for 5 s: up to 4,000
        now[0] = 26.0
        assert ticker.step() == 1                 # 1, quiet since 21 s
        assert _records(bootstrap, topic, 1)[-1] == (TICK.encode(), 4_000)
        now[0] = 30.0
        assert ticker.step() == 0
        send(1, NOW_MS + 60_000)                  # a future-dated event: ticks stop at now
        now[0] = 40.0
        assert ticker.step() == 2
        assert _records(bootstrap, topic, 0)[-1] == (TICK.encode(), NOW_MS)
        assert ticker.ticks == 8
    finally:
        ticker.close()
        prod.close()


def test_ticks_let_the_job_close_windows_when_other_partitions_are_empty(tmp_path, broker_port,
                                                                        redis_port):
    """Events on one partition of four: without Flink's idleness the three empty partitions
    would hold the watermark back for ever, and no impression would become a negative sample."""
    prefix = f"wj{uuid.uuid4().hex[:6]}."
    env = _job_env(tmp_path, broker_port, redis_port, prefix, ODL__FEATURE_JOB__IDLE_TIMEOUT_S="2")
    cfg = make_config(tmp_path, kafka={"bootstrap_servers": f"127.0.0.1:{broker_port}",
                                       "topic_prefix": prefix}, redis={"port": redis_port})
    ensure_topics(cfg)
    prod = KafkaProducer(bootstrap_servers=cfg.kafka.bootstrap_servers)
    t0 = int(time.time() * 1000) - 600_000
    for k in range(20):
        ev = Impression(f"Q{k}", 7, k, 0, t0 + 100 * k)
        prod.send(prefix + "events", value=ev.to_json(), partition=0, timestamp_ms=ev.ts_ms)
    late = Impression("Qlast", 7, 99, 0, t0 + 60_000)     # moves partition 0's own clock on
    prod.send(prefix + "events", value=late.to_json(), partition=0, timestamp_ms=late.ts_ms)
    prod.flush()
    prod.close()
    job = _start("feature-job", env, tmp_path / "job.log")
    try:
        samples, _ = _collect(cfg, prefix, want_samples={f"Q{k}:{k}" for k in range(20)},
                              want_dlq=0, job=job, timeout_s=120)
        beats = [h for h in ControlPlane(cfg).heartbeats() if h.component == "feature-job"]
        assert beats and beats[0].metrics.get("watermark_ticks", 0) >= 3, beats
    finally:
        job.terminate()
        job.wait(60)
    assert {s["label"] for s in samples if s["sample_id"].startswith("Q")} == {0}
