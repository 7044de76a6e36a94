"""End to end: `odl up` on real servers (tansu, Redis, Ray, Flink mini-cluster), at least 30 s of
traffic, then every stage must have moved: samples trained, a version exported, its embeddings
in Redis, serving answering with it.  Also: nothing listens beyond loopback, pause/resume works,
and nothing outlives `odl down`."""
import os
import re
import signal
import time

import pytest
import redis
import requests
import yaml
from click.testing import CliRunner

from bench.common import free_port_block
from odl.embedding_store import EmbeddingReader
from odl.cli import main as cli
from odl.config import load_config
from odl.control import ControlPlane
from odl.launcher import LocalStack
from odl.runtime import metrics_port
from tests.conftest import free_port
from tests.integration.processes import listeners_of, stack_pids

pytestmark = pytest.mark.slow
MIN_RUN_S = 30


@pytest.fixture
def stack_config(tmp_path):
    raw = {
        "paths": {"state_dir": str(tmp_path / "var")},
        "kafka": {"bootstrap_servers": f"127.0.0.1:{free_port()}"},
        "redis": {"port": free_port()},
        "ray": {"port": free_port()},
        "serving": {"ports": [free_port(), free_port()]},
        "metrics": {"base_port": free_port_block(12)},
        "exporter": {"version_interval_s": 8, "min_samples_per_version": 100},
        "source": {"rate": 300, "malformed_rate": 0.01},
        "feature_job": {"attribution_window_s": 5, "checkpoint_interval_s": 5},
        "trainer": {"checkpoint": {"incremental_interval_s": 3}},
    }
    path = tmp_path / "odl.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_stack_end_to_end(stack_config):
    cfg = load_config(stack_config, env={})
    stack = LocalStack(cfg, str(stack_config))
    runner = CliRunner()
    started = time.monotonic()
    stack.up(print)
    pgids = {s.pid for s in stack._read_state().values()}
    try:
        cp = ControlPlane(cfg)
        r = redis.Redis(host=cfg.redis.host, port=cfg.redis.port)
        answered: dict[int, str] = {}
        deadline = started + 300
        while time.monotonic() < deadline:
            time.sleep(3)
            assert not stack.crashed(), stack.crashed()
            for port in cfg.serving.ports:
                try:
                    resp = requests.post(f"http://127.0.0.1:{port}/v1/models/ctr:predict", timeout=5,
                                         json={"instances": [{"user_id": 1, "item_id": 2}]})
                except requests.RequestException:
                    continue
                if resp.status_code == 200:
                    answered[port] = resp.json()["model_version"]
            beats = {hb.instance: hb for hb in cp.heartbeats()}
            trained = beats.get("trainer") and beats["trainer"].metrics.get("samples_trained", 0)
            if (trained and len(answered) == len(cfg.serving.ports) and cp.versions()
                    and time.monotonic() - started >= MIN_RUN_S):
                break
        else:
            pytest.fail(f"pipeline did not flow: answered={answered} beats={beats}")

        versions = {m["version"]: m for m in cp.versions()}
        assert set(answered.values()) <= set(versions)
        m = versions[max(versions, key=int)]
        assert m["trainer_step"] > 0 and m["kafka_offsets"] and m["parent"] in (None, *versions)
        assert (cfg.paths.model_store / "ctr" / m["version"] / "saved_model.pb").is_file()
        reader = EmbeddingReader(r)
        assert reader.count("user") > 0 and reader.count("item") > 0
        assert beats["feature-job"].metrics["dlq"] > 0          # the malformed events were routed
        assert beats["feature-job"].metrics["samples"] > 0
        # freshness, continuously: the event time behind the served embeddings is recent
        _wait(lambda: (_beat(cp, "serving-0").metrics.get("data_age_s") or 1e9) < 60, 30)
        # the online feature store follows the job: users' last clicks are in Redis
        _wait(lambda: _beat(cp, "feature-store").metrics.get("written", 0) > 0, 30)
        assert any(True for _ in r.scan_iter(match="{odl:fs:user}:*:clicks", count=1000))

        # bad input at the edge: a 4xx with a JSON error, never a 5xx
        resp = requests.post(f"http://127.0.0.1:{cfg.serving.ports[0]}/v1/models/ctr:predict",
                             data=b"{not json", timeout=5)
        assert resp.status_code == 400 and "error" in resp.json()

        # operator CLI: status table, pause keeps the position, resume continues
        out = runner.invoke(cli, ["status", "--config", str(stack_config)])
        assert out.exit_code == 0, out.output
        for name in ("source", "feature-job", "feature-store", "trainer", "exporter", "serving-0",
                     "serving-1"):
            assert name in out.output
        assert runner.invoke(cli, ["pause", "trainer", "--config", str(stack_config)]).exit_code == 0
        _wait(lambda: _beat(cp, "trainer").state == "paused", 20)
        frozen = _beat(cp, "trainer").metrics["samples_trained"]
        time.sleep(2 * cfg.control.heartbeat_interval_s + 1)
        assert _beat(cp, "trainer").metrics["samples_trained"] == frozen
        assert runner.invoke(cli, ["resume", "trainer", "--config", str(stack_config)]).exit_code == 0
        _wait(lambda: _beat(cp, "trainer").metrics["samples_trained"] > frozen, 30)

        # kill -9 the trainer actor's process: Ray restarts it, it restores its newest checkpoint
        # and trains on from there
        old = _beat(cp, "trainer")
        os.kill(old.pid, signal.SIGKILL)
        def restored():  # during the restart the heartbeat may have expired: keep waiting
            hb = _beat(cp, "trainer", missing_ok=True)
            return (hb is not None and hb.pid != old.pid and hb.state == "running"
                    and hb.metrics.get("restored_from") is not None and hb.metrics["step"] > 0)
        _wait(restored, 90)
        back = _beat(cp, "trainer").metrics
        _wait(lambda: _beat(cp, "trainer").metrics["samples_trained"] > back["samples_trained"], 60)
        # one SIGKILL is one restart to the supervisor, however many "restarting" errors it took
        _wait(lambda: cp.restarts().get("trainer") == 1, 10)
        assert "restarts=1" in runner.invoke(cli, ["status", "--config", str(stack_config)]).output
        # the driver serves the actor's metrics and the probes (trainers/metrics_relay.py)
        relay = f"http://127.0.0.1:{metrics_port(cfg, 'trainer')}"
        _wait(lambda: "odl_trainer_restarts_total 1" in requests.get(f"{relay}/metrics", timeout=5).text, 15)
        scraped = requests.get(f"{relay}/metrics", timeout=5).text
        assert "odl_trainer_up 1" in scraped and "odl_trainer_step " in scraped
        assert requests.get(f"{relay}/healthz", timeout=5).status_code == 200
        assert requests.get(f"{relay}/ready", timeout=5).status_code == 200
        assert stack.crashed() == []

        # every socket of every stack process is on loopback
        pids = set(stack_pids(pgids))
        listeners = listeners_of(pids)
        assert listeners
        bad = [a for a in listeners if not re.match(r"^(127\.|\[::1\]|\[::ffff:127\.)", a)]
        assert not bad, f"listening beyond loopback: {bad}"
    finally:
        stack.down(print)
    left = stack_pids(pgids)
    assert not left, f"processes outlived odl down: {left}"
    assert not listeners_of(pgids)


def _beat(cp, instance, missing_ok=False):
    hb = next((hb for hb in cp.heartbeats() if hb.instance == instance), None)
    if hb is None and not missing_ok:
        raise AssertionError(f"no live heartbeat from {instance}")
    return hb


def _wait(pred, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.5)
    raise AssertionError("condition not reached in time")
