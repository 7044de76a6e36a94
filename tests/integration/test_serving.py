"""Serving replicas (HTTP on loopback, in threads of this process) against a real redis-server,
a real model store and a real exporter fed by an in-process ``CTRModel``: the API and its
fuzzing, the recommendation endpoint, cache freshness, dense refreshes without reload, a
fleet-wide rollback through the CLI, and Redis killed and restarted under load."""
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest
import redis
import requests
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from exporters.exporter import Exporter, Schedule
from odl.embedding_store import EmbeddingReader
from odl.feature_store import FeatureStore, FeatureUpdate
from odl.features import DEFAULT_DENSE, Tile
from odl.cli import main as cli
from odl.config import dump_config
from odl.control import ControlPlane
from odl.redis_conn import redis_client
from odl.names import DEGRADED_HEADER, VERSION_HEADER
from serving.run import Replica
from tests.conftest import free_port, make_config, stop, wait_port
from tests.integration.helpers import DIM, LocalTrainer, Log
from tests.schema_strategy import from_schema
from tests.unit.helpers import small_cfg
from trainers.model import CTRModel

pytestmark = pytest.mark.slow
USERS, ITEMS = list(range(0, 280, 7)), list(range(0, 200, 5))


class Stack:
    """An exporter over an in-process trainer, and N replicas serving what it publishes."""

    def __init__(self, tmp_path, redis_port: int, replicas: int = 1, cluster: bool = False,
                 **serving):
        tc = small_cfg(4096, DIM, (8,))
        self.cfg = make_config(
            tmp_path, redis={"port": redis_port, "cluster": cluster}, trainer=tc.model_dump(),
            exporter={"min_samples_per_version": 0, "retire_generation_after_s": 0.01},
            control={"heartbeat_interval_s": 0.3},
            serving={"poll_interval_s": 0.2, "cache_ttl_s": 600, "redis_retry_s": 0.3, **serving})
        self.trainer = LocalTrainer(CTRModel(tc))
        self.trainer.train()
        self.cp = ControlPlane(self.cfg)
        r = redis_client(self.cfg, decode=False)
        r.flushall()
        self.ex = Exporter(self.cfg, self.trainer, self.cp, Log(), r=r)
        self.replicas = [Replica(self.cfg, free_port(), f"serving-{n}", registry=CollectorRegistry())
                         for n in range(replicas)]
        self._ticking = threading.Event()

    def __enter__(self) -> "Stack":
        for rep in self.replicas:
            rep.start_in_thread()
        return self

    def __exit__(self, *exc) -> None:
        self._ticking.set()
        for rep in self.replicas:
            rep.close()

    def wait_version(self, version: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while any(r.holder.current is None or r.holder.current.version != version for r in self.replicas):
            assert time.monotonic() < deadline, f"replicas did not load version {version}"
            time.sleep(0.05)

    def run_exporter(self) -> threading.Thread:
        """The exporter's loop (ticks, pause flag, Redis outages) in a thread until exit."""
        def loop():
            sched = Schedule(0.2, 1000, 1000)
            while not self._ticking.wait(0.2):
                try:
                    self.ex.tick(sched, self.cp.is_paused("exporter"))
                except redis.RedisError:
                    pass
        t = threading.Thread(target=loop, daemon=True)
        t.start()
        return t


def predict(url: str, users=USERS, items=ITEMS, **kw) -> requests.Response:
    body = {"instances": [{"user_id": u, "item_id": i, "position": 1, "hour": 9} for u, i in zip(users, items)]}
    return requests.post(f"{url}/v1/models/ctr:predict", json=body, timeout=10, **kw)


def scores(url: str) -> np.ndarray:
    resp = predict(url)
    assert resp.status_code == 200, resp.text
    return np.asarray(resp.json()["predictions"])


def seed_features(r: redis.Redis) -> None:
    """Online feature state for some users and items, as the feature-store writer leaves it:
    tiles that ended at the current minute (valid for the next 60-120 s)."""
    now = int(time.time() * 1000)
    end = now - now % 60_000
    ups = [FeatureUpdate("user", u, part, end, Tile(end, 5 + k, k % 3).encode())
           for k, u in enumerate(USERS[:20]) for part in ("t5m", "t1h")]
    ups += [FeatureUpdate("item", i, "t1h", end, Tile(end, 40 + k, k % 5).encode()) for k, i in enumerate(ITEMS[:20])]
    FeatureStore(r).write(ups)


def served_from_redis(stack: Stack, features: bool = True) -> np.ndarray:
    """What the served version computes on the rows and the feature state Redis holds now (no
    replica cache), through ``odl.feature_store`` -- the reader the feature job's tests use."""
    reader = EmbeddingReader(stack.ex.r, pointer_ttl_s=0)
    m = stack.replicas[0].holder.current
    n = len(USERS)
    now = int(time.time() * 1000)
    store = FeatureStore(stack.ex.r)
    feats = np.asarray([store.features(u, [i], now)[0].dense() if features else DEFAULT_DENSE
                        for u, i in zip(USERS, ITEMS)], np.float32)
    return m.predict(reader.fetch("user", USERS, DIM)[0], reader.fetch("item", ITEMS, DIM)[0],
                     np.ones(n, np.int64), np.full(n, 9, np.int64), feats)


@pytest.fixture
def stack(tmp_path, redis_port):
    with Stack(tmp_path, redis_port) as s:
        seed_features(s.ex.r)
        s.ex.publish_version()
        s.wait_version("1")
        yield s


def test_predict_formats_recommend_status_and_metadata(stack):
    url = stack.replicas[0].url
    resp = predict(url)
    assert resp.headers[VERSION_HEADER] == "1" and DEGRADED_HEADER not in resp.headers
    rows = np.asarray(resp.json()["predictions"])
    np.testing.assert_allclose(rows, served_from_redis(stack), atol=1e-6)
    # the request-time features came from the online feature store and changed the scores
    assert np.abs(rows - served_from_redis(stack, features=False)).max() > 1e-5
    cols = requests.post(f"{url}/v1/models/ctr/versions/1:predict", timeout=10, json={"inputs": {
        "user_id": USERS, "item_id": ITEMS, "position": [1] * len(USERS), "hour": [9] * len(USERS)}}).json()
    np.testing.assert_allclose(cols["outputs"], rows, atol=1e-6)
    # recommendation: one user, candidates scored by the rank-3 signature, best first
    user, cands = 14, ITEMS[:25]
    rec = requests.post(f"{url}/v1/models/ctr:recommend", timeout=10, json={
        "user_id": user, "candidates": cands, "context": {"hour": 9, "position": 1}, "top_k": 10}).json()
    assert rec["model_version"] == "1" and len(rec["items"]) == 10
    got = [x["score"] for x in rec["items"]]
    assert got == sorted(got, reverse=True)
    pairs = predict(url, [user] * len(cands), cands).json()["predictions"]
    want = sorted(zip(pairs, cands), reverse=True)[:10]
    np.testing.assert_allclose(got, [p for p, _ in want], atol=1e-5)
    status = requests.get(f"{url}/v1/models/ctr", timeout=5).json()
    assert status["model_version_status"][0]["version"] == "1"
    meta = requests.get(f"{url}/v1/models/ctr/metadata", timeout=5).json()
    assert set(meta["metadata"]["signature_def"]) == {"serving_default", "score_candidates"}
    metrics = requests.get(f"{url}/metrics", timeout=5).text
    for name in ("odl_serving_request_latency_seconds_bucket", "odl_serving_batch_rows_bucket",
                 "odl_serving_embedding_lookups_total", "odl_serving_model_age_seconds",
                 "odl_serving_model_version 1.0", "odl_serving_degraded 0.0"):
        assert name in metrics, name


def test_cache_follows_the_exporters_deltas(stack):
    url = stack.replicas[0].url
    before = scores(url)
    scores(url)                                    # second time from the local cache
    cache = stack.replicas[0].app.cache
    assert cache.rows("user") >= len(set(USERS)) and cache.rows("item") >= len(set(ITEMS))
    stack.trainer.train()
    assert stack.ex.push_deltas() > 0
    want = served_from_redis(stack)
    assert np.abs(want - before).max() > 1e-5
    deadline = time.monotonic() + 5               # far below cache_ttl_s (600 s): the stream did it
    while np.abs(scores(url) - want).max() > 1e-6:
        assert time.monotonic() < deadline, "cache did not follow the change stream"
        time.sleep(0.05)
    assert cache.applied > 0


def test_dense_refresh_changes_predictions_without_reload(stack):
    url, rep = stack.replicas[0].url, stack.replicas[0]
    loaded = rep.holder.current
    before = scores(url)
    stack.trainer.train()
    assert stack.ex.publish_dense() == 1
    deadline = time.monotonic() + 5
    while rep.holder.current.refresh_seq != 1:
        assert time.monotonic() < deadline, "refresh not applied"
        time.sleep(0.05)
    after = predict(url)
    assert rep.holder.current is loaded and after.headers[VERSION_HEADER] == "1"   # no reload
    assert np.abs(np.asarray(after.json()["predictions"]) - before).max() > 1e-6


def test_fuzzed_requests_never_get_a_5xx(stack):
    url = stack.replicas[0].url
    doc = requests.get(f"{url}/v1/openapi.json", timeout=5).json()
    defs = doc["components"]["schemas"]
    predict_bodies = from_schema(defs["PredictRequest"], defs)
    recommend_bodies = from_schema(defs["RecommendRequest"], defs)
    json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                               | st.text(max_size=8),
                               lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                               max_leaves=12)
    session = requests.Session()
    seen: dict[int, int] = {}

    def check(path: str, **kw) -> int:
        resp = session.post(f"{url}{path}", timeout=10, **kw)
        assert resp.status_code < 500, (path, kw, resp.text)
        assert isinstance(resp.json(), dict)
        seen[resp.status_code] = seen.get(resp.status_code, 0) + 1
        return resp.status_code

    fuzz = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))

    @fuzz
    @given(predict_bodies)
    def valid_predict(body):
        assert check("/v1/models/ctr:predict", json=body) in (200, 400)   # 400: ragged columns

    @fuzz
    @given(recommend_bodies)
    def valid_recommend(body):
        assert check("/v1/models/ctr:recommend", json=body) == 200

    @fuzz
    @given(st.sampled_from([":predict", ":recommend", "/versions/1:predict"]), json_values)
    def any_json(endpoint, body):
        check(f"/v1/models/ctr{endpoint}", json=body)

    @fuzz
    @given(st.binary(max_size=64), st.text(max_size=12))
    def any_bytes_any_name(raw, name):
        check(f"/v1/models/{requests.utils.quote(name, safe='')}:predict", data=raw)

    for prop in (valid_predict, valid_recommend, any_json, any_bytes_any_name):
        prop()
    assert seen.get(200) and seen.get(400) and seen.get(404)


@pytest.mark.parametrize("cluster", [False, pytest.param(True, marks=pytest.mark.distributed)],
                         ids=["redis", "redis-cluster"])
def test_cli_rollback_reaches_every_replica_with_the_recorded_predictions(tmp_path, request, cluster):
    port = request.getfixturevalue("redis_cluster" if cluster else "redis_port")
    with Stack(tmp_path, port, replicas=2, cluster=cluster) as s:
        s.ex.publish_version()
        s.wait_version("1")
        recorded = [scores(r.url) for r in s.replicas]
        np.testing.assert_allclose(recorded[0], recorded[1], atol=1e-7)
        for _ in range(3):
            s.trainer.train()
            s.ex.push_deltas()
        s.ex.publish_version()
        s.wait_version("2")
        assert np.abs(scores(s.replicas[0].url) - recorded[0]).max() > 1e-4
        s.run_exporter()
        cfg_file = tmp_path / "odl.yaml"
        cfg_file.write_text(dump_config(s.cfg))
        out = CliRunner().invoke(cli, ["rollback", "--config", str(cfg_file), "--timeout", "20"])
        assert out.exit_code == 0, out.output
        assert "every live replica serves version 1 with its own embeddings" in out.output
        assert s.cp.pinned_version() == "1" and s.cp.is_paused("exporter")
        assert s.cp.embeddings()["version"] == "1" and s.cp.embeddings()["ok"]
        # one identity: each replica reported (dense version, embedding generation) = the
        # version and the generation its snapshot was restored into, and says so per answer
        gen = s.cp.embeddings()["generation"]
        assert out.output.count(f"serves 1/g{gen} ") == 2, out.output
        for r in s.replicas:
            resp = requests.post(f"{r.url}/v1/models/ctr:predict", timeout=5,
                                 json={"instances": [{"user_id": 1, "item_id": 2}]})
            assert resp.headers["X-ODL-Model-Version"] == "1"
            assert resp.headers["X-ODL-Embedding-Generation"] == str(gen)
        deadline = time.monotonic() + 10              # replicas' row caches catch up
        while not all(np.abs(scores(r.url) - recorded[0]).max() < 1e-6 for r in s.replicas):
            assert time.monotonic() < deadline, "replicas do not answer version 1's predictions"
            time.sleep(0.1)
        out = CliRunner().invoke(cli, ["rollback", "--config", str(cfg_file), "--to", "9"])
        assert out.exit_code != 0 and "unknown version 9" in out.output
        out = CliRunner().invoke(cli, ["unpin", "--config", str(cfg_file), "--timeout", "20"])
        assert out.exit_code == 0 and "serves version 2" in out.output, out.output
        out = CliRunner().invoke(cli, ["promote", "1", "--config", str(cfg_file), "--timeout", "20"])
        assert out.exit_code == 0 and "every live replica serves version 1" in out.output, out.output
        assert s.cp.pinned_version() is None and s.cp.served_version() == "1"
        assert "with its own embeddings" in out.output         # promoted over the newer 2
        out = CliRunner().invoke(cli, ["pin", "2", "--config", str(cfg_file), "--timeout", "20"])
        assert out.exit_code == 0 and "every live replica serves version 2" in out.output, out.output
        assert s.cp.pinned_version() == "2"
        # a version whose snapshot is gone: the replicas switch, the CLI says the rows did not
        shutil.rmtree(s.ex.store.path(1) / "embeddings")
        out = CliRunner().invoke(cli, ["rollback", "--to", "1", "--config", str(cfg_file),
                                       "--timeout", "20"])
        assert out.exit_code == 1, out.output
        assert "Redis does not hold its embeddings: version 1 has no readable embedding snapshot" \
            in out.output


def _start_redis(port: int, directory) -> subprocess.Popen:
    """A redis-server of this test's own on ``port`` (no persistence), to kill and restart."""
    proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--dir", str(directory)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc, "redis-server")
    return proc


def test_redis_killed_and_restarted_under_load_fails_no_request(tmp_path):
    port = free_port()

    server = _start_redis(port, tmp_path)
    try:
        with Stack(tmp_path, port) as s:
            s.ex.publish_version()
            s.wait_version("1")
            s.run_exporter()
            url = s.replicas[0].url
            results: list[tuple[float, int, bool]] = []
            stop_load = threading.Event()

            def load():
                while not stop_load.is_set():
                    try:
                        resp = predict(url, USERS[:5], ITEMS[:5])
                        results.append((time.monotonic(), resp.status_code, DEGRADED_HEADER in resp.headers))
                    except requests.RequestException:
                        results.append((time.monotonic(), -1, False))

            threads = [threading.Thread(target=load, daemon=True) for _ in range(3)]
            for t in threads:
                t.start()
            time.sleep(1.0)
            stop(server)                                    # Redis gone: answers from cache + defaults
            time.sleep(2.0)
            server = _start_redis(port, tmp_path)       # back, empty: the exporter rewrites the set
            deadline = time.monotonic() + 15
            while not (results and results[-1][2] is False and not s.replicas[0].app.guard.degraded
                       and s.ex.hot.active is not None):
                assert time.monotonic() < deadline, "did not recover"
                time.sleep(0.2)
            time.sleep(1.0)
            stop_load.set()
            for t in threads:
                t.join(10)
            # the rewritten set is what is served again (the cache dropped the lost one)
            np.testing.assert_allclose(scores(url), served_from_redis(s), atol=1e-6)
        codes = [c for _, c, _ in results]
        assert len(codes) > 50 and set(codes) == {200}, {c: codes.count(c) for c in set(codes)}
        assert any(d for _, _, d in results), "no response said it was degraded"
        assert not results[-1][2]
    finally:
        stop(server)


def test_a_replica_started_while_redis_is_down_serves_the_stores_newest_version(tmp_path):
    port = free_port()

    server = _start_redis(port, tmp_path)
    late = None
    try:
        with Stack(tmp_path, port, replicas=0) as s:
            s.ex.publish_version()
            s.trainer.train()
            s.ex.publish_version()
            stop(server)                                    # the control plane is gone
            late = Replica(s.cfg, free_port(), "serving-late", registry=CollectorRegistry())
            late.start_in_thread()
            deadline = time.monotonic() + 20
            while late.holder.current is None:
                assert time.monotonic() < deadline, "no model loaded while Redis is down"
                time.sleep(0.1)
            assert late.holder.current.version == "2" and late.holder.fallback
            resp = predict(late.url, USERS[:5], ITEMS[:5])
            assert resp.status_code == 200 and DEGRADED_HEADER in resp.headers
            server = _start_redis(port, tmp_path)       # back (empty): a pin is honoured
            s.cp.pin_version("1")
            deadline = time.monotonic() + 20
            while late.holder.current.version != "1":
                assert time.monotonic() < deadline, "did not follow the control plane once back"
                time.sleep(0.1)
            assert not late.holder.fallback
    finally:
        if late is not None:
            late.close()
        stop(server)
