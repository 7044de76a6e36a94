"""A training group on a two-node Ray cluster: a head (`ray start --head`) and a second node
joining it (what `ray start --address` runs) as separate process trees on loopback, as a KubeRay
head and worker pod are.  With ``trainer.scale.placement: spread`` the trainers and shards land on both nodes; the
second node is killed whole (SIGKILL to its process group: raylet, object store, workers), and
the group restarts from its committed epoch on the node that is left.  The trainers' ledgers
along the committed lineage name every sample exactly once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.common import synthetic_samples
from odl import names
from odl.kafka_util import ensure_topics, producer
from odl.ray_util import LOOPBACK_ENV
from tests.conftest import free_port, make_config, wait_port
from tests.integration.prometheus import Prometheus
from tests.integration.test_trainer_group import assert_committed_once, wait_for
from trainers.group import GroupCommit

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

N_SAMPLES = 12_000


# A joining node as `ray start --address --block` makes one (``Node(head=False)``, then wait).
# The CLI itself refuses to join under LOOPBACK_ENV's switch, and without the switch it rewrites
# 127.0.0.1 to the machine's address; Ray's own node class takes the loopback address as given.
JOIN = """
import sys, threading
from ray._private.node import Node
from ray._private.parameter import RayParams
params = RayParams(gcs_address=sys.argv[1], node_ip_address="127.0.0.1", num_cpus=int(sys.argv[2]),
                   metrics_export_port=int(sys.argv[3]), include_log_monitor=False, node_manager_port=0, min_worker_port=0,
                   max_worker_port=0, object_store_memory=200 * 1024 * 1024)
params.dashboard_agent_listen_port = None
Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
print("joined", flush=True)
threading.Event().wait()
"""


def _ray_node(argv: list[str], log: Path) -> subprocess.Popen:
    """One Ray node as its own process group, alive as long as the process."""
    env = {**os.environ, **LOOPBACK_ENV, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    return subprocess.Popen(argv, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _kill_node(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


@pytest.fixture
def two_nodes(tmp_path):
    """(ray, the head's node id, the second node's id, the second node's process, Prometheus
    scraping both nodes' metrics as compose's ``ray-head:8080`` and ``ray-worker:8080``)."""
    port, head_metrics, second_metrics = free_port(), free_port(), free_port()
    head = _ray_node([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                      "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                      "--include-dashboard=false", "--disable-usage-stats",
                      f"--metrics-export-port={head_metrics}",
                      '--resources={"odl-head": 1}', f"--temp-dir=/tmp/odl-ray-2n-{os.getpid()}"],
                     tmp_path / "ray-head.log")
    second = None
    os.environ.update(LOOPBACK_ENV)
    import ray
    try:
        wait_port(port, head, "ray head", timeout=90)
        second = _ray_node([sys.executable, "-c", JOIN, f"127.0.0.1:{port}", "2", str(second_metrics)],
                           tmp_path / "ray-second.log")
        ray.init(address=f"127.0.0.1:{port}", namespace="odl-2n-test", log_to_driver=False,
                 _node_ip_address="127.0.0.1")
        alive = wait_for(lambda: [n for n in ray.nodes() if n["Alive"]] if len(
            [n for n in ray.nodes() if n["Alive"]]) == 2 else None, 90, "the second node to join")
        head_id = next(n["NodeID"] for n in alive if "odl-head" in n["Resources"])
        second_id = next(n["NodeID"] for n in alive if n["NodeID"] != head_id)
        with Prometheus(tmp_path / "prometheus", {"ray": {
                "ray-head:8080": f"127.0.0.1:{head_metrics}",
                "ray-worker:8080": f"127.0.0.1:{second_metrics}"}}) as prom:
            yield ray, head_id, second_id, second, prom
    finally:
        ray.shutdown()
        for proc in (second, head):
            if proc is not None:
                _kill_node(proc)


def test_group_spreads_over_two_nodes_and_survives_losing_one(tmp_path, redis_port, broker_port,
                                                               two_nodes):
    ray, head_id, second_id, second, prom = two_nodes
    # Prometheus scrapes both nodes' metrics agents, as deploy/prometheus/prometheus.yml names them
    prom.wait_all_up(120)
    wait_for(lambda: prom.value('count(count by (instance) ({job="ray", __name__=~"ray_.+"}))') == 2,
             60, "ray_* series from both nodes")
    cfg = make_config(
        tmp_path,
        kafka={"bootstrap_servers": f"127.0.0.1:{broker_port}", "partitions": 4,
               "topic_prefix": f"twonode{os.getpid()}."},
        redis={"port": redis_port},
        # samples wait for their labels one attribution window of event time (as in the
        # group test): short, so that the last ones are released within the run
        feature_job={"attribution_window_s": 5, "idle_timeout_s": 1, "watermark_delay_ms": 0},
        trainer={"batch_size": 256, "max_batch_wait_ms": 500, "frozen_baseline_after": None,
                 # every sample is trained (with delayed feedback, the default, a final negative
                 # only settles its impression's figures and samples_trained counts the rest)
                 "align_labels": True,
                 "tables": {"user": {"dim": 8}, "item": {"dim": 8}}, "hidden_units": [16],
                 "scale": {"trainers": 2, "ps_shards": 2, "sync_every_steps": 5,
                           "trainer_cpus": 0.5, "placement": "spread"},
                 "checkpoint": {"incremental_interval_s": 0.7, "full_interval_s": 5,
                                "keep_full": 1000, "ledger": True}})
    data = synthetic_samples(N_SAMPLES)
    ensure_topics(cfg)

    def produce():   # paced, so that the node dies while samples still arrive
        prod = producer(cfg)
        topic = names.topic(names.SAMPLES, cfg.kafka.topic_prefix)
        for k, d in enumerate(data):
            prod.send(topic, key=d["sample_id"].encode(), value=json.dumps(d).encode())
            if k % 300 == 299:
                prod.flush()
                time.sleep(0.5)
        prod.flush()
        prod.close()

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from trainers.coordinator import TrainingGroupImpl
    # the coordinator stays on the head, as the driver's actor does on a KubeRay head
    group = ray.remote(TrainingGroupImpl).options(
        max_concurrency=4, num_cpus=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(head_id, soft=False)).remote(
        cfg.model_dump_json())
    run_ref = group.run.remote()
    feeder = threading.Thread(target=produce, daemon=True)

    def ask(method: str, default):
        try:
            return ray.get(getattr(group, method).remote(), timeout=60)
        except ray.exceptions.RayError:
            return default      # the group is restarting: its members are away

    def members() -> dict | None:
        """Each trainer's and shard's node, once the group's members are all up."""
        nodes = ask("member_nodes", None)
        return nodes if nodes and len(nodes["trainers"]) == len(nodes["shards"]) == 2 else None

    trained = lambda: ask("metrics", {}).get("samples_trained", -1)  # noqa: E731
    epoch = lambda: (GroupCommit.read(cfg) or GroupCommit(0, 2, 2)).epoch  # noqa: E731
    try:
        nodes = wait_for(members, 180, "the group to start")
        placed = set(nodes["trainers"]) | set(nodes["shards"])
        assert placed == {head_id, second_id}, f"members not spread over both nodes: {nodes}"
        feeder.start()
        wait_for(lambda: epoch() >= 2 and trained() > 0, 180, "epochs to commit")
        at_kill = trained()
        _kill_node(second)
        wait_for(lambda: ask("metrics", {}).get("restarts", 0) >= 1, 180,
                 "the group to restart after its second node died")
        nodes = wait_for(members, 180, "the group to come back")
        assert set(nodes["trainers"]) | set(nodes["shards"]) == {head_id}
        assert 0 < at_kill < N_SAMPLES, f"the node should die mid-stream: {at_kill}"
        try:
            wait_for(lambda: trained() == N_SAMPLES, 300, "every sample to be trained")
        except AssertionError:
            m = ask("metrics", {})
            raise AssertionError(f"trained {m.get('samples_trained')} of {N_SAMPLES}: "
                                 f"{ {k: v for k, v in m.items() if k != 'members'} } "
                                 f"{[x.get('positions') for x in m.get('members', [])]}") from None
        last = epoch()
        wait_for(lambda: epoch() > last, 60, "a commit after the last sample")
    finally:
        ray.get(group.stop.remote(), timeout=30)
        final = ray.get(run_ref, timeout=120)
    assert final["samples_trained"] == N_SAMPLES
    assert_committed_once(cfg, data, epoch())
