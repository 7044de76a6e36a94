"""The components under the container configuration, scraped by a real Prometheus.

The stack runs with docker-compose's ``x-odl-env`` (with .env interpolated) as its environment:
the containers' settings (Redis password, partitions, source, ``ray.loopback: false``, the feature
job's parallelism) as they are, only the service names moved to where this machine runs the
servers.  ``metrics.host`` and ``serving.host`` are 0.0.0.0 in the containers; here they are
127.0.0.2, loopback but not the default, so that a process that ignores the setting and binds
127.0.0.1 is found out (the trainer's actor once did).  Prometheus reads
deploy/prometheus/prometheus.yml with each ``odl`` target moved to that address (its Flink and
Ray jobs are scraped by the standalone-Flink and two-node-Ray tests), and every target must be up,
with the work visible in what it scraped.  The probes Kubernetes and compose use must pass too.
"""
from __future__ import annotations

import re
import time

import pytest
import requests
import yaml

from bench.common import free_port_block
from odl.config import Config, load_config
from odl.launcher import LocalStack
from odl.probes import HEALTH_PATH, READY_PATH
from tests.conftest import free_port
from tests.deploy_files import odl_env, prometheus_targets
from tests.integration.prometheus import Prometheus
from tests.integration.processes import listeners_of, stack_pids

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
BIND = "127.0.0.2"


def container_env(tmp_path) -> dict[str, str]:
    env = odl_env()
    ray_port = free_port()
    env.update({
        "ODL__KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
        "ODL__REDIS__HOST": "127.0.0.1", "ODL__REDIS__PORT": str(free_port()),
        "ODL__RAY__ADDRESS": f"127.0.0.1:{ray_port}", "ODL__RAY__PORT": str(ray_port),
        "ODL__METRICS__HOST": BIND, "ODL__SERVING__HOST": BIND,
        "ODL__SERVING__PORTS": f"[{free_port()}, {free_port()}]",
        "ODL__METRICS__BASE_PORT": str(free_port_block(12)),
        "ODL__PATHS__STATE_DIR": str(tmp_path / "var"),
    })
    assert set(env) == set(odl_env()) | {"ODL__RAY__PORT", "ODL__METRICS__BASE_PORT"}
    return env


def where_odl_runs(cfg: Config) -> dict[str, str]:
    """Each ``odl`` target of the Prometheus config at this stack's port for it: the config's
    ports are ``metrics.base_port``'s default plus the component's offset."""
    default = Config().metrics.base_port
    return {t: f"{BIND}:{cfg.metrics.base_port + int(t.rsplit(':', 1)[1]) - default}"
            for t, _ in prometheus_targets()["odl"]}


def test_the_stack_under_the_container_configuration_is_scraped_whole(tmp_path, monkeypatch):
    env = container_env(tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    # only the pace differs from the containers': a version within seconds
    path = tmp_path / "odl.yaml"
    path.write_text(yaml.safe_dump({"exporter": {"version_interval_s": 8, "min_samples_per_version": 100},
                                    "feature_job": {"attribution_window_s": 5}}))
    cfg = load_config(path, env=env)
    assert cfg.ray.loopback is False and cfg.redis.password
    stack = LocalStack(cfg, str(path))
    stack.up(print)
    pgids = {s.pid for s in stack._read_state().values()}
    try:
        where = where_odl_runs(cfg)
        with Prometheus(tmp_path / "prometheus", {"odl": where}) as prom:
            targets = prom.wait_all_up(240)
            assert {t["labels"]["component"] for t in targets} == {
                "source", "trainer", "exporter", "feature-job", "feature-store", "serving"}
            # the work, as Prometheus scraped it, moved through every stage
            for expr, least in (("sum(odl_source_events_total)", 1),
                                ("sum(odl_feature_job_samples_total)", 1),
                                ("sum(odl_feature_store_updates_total)", 1), ("odl_trainer_up", 1),
                                ("sum(odl_trainer_samples_total)", 1),
                                ('sum(odl_exporter_versions_total{outcome="published"})', 1),
                                # both replicas serve a version (each loads it in its own time)
                                ('count(odl_serving_model_version{component="serving"} > 0)', 2)):
                _wait(lambda: (prom.value(expr) or 0) >= least, 180, expr)
            # click -> served: the event time behind the served embeddings, continuously
            _wait(lambda: (prom.value("max(odl_serving_data_age_seconds)") or 1e9) < 120, 60,
                  "serving's data age")
        # the probes the deployment files use: liveness and readiness of the work itself
        for target in where.values():
            _wait(lambda: requests.get(f"http://{target}{READY_PATH}", timeout=5).status_code == 200,
                  60, f"{target}{READY_PATH}")
            assert requests.get(f"http://{target}{HEALTH_PATH}", timeout=5).status_code == 200
        for port in cfg.serving.ports:
            resp = requests.post(f"http://{BIND}:{port}/v1/models/ctr:predict", timeout=5,
                                 json={"instances": [{"user_id": 1, "item_id": 2}]})
            assert resp.status_code == 200, resp.text
        assert stack.crashed() == []
        listeners = listeners_of(set(stack_pids(pgids)))
        assert not [a for a in listeners if not re.match(r"^(127\.|\[::1\]|\[::ffff:127\.)", a)]
        # what honours the setting listens on it; nothing else of ODL's on 127.0.0.2
        assert {f"{BIND}:{p}" for p in cfg.serving.ports} | set(where.values()) <= set(listeners)
    finally:
        stack.down(print)


def _wait(pred, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise AssertionError(f"not reached in {timeout_s} s: {what}")
