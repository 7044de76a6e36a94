"""The PyFlink feature job on a Flink mini-cluster against the real broker: crafted streams with
known answers for validation (DLQ reasons) and the impression-click label join."""
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter

import pytest
from kafka import KafkaConsumer, KafkaProducer

from odl.control import ControlPlane
from odl.kafka_util import ensure_topics
from odl.schemas import Click, Impression
from tests.conftest import make_config

pytestmark = pytest.mark.slow
WINDOW_S = 3


def _job_env(tmp_path, broker_port: int, redis_port: int, prefix: str, **extra: str) -> dict[str, str]:
    """ODL__ overrides that point `odl run feature-job` at the test's servers and topics."""
    return {"ODL__KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{broker_port}",
            "ODL__KAFKA__TOPIC_PREFIX": prefix, "ODL__REDIS__PORT": str(redis_port),
            "ODL__PATHS__STATE_DIR": str(tmp_path / "var"), "ODL__METRICS__ENABLED": "false",
            "ODL__FEATURE_JOB__ATTRIBUTION_WINDOW_S": str(WINDOW_S),
            "ODL__FEATURE_JOB__WATERMARK_DELAY_MS": "1000", "ODL__FEATURE_JOB__IDLE_TIMEOUT_S": "1", **extra}


def _env(cfg_overrides: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ODL__")}
    env.update(cfg_overrides)
    return env


def test_validation_dlq_and_label_join(tmp_path, broker_port, redis_port):
    prefix = f"t{uuid.uuid4().hex[:8]}."
    overrides = _job_env(tmp_path, broker_port, redis_port, prefix)
    cfg = make_config(tmp_path, kafka={"bootstrap_servers": f"127.0.0.1:{broker_port}", "topic_prefix": prefix})
    ensure_topics(cfg)
    prod = KafkaProducer(bootstrap_servers=cfg.kafka.bootstrap_servers)
    t0 = int(time.time() * 1000) - 120_000

    def send(value: bytes, ts: int, key: bytes = b"1"):
        prod.send(prefix + "events", key=key, value=value, timestamp_ms=ts)

    # request A: two items shown, item 1 clicked twice (an at-least-once duplicate), a click on an
    # item never shown; request B: clicked after the attribution window
    send(Impression("A", 1, 1, 0, t0).to_json(), t0)
    send(Impression("A", 1, 2, 1, t0).to_json(), t0)
    send(Click("A", 1, 1, t0 + 1000).to_json(), t0 + 1000)
    send(Click("A", 1, 1, t0 + 1000).to_json(), t0 + 1000)
    send(Click("A", 1, 3, t0 + 1000).to_json(), t0 + 1000)
    send(Impression("B", 2, 5, 0, t0).to_json(), t0, b"2")
    send(Click("B", 2, 5, t0 + (WINDOW_S + 5) * 1000).to_json(), t0 + (WINDOW_S + 5) * 1000, b"2")
    bad = {b"{broken": "invalid_json",
           json.dumps({"type": "impression", "schema_version": 9}).encode(): "bad_schema_version",
           json.dumps({"type": "view", "schema_version": 1}).encode(): "bad_type",
           json.dumps({"type": "click", "schema_version": 1, "request_id": "C", "user_id": "u",
                       "item_id": 1, "ts_ms": t0}).encode(): "bad_user_id"}
    for payload in bad:
        send(payload, t0 + 2000)
    # later traffic on every partition moves the watermark past both windows
    for u in range(16):
        send(Impression(f"Z{u}", u, 9, 0, t0 + 60_000).to_json(), t0 + 60_000, str(u).encode())
    prod.flush()

    job = subprocess.Popen([sys.executable, "-m", "odl.cli", "run", "feature-job"], env=_env(overrides),
                           stdout=open(tmp_path / "job.log", "wb"), stderr=subprocess.STDOUT,
                           start_new_session=True)
    try:
        samples, dlq = _collect(cfg, prefix, want_samples={"A:1", "A:2", "B:5"}, want_dlq=len(bad), job=job)
        # rejects are counted per reason in the job's heartbeat (control plane)
        cp = ControlPlane(make_config(tmp_path, redis={"port": redis_port}))
        want = {reason: 1 for reason in bad.values()}
        deadline = time.monotonic() + 20
        metrics: dict = {}
        while time.monotonic() < deadline and not (metrics.get("dlq_reasons") == want
                                                   and "watermark_lag_s" in metrics):
            beats = [hb for hb in cp.heartbeats() if hb.component == "feature-job"]
            metrics = beats[0].metrics if beats else {}
            time.sleep(0.5)
        assert metrics.get("dlq_reasons") == want
        # job metrics from Flink's REST API: the join's watermark trails the newest event
        # (t0 + 60 s, two minutes ago) by the watermark delay, so it is behind wall time
        assert 50 < metrics["watermark_lag_s"] < 300, metrics
        assert metrics["events_in_per_s"] >= 0
    finally:
        job.terminate()
        job.wait(60)
    labels = Counter((s["sample_id"], s["label"]) for s in samples)
    assert labels[("A:1", 1)] == 2          # the duplicate click: same sample_id, dedup downstream
    assert labels[("A:2", 0)] == 1          # shown, not clicked: a negative when the window closes
    assert labels[("B:5", 0)] == 1          # clicked too late: still a negative
    assert not [s for s in samples if s["sample_id"] == "A:3"]  # a click without impression
    assert all(s["label_ts_ms"] >= s["impression_ts_ms"] for s in samples)
    by_reason = {d["reason"]: d for d in dlq}
    assert set(by_reason) == set(bad.values())
    for payload, reason in bad.items():
        assert by_reason[reason]["payload"] == payload.decode()
        assert by_reason[reason]["source_offset"] >= 0


def _collect(cfg, prefix, want_samples, want_dlq, job, timeout_s=150):
    c = KafkaConsumer(prefix + "samples", prefix + "events.dlq", bootstrap_servers=cfg.kafka.bootstrap_servers,
                      auto_offset_reset="earliest", enable_auto_commit=False, group_id=None)
    samples, dlq = [], []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for tp, recs in c.poll(timeout_ms=1000).items():
                for r in recs:
                    (samples if tp.topic.endswith("samples") else dlq).append(json.loads(r.value))
            have = {s["sample_id"] for s in samples}
            if want_samples <= have and len(dlq) >= want_dlq:
                time.sleep(3)  # let any wrong extra record arrive too
                for tp, recs in c.poll(timeout_ms=1000).items():
                    for r in recs:
                        (samples if tp.topic.endswith("samples") else dlq).append(json.loads(r.value))
                return samples, dlq
            assert job.poll() is None, "feature job exited early"
    finally:
        c.close()
    raise AssertionError(f"timed out: samples={samples} dlq={dlq}")


def test_killed_job_restarts_from_checkpoint_without_losing_samples(tmp_path, broker_port, redis_port):
    """kill -9 mid-stream, restart: every impression still yields a sample; duplicates are exact."""
    import os
    import signal

    from pipeline.feature_job import latest_checkpoint

    prefix = f"k{uuid.uuid4().hex[:8]}."
    overrides = _job_env(tmp_path, broker_port, redis_port, prefix,
                         ODL__FEATURE_JOB__CHECKPOINT_INTERVAL_S="2")
    cfg = make_config(tmp_path, kafka={"bootstrap_servers": f"127.0.0.1:{broker_port}", "topic_prefix": prefix})
    ensure_topics(cfg)
    prod = KafkaProducer(bootstrap_servers=cfg.kafka.bootstrap_servers)
    t0 = int(time.time() * 1000) - 600_000
    expected: set[str] = set()

    def produce(first: int, n: int) -> None:
        for k in range(first, first + n):
            ts = t0 + 200 * k
            rid = f"R{k}"
            for item in (1, 2):
                prod.send(prefix + "events", key=str(k % 16).encode(),
                          value=Impression(rid, k % 16, item, item, ts).to_json(), timestamp_ms=ts)
                expected.add(f"{rid}:{item}")
            if k % 3 == 0:
                prod.send(prefix + "events", key=str(k % 16).encode(),
                          value=Click(rid, k % 16, 1, ts + 500).to_json(), timestamp_ms=ts + 500)
        prod.flush()

    def start():
        return subprocess.Popen([sys.executable, "-m", "odl.cli", "run", "feature-job"], env=_env(overrides),
                                stdout=open(tmp_path / "job.log", "ab"), stderr=subprocess.STDOUT,
                                start_new_session=True)

    produce(0, 300)
    job = start()
    ckpt_root = tmp_path / "var" / "checkpoints" / "flink"
    deadline = time.monotonic() + 90
    while latest_checkpoint(ckpt_root) is None:
        assert time.monotonic() < deadline and job.poll() is None, "no checkpoint was taken"
        time.sleep(0.5)
    time.sleep(1)
    os.killpg(job.pid, signal.SIGKILL)  # mid-stream, no chance to clean up
    job.wait(30)
    produce(300, 300)
    # later traffic on every partition closes the last windows (these need no sample)
    for u in range(16):
        ts = t0 + 200 * 600 + 60_000
        prod.send(prefix + "events", key=str(u).encode(), value=Impression(f"Z{u}", u, 9, 0, ts).to_json(),
                  timestamp_ms=ts)
    prod.flush()
    job = start()
    try:
        samples, _ = _collect(cfg, prefix, want_samples=expected, want_dlq=0, job=job, timeout_s=180)
    finally:
        job.terminate()
        job.wait(60)
    assert "restoring feature job state" in (tmp_path / "job.log").read_text()
    by_id: dict[str, set[str]] = {}
    for s in samples:
        by_id.setdefault(s["sample_id"], set()).add(json.dumps(s, sort_keys=True))
    assert expected <= set(by_id)
    # an impression clicked once has one distinct positive row; replays after the restart may
    # repeat it, never change it
    assert all(len(v) == 1 for k, v in by_id.items() if k in expected)
    labels = {k: json.loads(next(iter(v)))["label"] for k, v in by_id.items() if k in expected}
    assert all(labels[f"R{k}:1"] == (1 if k % 3 == 0 else 0) for k in range(600))
    assert all(labels[f"R{k}:2"] == 0 for k in range(600))
