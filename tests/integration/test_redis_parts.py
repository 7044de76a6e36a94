"""Embedding publishing, the control plane and the serving API against a real redis-server."""
import asyncio
import time

import numpy as np
import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer

from exporters import savedmodel
from odl.embedding_store import EmbeddingReader, HotEmbeddings
from odl.model_store import Manifest, ModelStore
from odl.control import ControlPlane, Heartbeat
from serving.app import ServingApp
from serving.model import ModelHolder
from trainers.model import CTRModel
from tests.unit.helpers import small_cfg


def test_embeddings_round_trip_in_chunks(redis_cfg):
    r = redis.Redis(port=redis_cfg.redis.port)
    hot = HotEmbeddings(r, 16)
    ids = np.arange(12_000, dtype=np.int64) * 7
    vecs = np.random.default_rng(0).normal(size=(len(ids), 16)).astype(np.float32)
    hot.begin()
    hot.push("user", ids, vecs)
    reader = EmbeddingReader(r, pointer_ttl_s=0)
    assert not reader.fetch("user", [7], 16)[1].any()      # invisible until activated
    gen = hot.activate()
    hot.push("user", ids[:10], vecs[:10] + 1)               # a delta, in place
    got, found = reader.fetch("user", ids.tolist() + [5], 16)
    np.testing.assert_array_equal(got[:10], vecs[:10] + 1)
    np.testing.assert_array_equal(got[10:-1], vecs[10:])
    assert found[:-1].all() and not found[-1] and not got[-1].any()  # a miss is the zero default
    assert reader.count("user") == len(ids) and reader.pointer().generation == gen
    assert not reader.fetch("user", [7], 32)[1].any()       # another dim: misses, not garbage
    hot.delete("user", [0, 7])
    assert reader.fetch("user", [0, 7, 14], 16)[1].tolist() == [False, False, True]


def test_control_plane_heartbeats_pause_and_pin(redis_cfg):
    cp = ControlPlane(redis_cfg)
    beat = Heartbeat("trainer", "trainer", time.time(), "running", 1, "h", None, {"auc": 0.7})
    assert cp.heartbeat(beat) == 0                          # no restart recorded yet
    [hb] = cp.heartbeats()
    assert hb.metrics == {"auc": 0.7} and hb.age_s < 5
    cp.record_restart("trainer")
    assert cp.heartbeat(beat) == 1 and cp.restarts() == {"trainer": 1}
    cp.pause("trainer")
    assert cp.is_paused("trainer") and cp.paused() == {"trainer"}
    cp.resume("trainer")
    assert not cp.is_paused("trainer")
    cp.register_version({"version": "1"})
    cp.register_version({"version": "2"})
    assert cp.served_version() == "2"
    cp.pin_version("1")
    assert cp.served_version() == "1"
    cp.pin_version(None)
    assert cp.served_version() == "2"


@pytest.fixture
def served_model(redis_cfg):
    model = CTRModel(small_cfg(64, 16, (8,)))
    store = ModelStore(redis_cfg.paths.model_store, "ctr")
    m = Manifest(version="1", parent=None, trainer_step=0, kafka_offsets={}, metrics={},
                 embedding_generation=0, embedding_dim=16)
    store.publish(1, lambda p: savedmodel.save(model.dense_weights(), 16, p), m)
    cp = ControlPlane(redis_cfg)
    cp.register_version(m.to_dict())
    holder = ModelHolder(store, cp)
    assert holder.refresh() and holder.current.version == "1"
    r = redis.Redis(port=redis_cfg.redis.port)
    hot = HotEmbeddings(r, 16)
    hot.begin()
    hot.push("user", np.array([1]), np.ones((1, 16), np.float32))
    hot.activate()
    return ServingApp(redis_cfg, holder, r, "serving-test")


def _call(app: ServingApp, method: str, path: str, body=None, raw: bytes | None = None):
    async def go():
        async with TestClient(TestServer(app.build())) as client:
            kw = {"data": raw} if raw is not None else ({"json": body} if body is not None else {})
            resp = await client.request(method, path, **kw)
            return resp.status, await resp.json()
    return asyncio.run(go())


def test_predict_answers_with_version(served_model):
    status, out = _call(served_model, "POST", "/v1/models/ctr:predict",
                        {"instances": [{"user_id": 1, "item_id": 2, "position": 1}, {"user_id": 9, "item_id": 9}]})
    assert status == 200 and out["model_version"] == "1"
    assert len(out["predictions"]) == 2 and all(0 < p < 1 for p in out["predictions"])
    assert out["predictions"][0] != out["predictions"][1]  # the Redis row changed user 1's score
    status, out = _call(served_model, "POST", "/v1/models/ctr/versions/1:predict",
                        {"instances": [{"user_id": 1, "item_id": 2}]})
    assert status == 200
    status, out = _call(served_model, "GET", "/v1/models/ctr")
    assert out["model_version_status"][0]["state"] == "AVAILABLE"


@pytest.mark.parametrize("method,path,body,raw,code", [
    ("POST", "/v1/models/ctr:predict", None, b"{nope", 400),
    ("POST", "/v1/models/ctr:predict", {"instances": [{"user_id": -1, "item_id": 1}]}, None, 400),
    ("POST", "/v1/models/ctr:predict", {"instances": "x"}, None, 400),
    ("POST", "/v1/models/other:predict", {"instances": [{"user_id": 1, "item_id": 1}]}, None, 404),
    ("POST", "/v1/models/ctr/versions/7:predict", {"instances": [{"user_id": 1, "item_id": 1}]}, None, 404),
    ("GET", "/v1/models/ctr:predict", None, None, 405),
    ("GET", "/nowhere", None, None, 404),
    ("POST", "/v1/models/ctr:predict", None, b"x" * (2 << 20), 413),
])
def test_bad_requests_get_json_4xx(served_model, method, path, body, raw, code):
    status, out = _call(served_model, method, path, body, raw)
    assert status == code and "error" in out


def test_feature_store_keeps_the_newest_version_and_reads_back(redis_cfg):
    from odl.redis_conn import redis_client
    from odl.feature_store import FeatureStore, FeatureUpdate
    from odl.features import Tile

    store = FeatureStore(redis_client(redis_cfg, decode=False), ttl_s=120)
    b = 1_800_000_000_000 // 60_000 * 60_000
    new = FeatureUpdate("user", 7, "t5m", b, Tile(b, 3, 1).encode())
    old = FeatureUpdate("user", 7, "t5m", b - 60_000, Tile(b - 60_000, 9, 9).encode())
    assert store.write([new, old]) == 1          # in one batch: newest wins
    assert store.write([old]) == 0               # a replay of an older update changes nothing
    store.write([FeatureUpdate("item", 5, "t1h", b, Tile(b, 40, 2).encode()),
                 FeatureUpdate("user", 7, "clicks", b - 10, f"{b - 10}:5:3")])
    [f] = store.features(7, [5], b + 1000)
    assert (f.user.imps_5m, f.user.clicks_5m, f.user.last_items[0], f.item.imps_1h) == (3, 1, 5, 40)
    [unknown] = store.features(8, [6], b + 1000)  # unseen entities: no history, prior CTR
    assert unknown.user.imps_1h == 0 and unknown.item.ctr_1h > 0
    assert 0 < store.r.ttl("{odl:fs:user}:7:t5m") <= 120
