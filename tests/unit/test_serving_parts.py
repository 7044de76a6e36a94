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

    def predict(self, user, item, position, hour):
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
