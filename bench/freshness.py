"""`odl bench freshness`: on the running local stack (`odl up`), how long from a click to a
served score that reflects it.

Each probe takes two user ids nobody has used (``probe`` and ``control``) and one item.  Both
users have no embedding row yet, so every replica scores (probe, item) and (control, item)
identically -- in one request, hence with one set of weights, whatever dense refreshes happen
meanwhile.  Both are then shown the item (an impression each); only the probe clicks.  Every
replica is polled until it scores the probe above the control by ``MARGIN``: the click went
through the feature job's label join, the trainer, the exporter's delta push and the replicas'
cache follower.  The control's impression keeps the measure honest under delayed feedback, where
an impression alone is trained at once (as a provisional negative) and changes the user's row.
That time, per probe, is the freshness; p50/p95 over ``PROBES`` probes.
"""
from __future__ import annotations

import time

import numpy as np
import requests

from bench.registry import BenchResult
from odl import fleet, names
from odl.config import Config
from odl.control import ControlPlane
from odl.kafka_util import producer
from odl.schemas import Click, Impression

DESCRIPTION = "running stack: click -> changed served score on every replica, p50/p95 over 20 probes"
PROBES = 20
TIMEOUT_S = 30.0
POLL_S = 0.05
ITEM = 1
MARGIN = 0.01   # probability; a fresh row's random start moves a score by well under this


def _replica_urls(cfg: Config, cp: ControlPlane) -> list[str]:
    live = [hb for hb in fleet.replicas(cp)
            if hb.age_s < 3 * cfg.control.heartbeat_interval_s and hb.version and hb.metrics.get("port")]
    if not live:
        raise RuntimeError("no serving replica with a model is up: start the stack with `odl up` "
                           "and wait for a version (`odl status`)")
    return [f"http://{cfg.serving.host}:{hb.metrics['port']}" for hb in live]


def _gap(session: requests.Session, url: str, model: str, probe: int, control: int) -> float:
    """The probe's score minus the control's, in one request (one set of weights)."""
    body = {"instances": [{"user_id": probe, "item_id": ITEM, "position": 1, "hour": 12},
                          {"user_id": control, "item_id": ITEM, "position": 1, "hour": 12}]}
    resp = session.post(f"{url}/v1/models/{model}:predict", json=body, timeout=5)
    resp.raise_for_status()
    p = resp.json()["predictions"]
    return p[0] - p[1]


def run(cfg: Config) -> BenchResult:
    cp = ControlPlane(cfg)
    urls = _replica_urls(cfg, cp)
    topic = names.topic(names.EVENTS, cfg.kafka.topic_prefix)
    prod = producer(cfg, linger_ms=0)
    session = requests.Session()
    model = cfg.serving.model_name
    base = 7_000_000_000 + (int(time.time()) % 100_000) * 1000   # fresh ids, distinct per run
    lines, times, timeouts = [], [], 0
    try:
        for k in range(PROBES):
            probe, control = base + 2 * k, base + 2 * k + 1
            if any(abs(_gap(session, u, model, probe, control)) > 1e-9 for u in urls):
                raise RuntimeError(f"users {probe}/{control} are not fresh")
            now = int(time.time() * 1000)
            for user in (probe, control):
                prod.send(topic, key=str(user).encode(), timestamp_ms=now,
                          value=Impression(f"freshness-{user}", user, ITEM, 1, now, {"hour": 12}).to_json())
            prod.send(topic, key=str(probe).encode(), timestamp_ms=now + 50,
                      value=Click(f"freshness-{probe}", probe, ITEM, now + 50).to_json())
            prod.flush(10)
            t0 = time.monotonic()
            pending = set(urls)
            while pending and time.monotonic() - t0 < TIMEOUT_S:
                pending = {u for u in pending if _gap(session, u, model, probe, control) <= MARGIN}
                if pending:
                    time.sleep(POLL_S)
            dt = time.monotonic() - t0
            if pending:
                timeouts += 1
                lines.append(f"probe {k + 1:2d}: no change within {TIMEOUT_S:g} s on {sorted(pending)}")
            else:
                times.append(dt)
                lines.append(f"probe {k + 1:2d}: {dt:5.2f} s (all {len(urls)} replicas)")
    finally:
        prod.close(5)
    t = np.asarray(times) if times else np.asarray([np.inf])
    p50, p95 = float(np.percentile(t, 50)), float(np.percentile(t, 95))
    if timeouts:   # a probe that never arrived counts as the slowest
        p95 = float("inf") if timeouts > PROBES * 0.05 else p95
    if cfg.label_alignment:
        lines.append(f"note: trainer.align_labels holds every sample ~{cfg.label_hold_ms / 1000:g} s "
                     f"for its final label "
                     f"(trainers/align.py); freshness cannot beat that hold")
    if cfg.delayed_feedback:
        lines.append("note: trainer.delayed_feedback: impressions are trained at once as "
                     "provisional negatives, clicks as importance-weighted positives")
    lines.append(f"click -> served score changed on every replica: p50 {p50:.2f} s, p95 {p95:.2f} s, "
                 f"max {t.max():.2f} s over {len(times)} probes ({timeouts} timed out); goal p95 <= 5 s")
    return BenchResult({"p95": round(p95, 3), "p50": round(p50, 3), "max": round(float(t.max()), 3),
                        "probes": len(times), "timeouts": timeouts, "replicas": len(urls)}, lines)
