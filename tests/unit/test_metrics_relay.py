"""The trainer driver's metrics endpoint and probes (``trainers.metrics_relay``), over HTTP."""
from __future__ import annotations

import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from trainers.metrics_relay import MetricsRelay, merge

ACTOR_TEXT = ('# HELP odl_trainer_step training steps taken\n# TYPE odl_trainer_step gauge\n'
              'odl_trainer_step 42.0\n')


def _get(relay: MetricsRelay, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{relay.port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _wait(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_relays_the_actor_and_reports_liveness_and_readiness():
    state = {"fail": True}

    def fetch():
        if state["fail"]:
            raise RuntimeError("The actor is restarting")
        return ACTOR_TEXT

    relay = MetricsRelay("127.0.0.1", 0, fetch, stale_s=0.3, poll_s=0.05)
    try:
        # starting: alive (restoring a checkpoint is not a failure), not ready
        assert _get(relay, "/healthz")[0] == 200
        code, body = _get(relay, "/ready")
        assert code == 503 and "starting" in body
        assert "odl_trainer_up 0" in _get(relay, "/metrics")[1]

        state["fail"] = False
        _wait(lambda: relay.answered_at is not None)
        assert _get(relay, "/ready")[0] == 200
        code, body = _get(relay, "/metrics")
        fams = {f.name: f for f in text_string_to_metric_families(body)}
        assert fams["odl_trainer_step"].samples[0].value == 42.0
        assert fams["odl_trainer_up"].samples[0].value == 1.0

        # the actor stops answering: liveness fails once the answer is stale, naming why
        state["fail"] = True
        time.sleep(0.5)
        code, body = _get(relay, "/healthz")
        assert code == 503 and "has not answered" in body and "restarting" in body
        assert _get(relay, "/ready")[0] == 503

        state["fail"] = False
        _wait(lambda: _get(relay, "/healthz")[0] == 200)
        relay.restarts = 3
        assert "odl_trainer_restarts_total 3" in _get(relay, "/metrics")[1]
        relay.ended = "restart budget exhausted"
        code, body = _get(relay, "/healthz")
        assert code == 503 and "budget" in body
        assert _get(relay, "/nope")[0] == 404
    finally:
        relay.close()


def test_a_group_exposes_each_family_once_with_members_labelled_apart():
    empty = "# HELP odl_trainer_step training steps taken\n# TYPE odl_trainer_step gauge\n"
    text = merge([(empty, {}), (ACTOR_TEXT, {"member": "1"}), (ACTOR_TEXT, {"member": "0"})])
    assert text.count("# TYPE odl_trainer_step gauge") == 1
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    assert sorted(s.labels["member"] for s in samples) == ["0", "1"]
