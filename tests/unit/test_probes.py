"""The probes judge the work loops, not the HTTP thread (odl.probes)."""
import socket

import pytest
import requests

from odl.probes import HEALTH_PATH, METRICS_PATH, READY_PATH, ProbeServer, WorkProbe
from odl.runtime import Component
from tests.conftest import make_config
from tests.unit.helpers import FakeClock


def test_a_stalled_loop_fails_liveness_and_a_waiting_one_only_readiness():
    clock = FakeClock(1000.0)
    work = WorkProbe(stall_s=60, clock=clock).expect("observe")
    # starting: alive (a job being submitted is not a failure), not ready
    assert work.health() is None and work.readiness() == "starting (observe)"
    work.beat("ticks")
    assert work.readiness() == "starting (observe)"
    work.beat("observe", waiting="job restarting")
    assert work.health() is None and work.readiness() == "observe: job restarting"
    work.beat("observe")
    assert work.readiness() is None
    # waiting for a dependency for long is still alive: a restart would not bring it back
    for _ in range(10):
        clock.t += 50
        work.beat("observe", waiting="job status unknown (connection refused)")
        work.beat("ticks")
    assert work.health() is None and "connection refused" in work.readiness()
    # one loop stops passing: liveness names it, and readiness fails with it
    clock.t += 30
    work.beat("observe")
    clock.t += 40
    assert work.health() == "work loop 'ticks' made no progress for 70 s (limit 60 s)"
    assert work.readiness() == work.health()
    work.beat("ticks")
    assert work.health() is None
    work.fail("job ended with status FAILED")
    assert work.health() == "job ended with status FAILED"


def test_the_server_answers_each_path_from_its_callable():
    state = {"health": None, "ready": "starting"}
    server = ProbeServer("127.0.0.1", 0, lambda: "odl_up 1\n", lambda: state["health"],
                         lambda: state["ready"])
    url = f"http://127.0.0.1:{server.port}"
    try:
        r = requests.get(url + METRICS_PATH, timeout=5)
        assert r.status_code == 200 and r.text == "odl_up 1\n"
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert requests.get(url + HEALTH_PATH, timeout=5).status_code == 200
        r = requests.get(url + READY_PATH, timeout=5)
        assert r.status_code == 503 and r.text == "starting\n"
        state.update(health="work loop 'export' made no progress for 130 s", ready=None)
        r = requests.get(url + HEALTH_PATH, timeout=5)
        assert r.status_code == 503 and "'export'" in r.text
        assert requests.get(url + READY_PATH + "?verbose=1", timeout=5).status_code == 200
        assert requests.get(url + "/nope", timeout=5).status_code == 404
    finally:
        server.close()


def test_a_taken_probe_port_stops_the_component_with_what_to_change(tmp_path):
    cfg = make_config(tmp_path, metrics={"enabled": True})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=f"127.0.0.1:{port}.*metrics.base_port"):
            Component(cfg, "feature-store", metrics_port=port)
