"""The feature job on a standalone Flink cluster (a JobManager and a TaskManager as separate
process trees, ``tests/integration/flink_cluster.py``), submitted exactly as docker-compose's
``flink-jobmanager`` submits it (``feature_job.deployment: cluster``, PythonDriver, checkpoints
in a directory both processes share).  The TaskManager is SIGKILLed mid-stream and replaced, as
a container restart policy replaces it: the job restarts from its newest checkpoint and every
impression still yields its sample, each with its one right label."""
from __future__ import annotations

import json
import time
import uuid

import pytest
from kafka import KafkaProducer

from odl.kafka_util import ensure_topics
from odl.schemas import Click, Impression
from tests.conftest import make_config
from tests.integration.flink_cluster import FlinkCluster
from tests.integration.test_feature_job import _collect, _job_env

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_feature_job_on_a_standalone_cluster_survives_a_taskmanager_kill(tmp_path, broker_port,
                                                                         redis_port):
    prefix = f"fc{uuid.uuid4().hex[:8]}."
    env = _job_env(tmp_path, broker_port, redis_port, prefix,
                   ODL__FEATURE_JOB__CHECKPOINT_INTERVAL_S="2")
    cfg = make_config(tmp_path, kafka={"bootstrap_servers": f"127.0.0.1:{broker_port}",
                                       "topic_prefix": prefix})
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

    cluster = FlinkCluster(tmp_path / "flink-cluster", cfg, env)
    try:
        produce(0, 300)
        started = time.monotonic()
        cluster.start_jobmanager()
        tm = cluster.start_taskmanager()
        job = cluster.wait_running(180)
        print(f"job {job['jid']} running on the cluster after {time.monotonic() - started:.1f} s")
        deadline = time.monotonic() + 120
        while not any(cluster.checkpoints.glob("*/chk-*/_metadata")):
            assert time.monotonic() < deadline, f"no checkpoint in {cluster.checkpoints}"
            time.sleep(0.5)
        cluster.kill(tm)                        # mid-stream: its tasks and their state are gone
        killed = time.monotonic()
        cluster.start_taskmanager()             # the restart policy's replacement
        cluster.wait_running(180, since_restarts=0)
        print(f"job running again {time.monotonic() - killed:.1f} s after the TaskManager kill")
        produce(300, 300)
        for u in range(16):                     # later traffic on every partition closes windows
            ts = t0 + 200 * 600 + 60_000
            prod.send(prefix + "events", key=str(u).encode(),
                      value=Impression(f"Z{u}", u, 9, 0, ts).to_json(), timestamp_ms=ts)
        prod.flush()
        samples, _ = _collect(cfg, prefix, want_samples=expected, want_dlq=0,
                              job=cluster.jobmanager, timeout_s=180)
    finally:
        prod.close()
        cluster.close()
    by_id: dict[str, set[str]] = {}
    for s in samples:
        by_id.setdefault(s["sample_id"], set()).add(json.dumps(s, sort_keys=True))
    assert expected <= set(by_id)
    # a replay after the restart may repeat a sample, never change it
    assert all(len(v) == 1 for k, v in by_id.items() if k in expected)
    labels = {k: json.loads(next(iter(v)))["label"] for k, v in by_id.items() if k in expected}
    assert all(labels[f"R{k}:1"] == (1 if k % 3 == 0 else 0) for k in range(600))
    assert all(labels[f"R{k}:2"] == 0 for k in range(600))
