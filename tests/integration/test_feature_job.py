"""The PyFlink feature job on a Flink mini-cluster against the real broker and Redis: crafted
streams with known answers (label join, DLQ reasons, features), a property test of point-in-time
correctness, train/serve consistency through the online store, and a kill -9 restart."""
import json
import os
import subprocess
import sys
import time
import random
import uuid
from collections import Counter
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer

from odl import features as F
from odl.control import ControlPlane
from odl.feature_store import FeatureStore
from odl.features import Features, ItemFeatures, UserFeatures
from odl.kafka_util import ensure_topics
from odl.schemas import Click, Impression
from tests.conftest import make_config

pytestmark = pytest.mark.slow
WINDOW_S = 3


def _job_env(tmp_path, broker_port: int, redis_port: int, prefix: str, **extra: str) -> dict[str, str]:
    """ODL__ overrides that point `odl run feature-job` at the test's servers and topics."""
    return {"ODL__KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{broker_port}",
            "ODL__KAFKA__TOPIC_PREFIX": prefix, "ODL__REDIS__PORT": str(redis_port),
            "ODL__PATHS__STATE_DIR": str(tmp_path / "var"), "ODL__METRICS__ENABLED": "false",
            "ODL__FEATURE_JOB__ATTRIBUTION_WINDOW_S": str(WINDOW_S),
            # every partition gets later events, so no watermark waits for idleness; a short
            # idle timeout would let a busy machine mark a partition with unread backlog idle
            # and send its events late (FLINK-40234, docs/features.md#idleness-and-catch-up)
            "ODL__FEATURE_JOB__WATERMARK_DELAY_MS": "1000", "ODL__FEATURE_JOB__IDLE_TIMEOUT_S": "10",
            # the label join alone (provisional samples: the delayed-feedback test below)
            "ODL__TRAINER__DELAYED_FEEDBACK": "false", **extra}


def _env(cfg_overrides: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ODL__")}
    env.update(cfg_overrides)
    return env


class Stream:
    """Events to produce, each with its own record timestamp (= event time), sent in the order
    of ``at`` (default: the event time), so that only the intended ones arrive out of order."""

    def __init__(self):
        self._recs: list[tuple[int, int, bytes, bytes, int]] = []

    def add(self, ev, key: int | None = None, at: int | None = None) -> None:
        self._put(str(key if key is not None else ev.user_id).encode(), ev.to_json(), ev.ts_ms, at)

    def raw(self, payload: bytes, ts: int) -> None:
        self._put(b"x", payload, ts, None)

    def _put(self, key: bytes, value: bytes, ts: int, at: int | None) -> None:
        self._recs.append((ts if at is None else at, len(self._recs), key, value, ts))

    @property
    def records(self) -> list[tuple[bytes, bytes, int]]:
        return [(k, v, ts) for _, _, k, v, ts in sorted(self._recs)]

    def send(self, bootstrap: str, topic: str) -> None:
        """Produce every record, in order, each with its own record timestamp."""
        prod = KafkaProducer(bootstrap_servers=bootstrap)
        for key, value, ts in self.records:
            prod.send(topic, key=key, value=value, timestamp_ms=ts)
        prod.flush()
        prod.close()


def _crafted(s: Stream, t0: int) -> tuple[dict[str, int], dict[str, int]]:
    """Known answers: expected labels by sample_id and DLQ counts by reason."""
    s.add(Impression("A", 1, 1, 0, t0, {"category": 4}))
    s.add(Impression("A", 1, 2, 1, t0, {"category": 5}))
    s.add(Impression("A", 1, 2, 1, t0, {"category": 5}))          # duplicate event
    s.add(Click("A", 1, 1, t0 + 1000, {"category": 4}))
    s.add(Click("A", 1, 1, t0 + 1000, {"category": 4}))           # duplicate event
    s.add(Click("A", 1, 3, t0 + 1200))                            # item never shown
    s.add(Impression("B", 2, 5, 0, t0))
    s.add(Click("B", 2, 5, t0 + (WINDOW_S + 5) * 1000))           # after the window
    s.add(Click("D", 3, 7, t0 + 500), at=t0 - 1)                  # arrives before its impression
    s.add(Impression("D", 3, 7, 0, t0))
    s.add(Impression("E", 3, 8, 0, t0 + 2000))
    s.add(Click("E", 3, 8, t0 + 1500), at=t0 + 2001)              # event time before impression
    s.add(Impression("G", 1, 2, 0, t0 + 60_000))                  # sees A's events in its tiles
    labels = {"A:1": 1, "A:2": 0, "B:5": 0, "D:7": 1, "E:8": 0, "G:2": 0}
    dlq = {"duplicate_event": 2, "click_unattributed": 2, "click_before_impression": 1}
    bad = {b"{broken": "invalid_json",
           json.dumps({"type": "impression", "schema_version": 9}).encode(): "bad_schema_version",
           json.dumps({"type": "view", "schema_version": 1}).encode(): "bad_type",
           json.dumps({"type": "click", "schema_version": 1, "request_id": "C", "user_id": "u",
                       "item_id": 1, "ts_ms": t0}).encode(): "bad_user_id",
           json.dumps({"type": "click", "schema_version": 1, "request_id": "C", "user_id": 1,
                       "item_id": 1, "ts_ms": t0, "event_id": 7}).encode(): "bad_event_id"}
    for payload, reason in bad.items():
        s.raw(payload, t0 + 2000)
        dlq[reason] = 1
    return labels, dlq


def _random_world(s: Stream, start: int, end: int, id_offset: int, seed: int, extra_after: int | None):
    """A random stream over 12 users and 20 items; with ``extra_after`` the same stream plus more
    events after that time (the property test compares the two)."""
    rng = random.Random(seed)
    t = start
    n = 0
    while t < end:
        user = rng.randrange(12)
        for pos, item in enumerate(rng.sample(range(1, 21), 3)):
            rid = f"W{n}"
            s.add(Impression(rid, user + id_offset, item + id_offset, pos, t, {"category": item % 4}))
            if rng.random() < 0.3:
                s.add(Click(rid, user + id_offset, item + id_offset, t + rng.randrange(100, 2500),
                            {"category": item % 4}))
        if extra_after is not None and t > extra_after:  # only in the copy: later events
            s.add(Impression(f"X{n}", user + id_offset, 1 + id_offset, 0, t, {"category": 1}))
            s.add(Click(f"X{n}", user + id_offset, 1 + id_offset, t + 300, {"category": 1}))
        n += 1
        t += rng.randrange(200, 3000)


def _start(cmd: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "odl.cli", "run", cmd], env=_env(env),
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)


def test_feature_job_labels_features_dlq_and_online_store(tmp_path, broker_port, redis_port):
    """One job run, four checks: crafted join cases and every DLQ reason with known answers;
    features as of impression time; no feature depends on a later event; the online store gives
    serving the features the samples were built with."""
    import redis as redis_lib
    redis_lib.Redis(port=redis_port).flushall()
    prefix = f"t{uuid.uuid4().hex[:8]}."
    overrides = _job_env(tmp_path, broker_port, redis_port, prefix)
    cfg = make_config(tmp_path, kafka={"bootstrap_servers": f"127.0.0.1:{broker_port}", "topic_prefix": prefix},
                      redis={"port": redis_port})
    ensure_topics(cfg)
    slide = F.TILE_SLIDE_S * 1000
    base = (int(time.time() * 1000) - 15 * 60_000) // slide * slide   # a minute boundary
    s = Stream()
    labels, want_dlq = _crafted(s, base + 20_000)
    T = base + 120_000
    _random_world(s, base + 1000, base + 230_000, 1000, seed=3, extra_after=None)
    _random_world(s, base + 1000, base + 230_000, 5000, seed=3, extra_after=T)
    probe_t = base + 245_000                           # after the boundary at +240 s
    probes = {u: f"P{u}" for u in range(1000, 1012)}
    for u, rid in probes.items():
        s.add(Impression(rid, u, 1001, 0, probe_t, {"category": 1}))
    # a tile's last millisecond: the tile in force is the one ending at +180 s, as it is at +180 s
    edges = {u: (f"E{u}", f"F{u}") for u in probes}
    for u, (at_start, at_last_ms) in edges.items():
        s.add(Impression(at_start, u, 1002, 0, base + 180_000, {"category": 2}))
        s.add(Impression(at_last_ms, u, 1002, 0, base + 239_999, {"category": 2}))
    for u in range(16):  # moves every partition's watermark past the probes, not to +300 s
        s.add(Impression(f"Z{u}", 900 + u, 999, 0, probe_t + 6000), key=u)
    prod = KafkaProducer(bootstrap_servers=cfg.kafka.bootstrap_servers)
    for key, value, ts in s.records:
        prod.send(prefix + "events", key=key, value=value, timestamp_ms=ts)
    prod.flush()
    want_samples = set(labels) | {f"{rid}:1001" for rid in probes.values()} \
        | {f"{rid}:1002" for pair in edges.values() for rid in pair}
    job = _start("feature-job", overrides, tmp_path / "job.log")
    store_proc = _start("feature-store", overrides, tmp_path / "store.log")
    try:
        samples, dlq = _collect(cfg, prefix, want_samples=want_samples,
                                want_dlq=sum(want_dlq.values()), job=job)
        # an event behind the watermark now: late, to the DLQ, not into any feature
        prod.send(prefix + "events", key=b"1", value=Impression("L", 1, 1, 0, base + 30_000).to_json(),
                  timestamp_ms=base + 30_000)
        prod.flush()
        want_dlq["late_event"] = 1
        metrics = _wait_metrics(cfg, want_dlq)
        assert metrics.get("dlq_reasons") == want_dlq
        assert metrics["positives"] >= 2 and metrics["negatives"] >= 4
        # job metrics from Flink's REST API: the join's watermark trails the newest event
        assert 50 < metrics["watermark_lag_s"] < 1200, metrics
        store = FeatureStore(redis_lib.Redis(port=redis_port))
        by_id = {x["sample_id"]: x for x in samples}
        _wait_store(store, probes, by_id, probe_t)
    finally:
        for p in (job, store_proc):
            p.terminate()
            p.wait(60)

    # -- the label join: every crafted case, each sample exactly once
    counts = Counter(x["sample_id"] for x in samples)
    assert {k: by_id[k]["label"] for k in labels} == labels
    assert all(counts[k] == 1 for k in labels), counts
    assert not [x for x in samples if x["sample_id"] in ("A:3", "L:1")]
    assert all(x["label_ts_ms"] > x["impression_ts_ms"] for x in samples)
    got_dlq = Counter(d["reason"] for d in dlq)
    assert dict(got_dlq) == {k: v for k, v in want_dlq.items() if k != "late_event"}  # read before it
    assert all(d["payload"] and d["source_offset"] >= 0 for d in dlq)

    # -- features as of impression time (G comes a minute after A, in the next tile)
    a1 = Features.from_json(by_id["A:1"]["features"])
    assert a1 == Features(UserFeatures(), ItemFeatures())          # nothing before it
    g = Features.from_json(by_id["G:2"]["features"])
    # user activity counts every valid click, attributed or not (A:3 was never shown)
    assert (g.user.imps_5m, g.user.clicks_5m, g.user.imps_1h, g.user.clicks_1h) == (2, 2, 2, 2)
    assert g.user.last_items == (3, 1, 0, 0, 0) and g.user.last_categories == (0, 4, 0, 0, 0)
    assert (g.item.imps_1h, g.item.clicks_1h) == (1, 0)
    assert g.item.ctr_1h == pytest.approx(F.smoothed_ctr(1, 0))
    assert by_id["A:2"]["category"] == 5

    # -- an impression on a tile's last millisecond reads the tile before, not nothing
    def counts(rid):
        f = Features.from_json(by_id[f"{rid}:1002"]["features"])
        return f.user.imps_5m, f.user.clicks_5m, f.user.imps_1h, f.user.clicks_1h, f.item
    assert all(counts(a) == counts(b) for a, b in edges.values()), \
        {u: (counts(a), counts(b)) for u, (a, b) in edges.items()}
    assert sum(counts(a)[2] for a, _ in edges.values()) > 0

    # -- property: no feature depends on a later event.  The copy (ids + 5000) has the same
    # events plus more after T; every sample before T must have identical features.
    def key(x, off):
        return x["request_id"], x["user_id"] - off, x["item_id"] - off

    a = {key(x, 1000): x for x in samples if 1000 <= x["user_id"] < 1012 and x["request_id"][0] == "W"}
    b = {key(x, 5000): x for x in samples if 5000 <= x["user_id"] < 5012 and x["request_id"][0] == "W"}
    early = [k for k, x in a.items() if x["impression_ts_ms"] < T]
    assert len(early) > 50 and set(early) <= set(b)
    unshift = lambda f, off: {**f, "user": {**f["user"], "last_items": [i - off if i else 0 for i in f["user"]["last_items"]]}}
    assert all(unshift(a[k]["features"], 1000) == unshift(b[k]["features"], 5000) for k in early)
    later = [k for k, x in b.items() if x["impression_ts_ms"] > T + 60_000]
    assert any(unshift(a[k]["features"], 1000) != unshift(b[k]["features"], 5000) for k in later), \
        "the extra events never showed up in the copy's features: the property test is vacuous"
    assert any(x["features"]["user"]["clicks_1h"] > 0 for x in a.values())


def _wait_metrics(cfg, want_dlq: dict, timeout_s: float = 30) -> dict:
    cp = ControlPlane(cfg)
    deadline = time.monotonic() + timeout_s
    metrics: dict = {}
    while time.monotonic() < deadline:
        beats = [hb for hb in cp.heartbeats() if hb.component == "feature-job"]
        metrics = beats[0].metrics if beats else {}
        if metrics.get("dlq_reasons") == want_dlq and "watermark_lag_s" in metrics:
            break
        time.sleep(0.5)
    return metrics


def _wait_store(store: FeatureStore, probes: dict[int, str], by_id: dict, probe_t: int,
                timeout_s: float = 30) -> None:
    """Train/serve consistency: for every probe user, the features serving computes from Redis
    at the probe's time equal the features the job put into the probe's sample."""
    deadline = time.monotonic() + timeout_s
    while True:
        want = {u: Features.from_json(by_id[f"{rid}:1001"]["features"]) for u, rid in probes.items()}
        got = {u: store.features(u, [1001], probe_t)[0] for u in probes}
        if got == want or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert got == want
    assert any(f.user.clicks_1h for f in want.values()) and want[1000].item.imps_1h > 0


def _collect(cfg, prefix, want_samples, want_dlq, job, timeout_s=150):
    c = KafkaConsumer(prefix + "samples", prefix + "events.dlq", bootstrap_servers=cfg.kafka.bootstrap_servers,
                      auto_offset_reset="earliest", enable_auto_commit=False, group_id=None)
    samples, dlq = [], []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for tp, recs in c.poll(timeout_ms=1000).items():
                for r in recs:
                    (samples if tp.topic.endswith("samples") else dlq).append(json.loads(r.value))
            have = {s["sample_id"] for s in samples}
            if want_samples <= have and len(dlq) >= want_dlq:
                time.sleep(3)  # let any wrong extra record arrive too
                for tp, recs in c.poll(timeout_ms=1000).items():
                    for r in recs:
                        (samples if tp.topic.endswith("samples") else dlq).append(json.loads(r.value))
                return samples, dlq
            assert job.poll() is None, "feature job exited early"
    finally:
        c.close()
    raise AssertionError(f"timed out: samples={samples} dlq={dlq}")


class EveryThirdClicked:
    """A stream with known labels for the restart tests: request k shows items 1 and 2 to user
    k % 16 at ``t0 + 200 k``; item 1 is clicked 0.5 s later in every third request."""

    def __init__(self, bootstrap: str, prefix: str, t0: int):
        self.prod = KafkaProducer(bootstrap_servers=bootstrap)
        self.topic, self.t0 = prefix + "events", t0
        self.expected: set[str] = set()
        self.n = 0

    def produce(self, first: int, n: int) -> None:
        for k in range(first, first + n):
            ts = self.t0 + 200 * k
            rid = f"R{k}"
            for item in (1, 2):
                self.prod.send(self.topic, key=str(k % 16).encode(),
                               value=Impression(rid, k % 16, item, item, ts).to_json(), timestamp_ms=ts)
                self.expected.add(f"{rid}:{item}")
            if k % 3 == 0:
                self.prod.send(self.topic, key=str(k % 16).encode(),
                               value=Click(rid, k % 16, 1, ts + 500).to_json(), timestamp_ms=ts + 500)
        self.n = max(self.n, first + n)
        self.prod.flush()

    def close_windows(self) -> None:
        """Later traffic on every partition closes the last windows (these need no sample)."""
        ts = self.t0 + 200 * self.n + 60_000
        for u in range(16):
            self.prod.send(self.topic, key=str(u).encode(), value=Impression(f"Z{u}", u, 9, 0, ts).to_json(),
                           timestamp_ms=ts)
        self.prod.flush()

    def check(self, samples: list[dict]) -> None:
        """Every impression has its sample; a replay after a restart may repeat one, never
        change it; each carries its one right label."""
        by_id: dict[str, set[str]] = {}
        for s in samples:
            by_id.setdefault(s["sample_id"], set()).add(json.dumps(s, sort_keys=True))
        assert self.expected <= set(by_id)
        assert all(len(v) == 1 for k, v in by_id.items() if k in self.expected)
        labels = {k: json.loads(next(iter(v)))["label"] for k, v in by_id.items() if k in self.expected}
        assert all(labels[f"R{k}:1"] == (1 if k % 3 == 0 else 0) for k in range(self.n))
        assert all(labels[f"R{k}:2"] == 0 for k in range(self.n))

    def close(self) -> None:
        self.prod.close()


def test_killed_job_restarts_from_checkpoint_without_losing_samples(tmp_path, broker_port, redis_port):
    """kill -9 mid-stream, restart: every impression still yields a sample; duplicates are exact."""
    import os
    import signal

    from pipeline.feature_job import latest_checkpoint

    prefix = f"k{uuid.uuid4().hex[:8]}."
    overrides = _job_env(tmp_path, broker_port, redis_port, prefix,
                         ODL__FEATURE_JOB__CHECKPOINT_INTERVAL_S="2")
    cfg = make_config(tmp_path, kafka={"bootstrap_servers": f"127.0.0.1:{broker_port}", "topic_prefix": prefix})
    ensure_topics(cfg)
    stream = EveryThirdClicked(cfg.kafka.bootstrap_servers, prefix, int(time.time() * 1000) - 600_000)

    def start():
        return subprocess.Popen([sys.executable, "-m", "odl.cli", "run", "feature-job"], env=_env(overrides),
                                stdout=open(tmp_path / "job.log", "ab"), stderr=subprocess.STDOUT,
                                start_new_session=True)

    stream.produce(0, 300)
    job = start()
    ckpt_root = tmp_path / "var" / "checkpoints" / "flink"
    deadline = time.monotonic() + 90
    while latest_checkpoint(ckpt_root) is None:
        assert time.monotonic() < deadline and job.poll() is None, "no checkpoint was taken"
        time.sleep(0.5)
    time.sleep(1)
    os.killpg(job.pid, signal.SIGKILL)  # mid-stream, no chance to clean up
    job.wait(30)
    stream.produce(300, 300)
    stream.close_windows()
    job = start()
    try:
        samples, _ = _collect(cfg, prefix, want_samples=stream.expected, want_dlq=0, job=job, timeout_s=180)
    finally:
        job.terminate()
        job.wait(60)
        stream.close()
    assert "restoring feature job state" in (tmp_path / "job.log").read_text()
    stream.check(samples)


def test_delayed_feedback_emits_each_impression_at_once_as_a_provisional_negative(
        tmp_path, broker_port, redis_port):
    """trainer.delayed_feedback: every impression leaves twice -- at once as a provisional
    negative, later as its final sample -- with the same id and the same features."""
    prefix = f"t{uuid.uuid4().hex[:8]}."
    overrides = _job_env(tmp_path, broker_port, redis_port, prefix,
                         ODL__TRAINER__DELAYED_FEEDBACK="true")
    cfg = make_config(tmp_path, kafka={"bootstrap_servers": f"127.0.0.1:{broker_port}",
                                       "topic_prefix": prefix}, redis={"port": redis_port})
    ensure_topics(cfg)
    base = int(time.time() * 1000) - 10 * 60_000
    s = Stream()
    labels, want_dlq = _crafted(s, base + 20_000)
    for u in range(16):  # move every partition's watermark past the crafted window
        s.add(Impression(f"Z{u}", 900 + u, 999, 0, base + 90_000), key=u)
    s.send(cfg.kafka.bootstrap_servers, prefix + "events")
    job = _start("feature-job", overrides, tmp_path / "job.log")
    try:
        samples, _ = _collect(cfg, prefix, want_samples=set(labels),
                              want_dlq=sum(want_dlq.values()), job=job)
    finally:
        job.terminate()
        job.wait(60)
    finals = {x["sample_id"]: x for x in samples if not x["provisional"]}
    prov = Counter(x["sample_id"] for x in samples if x["provisional"])
    assert {k: finals[k]["label"] for k in labels} == labels          # the label join unchanged
    assert all(prov[k] == 1 for k in labels), prov                     # one provisional each
    for x in samples:
        if x["provisional"] and x["sample_id"] in labels:
            assert x["label"] == 0 and x["label_ts_ms"] == x["impression_ts_ms"]
            assert x["features"] == finals[x["sample_id"]]["features"]
