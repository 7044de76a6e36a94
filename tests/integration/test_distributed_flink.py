"""The feature job on a standalone Flink cluster (a JobManager and a TaskManager as separate
process trees, ``tests/integration/flink_cluster.py``), submitted exactly as docker-compose's
``flink-jobmanager`` submits it (``feature_job.deployment: cluster``, PythonDriver, checkpoints
in a directory both processes share).  The TaskManager is SIGKILLed mid-stream and replaced, as
a container restart policy replaces it: the job restarts from its newest checkpoint and every
impression still yields its sample, each with its one right label."""
from __future__ import annotations

import time
import uuid

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from odl.control import ControlPlane
from odl.kafka_util import ensure_topics
from tests.conftest import free_port, make_config
from tests.integration.flink_cluster import FlinkCluster
from tests.integration.test_feature_job import EveryThirdClicked, _collect, _job_env
from tests.integration.test_trainer_group import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_feature_job_on_a_standalone_cluster_survives_a_taskmanager_kill(tmp_path, broker_port,
                                                                         redis_port):
    prefix = f"fc{uuid.uuid4().hex[:8]}."
    metrics_port = free_port()       # the feature job's (metrics.base_port + 1) on the JobManager
    env = _job_env(tmp_path, broker_port, redis_port, prefix,
                   ODL__FEATURE_JOB__CHECKPOINT_INTERVAL_S="2", ODL__METRICS__ENABLED="true",
                   ODL__METRICS__BASE_PORT=str(metrics_port - 1))
    cfg = make_config(tmp_path, kafka={"bootstrap_servers": f"127.0.0.1:{broker_port}",
                                       "topic_prefix": prefix}, redis={"port": redis_port})
    ensure_topics(cfg)
    stream = EveryThirdClicked(cfg.kafka.bootstrap_servers, prefix, int(time.time() * 1000) - 600_000)
    cluster = FlinkCluster(tmp_path / "flink-cluster", cfg, env)
    try:
        stream.produce(0, 300)
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
        stream.produce(300, 300)
        stream.close_windows()
        samples, _ = _collect(cfg, prefix, want_samples=stream.expected, want_dlq=0,
                              job=cluster.jobmanager, timeout_s=180)
        # the job's driver on the JobManager reports it as `odl run feature-job` does: a
        # heartbeat in the control plane and odl_feature_job_* for Prometheus
        hb = wait_for(lambda: next((h for h in ControlPlane(cfg).heartbeats()
                                    if h.component == "feature-job"
                                    and h.metrics.get("samples", 0) >= len(stream.expected)), None),
                      60, "the feature job's heartbeat")
        assert hb.state == "running" and hb.version == job["jid"], hb
        text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        emitted = sum(x.value for x in fams["odl_feature_job_samples"].samples
                      if x.name.endswith("_total"))
        assert emitted >= len(stream.expected), emitted
    finally:
        stream.close()
        cluster.close()
    stream.check(samples)
