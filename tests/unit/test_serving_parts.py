"""Serving's parts without servers: request validation and the OpenAPI document, the batcher,
the Redis circuit breaker."""
import asyncio
import threading
import time

import pytest
import redis
from openapi_spec_validator import validate as validate_openapi
from pydantic import ValidationError

from serving.api import explain, make_api
from serving.batching import Batcher, BatchPolicy
from serving.guard import RedisGuard, Unavailable

API = make_api(max_instances=10, max_candidates=5)


def test_openapi_document_is_valid_and_names_every_route():
    validate_openapi(API.openapi)
    paths = set(API.openapi["paths"])
    assert {"/v1/models/{name}:predict", "/v1/models/{name}/versions/{version}:predict",
            "/v1/models/{name}:recommend", "/v1/models/{name}", "/v1/models/{name}/metadata"} <= paths
    schemas = API.openapi["components"]["schemas"]
    assert schemas["RecommendRequest"]["properties"]["candidates"]["maxItems"] == 5
    assert schemas["PredictRequest"]["additionalProperties"] is False


@pytest.mark.parametrize("body", [
    b'{"instances": [{"user_id": 1, "item_id": 2}]}',
    b'{"instances": [{"user_id": 1, "item_id": 2, "position": 3, "hour": 23}], "signature_name": "serving_default"}',
    b'{"inputs": {"user_id": [1, 2], "item_id": [3, 4], "hour": [0, 5]}}',
])
def test_good_predict_bodies(body):
    req = API.predict.model_validate_json(body)
    users, items, pos, hours = req.columns()
    assert len(users) == len(items) == len(pos) == len(hours) >= 1


@pytest.mark.parametrize("body,where", [
    (b"[]", "body"),
    (b"{nope", "body"),
    (b'{"instances": []}', "instances"),
    (b'{}', "body"),                                                        # neither format
    (b'{"instances": [{"user_id": 1, "item_id": 2}], "inputs": {"user_id": [1], "item_id": [2]}}', "body"),
    (b'{"instances": [{"user_id": 1}]}', "instances.0.item_id"),
    (b'{"instances": [{"user_id": 1, "item_id": "2"}]}', "instances.0.item_id"),   # strict: no coercion
    (b'{"instances": [{"user_id": true, "item_id": 2}]}', "instances.0.user_id"),
    (b'{"instances": [{"user_id": 1.5, "item_id": 2}]}', "instances.0.user_id"),
    (b'{"instances": [{"user_id": Infinity, "item_id": 2}]}', "instances.0.user_id"),
    (b'{"instances": [{"user_id": NaN, "item_id": 2}]}', "instances.0.user_id"),
    (b'{"instances": [{"user_id": 1e400, "item_id": 2}]}', "instances.0.user_id"),
    (b'{"instances": [{"user_id": -1, "item_id": 2}]}', "instances.0.user_id"),
    (b'{"instances": [{"user_id": 1, "item_id": 2, "hour": 24}]}', "instances.0.hour"),
    (b'{"instances": [{"user_id": 1, "item_id": 2, "colour": 3}]}', "instances.0.colour"),
    (b'{"instances": [{"user_id": 1, "item_id": 2}], "extra": 1}', "extra"),
    (b'{"instances": [' + b",".join([b'{"user_id": 1, "item_id": 2}'] * 11) + b']}', "instances"),
    (b'{"inputs": {"user_id": [1, 2], "item_id": [3]}}', "inputs"),          # ragged columns
    (b'{"instances": [{"user_id": 9007199254740992, "item_id": 2}]}', "instances.0.user_id"),
    (b'{"signature_name": "other", "instances": [{"user_id": 1, "item_id": 2}]}', "signature_name"),
])
def test_bad_predict_bodies_name_the_field(body, where):
    with pytest.raises(ValidationError) as info:
        API.predict.model_validate_json(body)
    message, details = explain(info.value)
    assert message.startswith(where), message
    assert details and all(set(d) == {"loc", "msg", "type"} for d in details)


def test_recommend_body_limits_and_defaults():
    req = API.recommend.model_validate_json(b'{"user_id": 3, "candidates": [1, 2, 3]}')
    assert req.context.hour is None and req.context.position == 0 and req.top_k is None
    for bad in (b'{"user_id": 3, "candidates": []}', b'{"user_id": 3, "candidates": [1,2,3,4,5,6]}',
                b'{"user_id": 3, "candidates": [1], "top_k": 0}',
                b'{"user_id": 3, "candidates": [1], "context": {"weather": 1}}'):
        with pytest.raises(ValidationError):
            API.recommend.model_validate_json(bad)


# --- batcher ---------------------------------------------------------------------------------
def _drive(policy: BatchPolicy, requests: list[tuple[str, int]], run_s: float = 0.005):
    """Submit ``requests`` (key, rows) at once; returns (results, batches seen by run)."""
    seen: list[tuple[str, list[int]]] = []
    lock = threading.Lock()

    def run(key, payloads):
        with lock:
            seen.append((key, payloads))
        time.sleep(run_s)
        return [(key, p) for p in payloads]

    async def go():
        b = Batcher(run, policy)
        await b.start()
        try:
            return await asyncio.gather(*(b.submit(k, n, i) for i, (k, n) in enumerate(requests)))
        finally:
            await b.stop()
    return asyncio.run(go()), seen


def test_batcher_coalesces_concurrent_requests_and_answers_each():
    reqs = [("m", 1)] * 40
    results, seen = _drive(BatchPolicy(max_rows=16, max_wait_s=0.01, workers=2), reqs)
    assert results == [("m", i) for i in range(40)]            # each gets its own answer, in order
    sizes = [len(p) for _, p in seen]
    assert sum(sizes) == 40 and max(sizes) <= 16 and len(seen) <= 6


def test_batches_never_mix_keys_or_exceed_max_rows():
    reqs = [("a", 3), ("b", 2), ("a", 3), ("a", 3), ("b", 2), ("a", 7)]
    results, seen = _drive(BatchPolicy(max_rows=8, max_wait_s=0.01, workers=1), reqs)
    assert [r[0] for r in results] == [k for k, _ in reqs]
    rows = dict(enumerate(n for _, n in reqs))
    for key, payloads in seen:
        assert all(reqs[i][0] == key for i in payloads)
        assert sum(rows[i] for i in payloads) <= 8 or len(payloads) == 1


def test_unbatched_policy_runs_one_request_per_call():
    _, seen = _drive(BatchPolicy(enabled=False, workers=2), [("m", 1)] * 10)
    assert len(seen) == 10 and all(len(p) == 1 for _, p in seen)


def test_a_failing_batch_fails_its_requests_only():
    def run(key, payloads):
        if key == "bad":
            raise ValueError("boom")
        return payloads

    async def go():
        b = Batcher(run, BatchPolicy(max_wait_s=0.005))
        await b.start()
        try:
            return await asyncio.gather(b.submit("bad", 1, 1), b.submit("ok", 1, 2), return_exceptions=True)
        finally:
            await b.stop()
    bad, ok = asyncio.run(go())
    assert isinstance(bad, ValueError) and ok == 2


# --- degraded mode ---------------------------------------------------------------------------
def test_guard_opens_fails_fast_and_recovers_by_probe():
    changes = []
    guard = RedisGuard(retry_s=0.2, on_change=changes.append)
    state = {"up": False, "calls": 0}

    def call():
        state["calls"] += 1
        if not state["up"]:
            raise redis.ConnectionError("refused")
        return "ok"

    with pytest.raises(Unavailable):
        guard.call(call)
    assert guard.degraded and changes == [True]
    for _ in range(50):                                   # open: no call reaches Redis
        with pytest.raises(Unavailable):
            guard.call(call)
    assert state["calls"] == 1
    state["up"] = True
    time.sleep(0.25)                                      # after retry_s one probe goes through
    assert guard.call(call) == "ok" and not guard.degraded and changes == [True, False]
    with pytest.raises(KeyError):                         # other errors are not outages
        guard.call(lambda: {}["x"])
    assert not guard.degraded


# --- the app without Redis -------------------------------------------------------------------
class _Model:
    version, embedding_dim = "3", 4

    def __init__(self, fail: bool = False):
        self.fail = fail

    def predict(self, user, item, position, hour, features):
        assert features.shape == (len(user), 7)
        if self.fail:
            raise RuntimeError("kernel exploded")
        return (user.sum(axis=1) + 0.5).astype("float32")


class _Holder:
    def __init__(self, model):
        self.current, self.load_errors = model, 0


def _post(tmp_path, model, body) -> tuple[int, dict, dict]:
    from aiohttp.test_utils import TestClient, TestServer

    from serving.app import ServingApp
    from tests.conftest import free_port, make_config

    cfg = make_config(tmp_path, serving={"redis_retry_s": 5})
    dead = redis.Redis(port=free_port(), socket_timeout=0.2, socket_connect_timeout=0.2)   # nobody listens
    app = ServingApp(cfg, _Holder(model), dead, "serving-test")

    async def go():
        async with TestClient(TestServer(app.build())) as client:
            resp = await client.post("/v1/models/ctr:predict", json=body)
            return resp.status, dict(resp.headers), await resp.json()
    return asyncio.run(go())


def test_redis_down_answers_with_defaults_and_says_degraded(tmp_path):
    status, headers, out = _post(tmp_path, _Model(), {"instances": [{"user_id": 1, "item_id": 2}]})
    assert status == 200 and out["predictions"] == [0.5]          # zero vectors: the default
    assert headers["X-ODL-Degraded"] == "redis-unavailable" and headers["X-ODL-Model-Version"] == "3"


def test_a_server_fault_is_a_json_500_not_a_crash(tmp_path):
    status, _, out = _post(tmp_path, _Model(fail=True), {"instances": [{"user_id": 1, "item_id": 2}]})
    assert status == 500 and out["error"] == "internal error: RuntimeError"


# --- the embedding cache over a fake Redis reader ------------------------------------------
class _Reader:
    """EmbeddingReader's two calls over a dict; ``down`` makes them fail like a dead Redis."""

    def __init__(self, rows: dict[int, float], generation: int = 1):
        from odl.embedding_store import Pointer
        self.rows, self.down, self.reads = rows, False, 0
        self.p = Pointer(generation, 2, "float32", activated_at=1.0)

    def pointer(self):
        if self.down:
            raise redis.ConnectionError("down")
        return self.p

    def fetch(self, table, ids, dim, pointer=None):
        if self.down:
            raise redis.ConnectionError("down")
        self.reads += len(ids)
        import numpy as np
        found = np.array([i in self.rows for i in ids])
        return np.array([[self.rows.get(i, 0.0)] * dim for i in ids], np.float32), found


def test_cache_accounts_for_every_lookup_follows_changes_and_survives_redis_down():
    import numpy as np

    from odl.embedding_store import Pointer
    from serving.embedding_cache import EmbeddingCache

    reader = _Reader({1: 1.0, 2: 2.0})
    cache = EmbeddingCache(reader, RedisGuard(retry_s=60), max_rows=3, ttl_s=60)
    first = cache.lookup("item", [1, 2, 9, 1], 2)
    assert (first.fetched, first.hits, first.defaults) == (4, 0, 1) and reader.reads == 3
    np.testing.assert_array_equal(first.vectors[:, 0], [1, 2, 0, 1])
    again = cache.lookup("item", [1, 9], 2)                       # 9 is cached as "no row"
    assert (again.hits, again.fetched, again.defaults, reader.reads) == (2, 0, 1, 3)
    reader.rows[1] = 5.0                                          # the exporter pushes id 1 ...
    assert cache._apply({b"g": b"1", b"t": b"item", b"op": b"put",
                         b"ids": np.asarray([1], "<i8").tobytes()}) == 1   # ... and announces it
    assert cache.lookup("item", [1], 2).vectors[0, 0] == 5.0
    cache._apply({b"g": b"1", b"t": b"item", b"op": b"del", b"ids": np.asarray([2], "<i8").tobytes()})
    assert cache.lookup("item", [2], 2).defaults == 1
    # announcements carry the event time of the newest sample behind them: the data age
    assert cache.data_age_s() is None
    cache._apply({b"g": b"1", b"t": b"item", b"op": b"put", b"ids": np.asarray([7], "<i8").tobytes(),
                  b"c": b"1000000"})
    cache._apply({b"g": b"0", b"t": b"item", b"op": b"put", b"ids": np.asarray([7], "<i8").tobytes(),
                  b"c": b"9000000"})                              # another generation: not ours
    assert cache.data_clock_ms == 1_000_000 and cache.data_age_s(now_ms=1_004_500) == 4.5
    assert cache._apply({b"g": b"1", b"t": b"item"}) == 0         # malformed entry: ignored
    reader.rows[5] = 7.0
    cache.lookup("item", [3, 4, 5], 2)
    assert cache.rows("item") == 3                                # bounded (LRU)
    reader.down = True
    down = cache.lookup("item", [5, 77], 2)                       # 5 cached, 77 neither
    assert down.degraded and (down.hits, down.unavailable, down.defaults) == (1, 1, 1)
    assert down.vectors[0, 0] == 7.0 and down.vectors[1, 0] == 0.0
    reader.down = False
    reader.p = Pointer(2, 2, "float32", activated_at=2.0)         # a new generation: cache dropped
    cache.guard._next_probe = 0                                   # (skip the breaker's wait)
    assert cache.lookup("item", [5], 2).fetched == 1 and cache.resets == 1


def test_request_features_reuse_an_items_part_within_its_ttl_and_minute():
    import numpy as np

    from odl.features import ItemState, Tile, UserState, features_as_of
    from serving.features import RequestFeatures

    class Store:   # FeatureStore's two reads over dicts
        def __init__(self):
            self.users_state, self.items_state, self.item_reads = {}, {}, 0

        def users(self, ids):
            return [self.users_state.get(i, UserState()) for i in ids]

        def items(self, ids):
            self.item_reads += len(ids)
            return [self.items_state.get(i, ItemState()) for i in ids]

    t = 1_800_000_000_000 + 5_000                       # 5 s into a minute
    store = Store()
    store.users_state[1] = UserState(Tile(t - 5_000, 9, 3), Tile(t - 5_000, 20, 4))
    store.items_state[7] = ItemState(Tile(t - 5_000, 50, 5))
    rf = RequestFeatures(store, RedisGuard(), item_ttl_s=60)
    got, degraded = rf.pairs([1, 1], [7, 8], t)
    want = [features_as_of(store.users_state[1], store.items_state[7], t).dense(),
            features_as_of(store.users_state[1], ItemState(), t).dense()]
    assert not degraded and np.allclose(got, want) and store.item_reads == 2
    store.items_state[7] = ItemState(Tile(t - 5_000, 51, 5))      # changed in Redis ...
    rf.pairs([1], [7], t + 1_000)
    assert store.item_reads == 2 and rf.item_hits == 1              # ... served from the cache
    rf.pairs([1], [7], t + 60_000)                                  # a new minute: read again
    assert store.item_reads == 3
    assert np.isclose(RequestFeatures(store, RedisGuard(), item_ttl_s=0).pairs([1], [7], t)[0][0, 4], np.log1p(51))
