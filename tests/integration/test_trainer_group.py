"""A training group on a real Ray local cluster and broker: 2 trainers on disjoint partitions, 2
parameter-server shards, dense averaging, group checkpoints.  A trainer and a shard are SIGKILLed
mid-stream; the group restarts from its committed epoch, and the trainers' checkpoint ledgers
along the committed lineage name every sample exactly once."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest

from bench.common import synthetic_samples
from odl import names
from odl.kafka_util import ensure_topics, producer
from odl.ray_util import LOOPBACK_ENV
from tests.conftest import make_config
from trainers.audit import committed_ledger
from trainers.checkpoint import CheckpointStore
from trainers.group import GroupCommit
from trainers.samples import sample_hash
from trainers.streaming import checkpoint_dir

pytestmark = pytest.mark.slow

N_SAMPLES = 24_000
REPEATS = 300


@pytest.fixture
def ray_cluster():
    os.environ.update(LOOPBACK_ENV)
    import ray
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=f"/tmp/odl-ray-grp-{os.getpid()}",
             _node_ip_address="127.0.0.1", log_to_driver=False, namespace="odl-group-test")
    try:
        yield ray
    finally:
        ray.shutdown()


def assert_committed_once(cfg, data: list[dict], epoch: int, trainers: int = 2) -> None:
    """The trainers' ledgers along the committed lineage of ``epoch`` name every sample of
    ``data`` exactly once."""
    ledger = np.concatenate([committed_ledger(CheckpointStore(checkpoint_dir(cfg, f"trainer-{i}")), epoch)
                             for i in range(trainers)])
    expected = np.array(sorted(sample_hash(d["sample_id"]) for d in data), np.int64)
    assert len(ledger) == len(expected), (len(ledger), len(expected))
    np.testing.assert_array_equal(np.sort(ledger), expected)


def group_config(tmp_path, broker_port, redis_port, prefix="grp"):
    return make_config(
        tmp_path,
        kafka={"bootstrap_servers": f"127.0.0.1:{broker_port}", "partitions": 4,
               "topic_prefix": f"{prefix}{os.getpid()}."},
        redis={"port": redis_port},
        feature_job={"attribution_window_s": 5, "idle_timeout_s": 1, "watermark_delay_ms": 0},
        trainer={"batch_size": 256, "max_batch_wait_ms": 1000, "frozen_baseline_after": None,
                 "align_labels": True,   # the held-samples path through checkpoints
                 "tables": {"user": {"dim": 8, "capacity": 4000},
                            "item": {"dim": 8, "admit_min_count": 2}},
                 "hidden_units": [16],
                 "scale": {"trainers": 2, "ps_shards": 2, "sync_every_steps": 5,
                           "trainer_cpus": 0.5},
                 "checkpoint": {"incremental_interval_s": 0.7, "full_interval_s": 5,
                                "keep_full": 1000, "ledger": True}})


def wait_for(pred, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_group_trains_every_sample_once_through_member_kills(tmp_path, redis_port, broker_port,
                                                              ray_cluster):
    ray = ray_cluster
    cfg = group_config(tmp_path, broker_port, redis_port)
    data = synthetic_samples(N_SAMPLES)
    rng = np.random.default_rng(3)
    stream = list(data)
    for k in sorted(rng.choice(N_SAMPLES - 1, REPEATS, replace=False).tolist(), reverse=True):
        stream.insert(k + 1, data[k])
    ensure_topics(cfg)

    def produce():   # paced, so that the kills land while samples still arrive
        prod = producer(cfg)
        topic = names.topic(names.SAMPLES, cfg.kafka.topic_prefix)
        for k, d in enumerate(stream):  # keyed by sample id: a repeat lands on its original's partition
            prod.send(topic, key=d["sample_id"].encode(), value=json.dumps(d).encode())
            if k % 400 == 399:
                prod.flush()
                time.sleep(0.5)
        prod.flush()
        prod.close()
    feeder = threading.Thread(target=produce, daemon=True)
    feeder.start()

    from trainers.coordinator import TrainingGroupImpl
    group = ray.remote(TrainingGroupImpl).options(max_concurrency=4, num_cpus=0).remote(
        cfg.model_dump_json())
    run_ref = group.run.remote()

    def metrics() -> dict:
        """The group's metrics; {} while it restarts (its members are away)."""
        try:
            return ray.get(group.metrics.remote(), timeout=60)
        except ray.exceptions.RayError:
            return {}

    def pids(who: str) -> int | None:
        try:
            return ray.get(group.member_pids.remote(), timeout=60)[who][0]
        except ray.exceptions.RayError:
            return None

    trained = lambda: metrics().get("samples_trained", -1)  # noqa: E731
    epoch = lambda: (GroupCommit.read(cfg) or GroupCommit(0, 2, 2)).epoch  # noqa: E731
    at_kill = []
    try:
        # kill a trainer, then a shard, each once the group is training and has committed
        for k, who in enumerate(("trainers", "shards")):
            start = epoch()
            wait_for(lambda: epoch() >= start + 2 and trained() > 0, 180, "epochs to commit")
            pid = pids(who)
            at_kill.append(trained())
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: metrics().get("restarts", -1) >= k + 1 and pids(who) not in (None, pid),
                     180, f"the group to restart after a {who[:-1]} died")
        print("samples trained at the kills:", at_kill)
        assert any(0 < t < N_SAMPLES for t in at_kill), f"kills should land mid-stream: {at_kill}"
        wait_for(lambda: trained() == N_SAMPLES, 300, "every sample to be trained")
        m = metrics()
        assert m["restarts"] == 2 and m["trainers"] == 2 and m["ps_shards"] == 2
        # counters are restored with the checkpoint: each repeat is dropped (and counted) once
        assert m["duplicates"] == REPEATS and m["rows_user"] > 0
        # each trainer read only its partitions
        assert sorted(m["members"][0]["positions"]) == ["0", "2"]
        assert sorted(m["members"][1]["positions"]) == ["1", "3"]
        # the exporter's view: rows from every shard, weights averaged over the trainers
        marks, changes = ray.get(group.embedding_changes.remote(0), timeout=60)
        assert len(marks) == 2 and len(changes["user"]["ids"]) == m["rows_user"]
        snap = ray.get(group.snapshot.remote(), timeout=60)
        assert all(np.isfinite(w).all() for w in snap["weights"].values())
        # what the driver relays to Prometheus: the coordinator's families once, members labelled
        from prometheus_client.parser import text_string_to_metric_families
        text = ray.get(group.metrics_text.remote(), timeout=60)
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        assert fams["odl_trainer_group_epoch"].samples[0].value >= 1
        assert {s.labels.get("member") for s in fams["odl_trainer_step"].samples} == {"0", "1"}
        assert text.count("# TYPE odl_trainer_step gauge") == 1
        last = epoch()
        wait_for(lambda: epoch() > last, 60, "a commit after the last sample")
    finally:
        ray.get(group.stop.remote(), timeout=30)
        final = ray.get(run_ref, timeout=120)
    assert final["samples_trained"] == N_SAMPLES
    assert_committed_once(cfg, data, epoch())


def test_group_rolls_back_to_an_epoch_replaying_or_skipping_ahead(tmp_path, redis_port, broker_port,
                                                                 ray_cluster):
    """`odl rollback --trainer` on a group: back to a committed epoch, the samples since replayed
    and committed once; then with skip-ahead, nothing replayed and the choice committed."""
    ray = ray_cluster
    cfg = group_config(tmp_path, broker_port, redis_port, prefix="grprb")
    data = synthetic_samples(8_000, seed=5)
    ensure_topics(cfg)
    prod = producer(cfg)
    topic = names.topic(names.SAMPLES, cfg.kafka.topic_prefix)

    def send(rows):
        for d in rows:
            prod.send(topic, key=d["sample_id"].encode(), value=json.dumps(d).encode())
        prod.flush()

    from odl.control import ControlPlane
    from trainers.coordinator import TrainingGroupImpl
    cp = ControlPlane(cfg)
    group = ray.remote(TrainingGroupImpl).options(max_concurrency=4, num_cpus=0).remote(
        cfg.model_dump_json())
    run_ref = group.run.remote()
    metrics = lambda: ray.get(group.metrics.remote(), timeout=60)  # noqa: E731
    epoch = lambda: GroupCommit.read(cfg).epoch if GroupCommit.read(cfg) else 0  # noqa: E731

    def rollback(checkpoint, skip_ahead):
        rid = cp.request_trainer_rollback(checkpoint, skip_ahead, "test")
        return wait_for(lambda: (cp.trainer_rolled_back() or {}).get("id") == rid
                        and cp.trainer_rolled_back(), 180, "the group's answer")
    try:
        send(data[:4000])
        wait_for(lambda: metrics().get("samples_trained") == 4000 and epoch() >= 2, 240,
                 "the first half trained and committed")
        target = epoch()
        send(data[4000:])
        wait_for(lambda: metrics().get("samples_trained") == 8000 and epoch() > target, 240,
                 "the second half trained")
        # not a group checkpoint, or not committed: refused, and the group trains on
        assert rollback("ckpt-00000003-full", False)["ok"] is False
        assert "not committed" in rollback(f"epoch-{epoch() + 5}", False)["reason"]
        done = rollback(f"epoch-{target}", False)
        assert done["ok"] and done["mode"] == "replay" and done["epoch"] == target, done
        # the second half is replayed from the epoch's positions: trained again, once
        wait_for(lambda: metrics().get("samples_trained") == 8000 and epoch() > target, 240,
                 "the replay")
        last = epoch()
        wait_for(lambda: epoch() > last, 60, "a commit after the replay")
        assert_committed_once(cfg, data, epoch())
        # skip-ahead: back to the epoch just committed, on from the newest offsets
        back = epoch()
        ledger_then = sum(len(committed_ledger(CheckpointStore(checkpoint_dir(cfg, f"trainer-{i}")), back))
                          for i in range(2))
        done = rollback(f"epoch-{back}", True)
        assert done["ok"] and done["mode"] == "skip-ahead" and done["epoch"] == back + 1, done
        assert epoch() == back + 1                      # the choice is committed at once
        fresh = [{**d, "sample_id": f"new-{d['sample_id']}", "request_id": f"new-{d['request_id']}"}
                 for d in synthetic_samples(500, seed=9)]
        send(fresh)                                     # new samples after the skip train
        wait_for(lambda: metrics().get("samples_trained") == 8500 and epoch() > back + 1, 240,
                 "new samples after skipping ahead")
    finally:
        ray.get(group.stop.remote(), timeout=30)
        ray.get(run_ref, timeout=120)
    final = np.concatenate([committed_ledger(CheckpointStore(checkpoint_dir(cfg, f"trainer-{i}")), epoch())
                            for i in range(2)])
    assert len(final) == ledger_then + 500 and len(np.unique(final)) == len(final)
