"""`source.kind: log` (``pipeline.replay``): a log replayed as live events, in event-time order
with compressed time; refused rows to the DLQ with their row numbers."""
from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from odl import names
from odl.config import Config
from odl.schemas import parse_event
from odl.spec import DEFAULT_SPEC_PATH
from pipeline.replay import REFUSED, LogReplay

T0 = 1_500_000_000_000       # 2017: history, far older than the live job's 7-day limit
ROWS = [  # file order is not time order
    {"type": "impression", "request_id": "r2", "user_id": 2, "item_id": 20, "position": 1, "ts_ms": T0 + 60_000, "hour": 9},
    {"type": "impression", "request_id": "r1", "user_id": 1, "item_id": 10, "position": 0, "ts_ms": T0, "hour": 8},
    {"type": "click", "request_id": "r1", "user_id": 1, "item_id": 10, "position": "", "ts_ms": T0 + 5_000, "hour": ""},
    {"type": "impression", "request_id": "r3", "user_id": 3, "item_id": "x", "position": 0, "ts_ms": T0 + 1, "hour": 1},
    {"type": "impression", "request_id": "", "user_id": 4, "item_id": 40, "position": 0, "ts_ms": T0 + 2, "hour": 1},
]


def _log(tmp_path: Path) -> Path:
    path = tmp_path / "log.csv"
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(ROWS[0]))
        w.writeheader()
        w.writerows(ROWS)
    return path


def test_replays_in_event_time_order_onto_now_and_sends_bad_rows_to_the_dlq(tmp_path: Path):
    start = int(time.time() * 1000)
    recs = list(LogReplay(DEFAULT_SPEC_PATH, _log(tmp_path), {}, start, speedup=10.0).records())
    bad = [json.loads(r.value) for r in recs if r.kind == REFUSED]
    assert [(b["source_offset"], b["reason"]) for b in bad] == [(4, "bad_item_id"), (5, "bad_request_id")]
    assert all(b["source_partition"] == -1 and b["payload"] for b in bad)
    assert json.loads(bad[0]["payload"])["item_id"] == "x"
    good = [r for r in recs if r.kind != REFUSED]
    assert [r.kind for r in good] == ["impression", "click", "impression"]
    # log time compressed 10x onto now: 5 s later -> 0.5 s later, 60 s -> 6 s
    assert [r.due_ms - start for r in good] == [0, 500, 6000]
    for r in good:   # what the live feature job will read: valid, with the replayed event time
        reason, ev = parse_event(r.value, r.ts_ms, now_ms=start)
        assert reason is None, reason
        assert ev.ts_ms == r.due_ms == json.loads(r.value)["ts_ms"]
    assert parse_event(good[0].value, good[0].ts_ms)[1].hour == 8
    assert good[0].key == b"1"


def test_a_log_source_needs_its_log():
    with pytest.raises(ValidationError, match="log_path"):
        Config.model_validate({"source": {"kind": "log"}})


@pytest.mark.slow
def test_odl_run_source_replays_a_log_into_the_events_and_dlq_topics(tmp_path, broker_port, redis_port):
    from kafka import KafkaConsumer

    from odl.kafka_util import ensure_topics
    from pipeline import source
    from tests.conftest import make_config
    cfg = make_config(tmp_path, kafka={"bootstrap_servers": f"127.0.0.1:{broker_port}",
                                       "topic_prefix": f"replay{os.getpid()}."},
                      redis={"port": redis_port},
                      source={"kind": "log", "log_path": str(_log(tmp_path)), "log_speedup": 100.0})
    ensure_topics(cfg)
    assert source.run(cfg) == 0
    got = {}
    for t in (names.EVENTS, names.EVENTS_DLQ):
        c = KafkaConsumer(names.topic(t, cfg.kafka.topic_prefix), bootstrap_servers=cfg.kafka.bootstrap_servers,
                          auto_offset_reset="earliest", consumer_timeout_ms=3000, group_id=None)
        got[t] = [json.loads(m.value) for m in c]
        c.close()
    assert sorted(e["request_id"] for e in got[names.EVENTS]) == ["r1", "r1", "r2"]
    assert sorted(d["source_offset"] for d in got[names.EVENTS_DLQ]) == [4, 5]


def test_compression_keeps_strictly_later_rows_strictly_later(tmp_path: Path):
    rows = [{**ROWS[1], "request_id": f"q{k}", "ts_ms": T0 + k} for k in range(3)] + \
           [{**ROWS[1], "request_id": "q3", "ts_ms": T0 + 2}]
    path = tmp_path / "tight.csv"
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    recs = list(LogReplay(DEFAULT_SPEC_PATH, path, {}, 0, speedup=1e6).records())
    assert [r.due_ms for r in recs] == [0, 1, 2, 2]      # ties stay ties
