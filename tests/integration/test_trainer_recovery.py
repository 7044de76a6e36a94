"""Exactly-once training under kill -9: a trainer process (`odl run trainer --no-ray`) is killed
at random moments over a fixed, single-partition sample set.  Its checkpoints' ledgers (the
sample ids trained between consecutive checkpoints, stored atomically with the model) must name
every unique sample exactly once, and the final model must equal an uninterrupted run's."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from bench.common import synthetic_samples
from odl import names
from odl.kafka_util import ensure_topics, producer
from tests.conftest import make_config
from trainers.checkpoint import CheckpointStore
from trainers.model import CTRModel
from trainers.samples import sample_hash
from trainers.streaming import checkpoint_dir

pytestmark = pytest.mark.slow

N_SAMPLES = 60_000
REPEATS = 400        # at-least-once repeats the feature job may emit after its own restart
KILLS = 5


def config(tmp_path: Path, redis_port: int, broker_port: int, name: str):
    return make_config(
        tmp_path / name,
        kafka={"bootstrap_servers": f"127.0.0.1:{broker_port}", "partitions": 1,
               "topic_prefix": f"{name}{os.getpid()}."},
        redis={"port": redis_port},
        feature_job={"attribution_window_s": 5, "idle_timeout_s": 1, "watermark_delay_ms": 0},
        trainer={"batch_size": 256, "max_batch_wait_ms": 5000, "frozen_baseline_after": None,
                 "align_labels": True,   # the held-samples path through checkpoints
                 "tables": {"user": {"dim": 8, "capacity": 2500, "ttl_s": 240},
                            "item": {"dim": 8, "admit_min_count": 2}},
                 "hidden_units": [32, 16],
                 "checkpoint": {"incremental_interval_s": 0.5, "full_interval_s": 4,
                                "keep_full": 1000, "ledger": True}})


def start(cfg, cfg_path: Path, log: Path) -> subprocess.Popen:
    cfg_path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    return subprocess.Popen([sys.executable, "-m", "odl.cli", "run", "trainer", "--no-ray",
                             "--config", str(cfg_path)],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


def newest_seq(cfg) -> int:
    return CheckpointStore(checkpoint_dir(cfg, "trainer-0")).latest_seq()


def newest_trained(cfg) -> int:
    cks = CheckpointStore(checkpoint_dir(cfg, "trainer-0")).list()
    return cks[-1].meta["trained"] if cks else 0


def run_to_end(cfg, tmp_path: Path, name: str, kills: int) -> list[int]:
    """Run the trainer over the topic, SIGKILLing it ``kills`` times; returns the samples its
    newest checkpoint held at each kill."""
    log = tmp_path / f"{name}.log"
    proc = start(cfg, tmp_path / f"{name}.yaml", log)
    rng = random.Random(5)
    at_kill: list[int] = []
    try:
        for k in range(kills):
            # once this process has written a checkpoint of its own (it is up and training, however
            # slow the machine), kill it at a random moment of its work
            seen = newest_seq(cfg)
            deadline = time.monotonic() + 120
            while newest_seq(cfg) == seen and time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()[-3000:]
                time.sleep(0.1)
            time.sleep(rng.uniform(0.1, 1.0))
            at_kill.append(newest_trained(cfg))
            assert proc.poll() is None, log.read_text()[-3000:]
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            proc = start(cfg, tmp_path / f"{name}.yaml", log)
        deadline = time.monotonic() + 240
        while newest_trained(cfg) < N_SAMPLES and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        assert newest_trained(cfg) == N_SAMPLES, log.read_text()[-3000:]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    return at_kill


def lineage(cfg):
    """Checkpoints from the newest back through each one's predecessor."""
    store = CheckpointStore(checkpoint_dir(cfg, "trainer-0"))
    by_seq = {c.seq: c for c in store.list()}
    out, seq = [], max(by_seq)
    while seq is not None:
        out.append(by_seq[seq])
        seq = by_seq[seq].meta.get("previous")
    return store, out[::-1]


def final_model(cfg) -> CTRModel:
    model = CTRModel(cfg.trainer)
    for k, (_, groups) in enumerate(CheckpointStore(checkpoint_dir(cfg, "trainer-0")).restore_chain()):
        model.load({g: a for g, a in groups.items() if g != "stream"}, increment=k > 0)
    return model


def test_kill_9_trains_every_sample_exactly_once_and_matches_an_uninterrupted_run(
        tmp_path, redis_port, broker_port):
    data = synthetic_samples(N_SAMPLES)
    rng = np.random.default_rng(2)
    stream = list(data)
    for k in sorted(rng.choice(N_SAMPLES - 1, REPEATS, replace=False).tolist(), reverse=True):
        stream.insert(k + 1, data[k])                 # a repeat right after the original
    runs = {}
    for name, kills in (("calm", 0), ("killed", KILLS)):
        cfg = config(tmp_path, redis_port, broker_port, name)
        ensure_topics(cfg)
        prod = producer(cfg)
        topic = names.topic(names.SAMPLES, cfg.kafka.topic_prefix)
        for d in stream:
            prod.send(topic, key=d["sample_id"].encode(), value=json.dumps(d).encode())
        prod.flush()
        prod.close()
        at_kill = run_to_end(cfg, tmp_path, name, kills)
        runs[name] = cfg

    # exactly once: the ledgers along the checkpoint lineage name each sample once
    store, chain = lineage(runs["killed"])
    restored_from = (tmp_path / "killed.log").read_text().count("restored ckpt-")
    assert restored_from >= KILLS, "every restart should restore from a checkpoint"
    assert sum(0 < t < N_SAMPLES for t in at_kill) >= 3, f"kills mostly mid-stream: {at_kill}"
    ledger = np.concatenate([store.read(c)["stream"]["ledger"] for c in chain])
    expected = np.array(sorted(sample_hash(d["sample_id"]) for d in data), np.int64)
    assert len(ledger) == N_SAMPLES, (len(ledger), N_SAMPLES)
    np.testing.assert_array_equal(np.sort(ledger), expected)

    # the same model as without kills (same batches in the same order)
    calm, killed = final_model(runs["calm"]), final_model(runs["killed"])
    # full batches, plus the partial ones the stream's quiet end releases
    assert calm.step == killed.step and N_SAMPLES // 256 + 1 <= calm.step <= N_SAMPLES // 256 + 3
    for k, v in calm.dense.items():
        np.testing.assert_allclose(killed.dense[k].numpy(), v.numpy(), atol=2e-4, rtol=1e-3, err_msg=k)
    for name, t in calm.tables.items():
        ids = np.array(sorted(t._rows), np.int64)
        assert sorted(killed.tables[name]._rows) == ids.tolist()
        np.testing.assert_allclose(killed.tables[name].vectors(killed.tables[name].rows_of(ids)),
                                   t.vectors(t.rows_of(ids)), atol=2e-4, rtol=1e-3)
