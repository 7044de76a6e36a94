"""`odl run source`: produce the configured event stream to Kafka at its due times."""
from __future__ import annotations

import time

from prometheus_client import Counter

from odl import names
from odl.config import Config
from odl.kafka_util import producer
from odl.runtime import Component
from pipeline.generator import SyntheticSource
from pipeline.movielens import MovieLensReplay
from pipeline.replay import REFUSED

EVENTS_SENT = Counter("odl_source_events_total", "events produced", ["kind"])


def build_source(cfg: Config, start_ms: int):
    src = cfg.source
    if src.kind == "movielens":
        return MovieLensReplay(src, start_ms)
    if src.kind == "log":
        from pipeline.replay import LogReplay
        return LogReplay(src.log_spec or cfg.spec, src.log_path, src.log_columns, start_ms, src.log_speedup,
                         src.max_events)
    return SyntheticSource(src, start_ms)


def run(cfg: Config) -> int:
    comp = Component(cfg, "source")
    comp.install_signal_handlers()
    counts = {"impression": 0, "click": 0, "malformed": 0}
    started = time.time()
    comp.start_heartbeat(lambda: ("paused" if comp.paused else "running", cfg.source.kind,
                                  {**counts, "events": sum(counts.values()),
                                   "events_per_s": round(sum(counts.values()) /
                                                                   max(1e-3, time.time() - started), 1)}))
    topic = names.topic(names.EVENTS, cfg.kafka.topic_prefix)
    dlq = names.topic(names.EVENTS_DLQ, cfg.kafka.topic_prefix)   # a log replay's refused rows
    prod = producer(cfg)
    paused_ms = 0
    source = build_source(cfg, int(time.time() * 1000))
    time_field = getattr(source, "time_field", "ts_ms")
    comp.log.info("producing %s events to %s", cfg.source.kind, topic)
    try:
        for rec in source.records():
            while not comp.stop.is_set():
                comp.work.beat("produce")   # per record, and per 0.2 s of waiting or pause
                if comp.paused:  # hold the stream; event times shift by the pause
                    time.sleep(0.2)
                    paused_ms += 200
                    continue
                wait = (rec.due_ms + paused_ms) / 1000.0 - time.time()
                if wait <= 0:
                    break
                time.sleep(min(wait, 0.2))
            if comp.stop.is_set():
                break
            ts = rec.ts_ms + paused_ms
            if rec.kind == REFUSED:
                prod.send(dlq, value=rec.value, timestamp_ms=ts)
            else:
                value = (rec.value if paused_ms == 0 or rec.kind == "malformed"
                         else _shift(rec.value, paused_ms, time_field))
                prod.send(topic, key=rec.key or None, value=value, timestamp_ms=ts)
            counts[rec.kind] = counts.get(rec.kind, 0) + 1
            EVENTS_SENT.labels(rec.kind).inc()
        else:
            comp.log.info("source exhausted after %s", counts)
    finally:
        prod.flush(10)
        prod.close(10)
        comp.close("finished" if not comp.stop.is_set() else "stopped")
    return 0


def _shift(value: bytes, delta_ms: int, time_field: str = "ts_ms") -> bytes:
    import json
    d = json.loads(value)
    d[time_field] += delta_ms
    return json.dumps(d, separators=(",", ":")).encode()
