"""A spec's request body and online-store contract, without servers (the whole path runs in
tests/integration/test_spec_stack.py)."""
import asyncio
import json

import numpy as np
import pytest
import redis

from odl.feature_store import FeatureUpdate, FeatureUpdateError
from odl.spec import SPECS_DIR, load_spec
from odl.spec.realtime import count_parts, count_values, store_parts, tile_in_force
from odl.features import Tile
from serving.spec_scoring import SpecRequestError, SpecRequests

ADLOG = load_spec(SPECS_DIR / "adlog.yaml")
ROW = {"ip": 1, "app": 2, "device": 3, "os": 4, "channel": 5}


def test_requests_are_checked_by_the_specs_own_rules():
    req = SpecRequests(ADLOG, max_instances=4)
    assert req.parse(json.dumps({"instances": [ROW]}).encode()) == [ROW]
    with pytest.raises(SpecRequestError) as exc:
        req.parse(json.dumps({"instances": [{**ROW, "app": -1}, {"ip": 1}]}).encode())
    assert str(exc.value) == "instances[0].app: app_out_of_range"
    assert {"loc": "instances[1].device", "msg": "required"} in exc.value.details
    for body in (b"{", b"[]", json.dumps({"instances": [ROW] * 5}).encode(),
                 json.dumps({"instances": [{**ROW, "x": 1}]}).encode()):
        with pytest.raises(SpecRequestError):
            req.parse(body)


def test_the_request_schema_carries_the_field_limits():
    movielens = load_spec(SPECS_DIR / "movielens.yaml")
    row = SpecRequests(movielens, 8).schema()["properties"]["instances"]["items"]
    assert row["properties"]["genres"] == {"type": "array", "items": {"type": "string"}, "maxItems": 20}
    assert row["properties"]["user_id"]["minimum"] == 0 and row["additionalProperties"] is False
    assert row["required"] == ["movie_id", "user_id"]


def test_online_store_accepts_the_running_specs_kinds_only():
    parts = store_parts(ADLOG)
    assert parts["count.by_ip"] == ("10m", "1h")
    u = FeatureUpdate.from_dict({"kind": "count.by_ip_app", "entity_id": "7|3", "part": "10m",
                                 "version_ms": 60_000, "value": "60000|2|1"}, parts)
    assert u.entity_id == "7|3" and u.key == "{odl:fs:count.by_ip_app}:7|3:10m"
    with pytest.raises(FeatureUpdateError):
        FeatureUpdate.from_dict({"kind": "count.by_ip", "entity_id": "7", "part": "5m",
                                 "version_ms": 1, "value": "x"}, parts)


def test_serving_accepts_one_tile_in_flight_the_job_none():
    tile, at = Tile(120_000, 4, 1), 185_000          # tiles of 60 s: in force ends at 180 s
    assert tile_in_force(tile, at, 60_000) == (0, 0)
    assert tile_in_force(tile, at, 60_000, in_flight=True) == (4, 1)
    assert tile_in_force(Tile(60_000, 4, 1), at, 60_000, in_flight=True) == (0, 0)
    tiles = ["120000|4|1" if p == ("by_app", "1h") else None for p in count_parts(ADLOG)]
    assert count_values(ADLOG, tiles, at, in_flight=True)["by_app.impressions_1h"] == 4


MOVIELENS = load_spec(SPECS_DIR / "movielens.yaml")


def test_recommend_is_one_instance_per_candidate_over_the_context():
    req = SpecRequests(MOVIELENS, max_instances=4, max_candidates=3)
    rows, cands, top_k = req.parse_recommend(json.dumps({
        "context": {"user_id": 7}, "top_k": 2,
        "candidates": [{"movie_id": 1, "genres": ["Drama", "Crime"]}, {"movie_id": 2}]}).encode())
    assert rows == [{"user_id": 7, "movie_id": 1, "genres": ["Drama", "Crime"]},
                    {"user_id": 7, "movie_id": 2, "genres": None}]
    assert cands == [{"movie_id": 1, "genres": ["Drama", "Crime"]}, {"movie_id": 2}]
    assert top_k == 2
    # one candidate field: bare values are candidates; top_k defaults to all of them
    ads = SpecRequests(ADLOG.model_copy(update={"serving": ADLOG.serving.model_copy(
        update={"candidates": ["app"]})}), 4)
    rows, cands, top_k = ads.parse_recommend(json.dumps({
        "context": {"ip": 1, "device": 3, "os": 4, "channel": 5}, "candidates": [2, 9]}).encode())
    assert [r["app"] for r in rows] == [2, 9] and rows[0]["ip"] == 1 and top_k == 2


@pytest.mark.parametrize("body, message", [
    ({"context": {"user_id": 7}, "candidates": [{"movie_id": -1}]}, "candidates[0].movie_id: movie_id_out_of_range"),
    ({"candidates": [{"movie_id": 1}]}, "context.user_id: required"),
    ({"context": {"user_id": 7, "movie_id": 1}, "candidates": [{"movie_id": 1}]},
     "context.movie_id: unknown field"),
    ({"context": {"user_id": 7}, "candidates": [{"movie_id": 1, "rating": 5}]},
     "candidates[0].rating: unknown field"),
    ({"context": {"user_id": 7}, "candidates": [1]}, "candidates[0]: not an object"),
    ({"context": {"user_id": 7}, "candidates": []}, "body must be"),
    ({"context": {"user_id": 7}, "candidates": [{"movie_id": 1}] * 4}, "body must be"),
    ({"context": {"user_id": 7}, "candidates": [{"movie_id": 1}], "top_k": 0}, "top_k: an integer"),
    ({"context": {"user_id": 7}, "candidates": [{"movie_id": 1}], "top_k": True}, "top_k: an integer"),
    ({"user_id": 7, "candidates": [{"movie_id": 1}]}, "body must be"),
])
def test_bad_recommend_bodies_name_the_field(body, message):
    req = SpecRequests(MOVIELENS, max_instances=4, max_candidates=3)
    with pytest.raises(SpecRequestError) as exc:
        req.parse_recommend(json.dumps(body).encode())
    assert str(exc.value).startswith(message), str(exc.value)


def test_recommend_needs_declared_candidates_and_its_schema_says_so():
    criteo = load_spec(SPECS_DIR / "criteo.yaml")
    req = SpecRequests(criteo, 4)
    assert req.recommend_schema() is None
    with pytest.raises(SpecRequestError, match="declares no serving.candidates"):
        req.parse_recommend(b'{"candidates": [{}]}')
    request, answer = SpecRequests(MOVIELENS, 4, 3).recommend_schema()
    assert request["properties"]["context"]["required"] == ["user_id"]
    assert request["properties"]["candidates"]["maxItems"] == 3
    item = answer["properties"]["items"]["items"]
    assert item["required"] == ["movie_id", "score"] and "genres" in item["properties"]


class _RowModel:
    """Scores row k of a batch (k + 1) / 10: the answer's order shows how scores map back."""
    version, manifest = "4", {}
    packed_fn = object()        # an optimised graph: the scorer sends the packed request

    def predict_inputs(self, inputs, packed=False):
        # packed: single-valued inputs only as singles_<dim>, never one tensor each
        assert packed and not any(k.endswith("_emb") and k[:-4] in ("app", "ip") for k in inputs)
        assert any(k.startswith("singles_") for k in inputs)
        n = len(inputs["mask"])
        return ((np.arange(n) + 1) / 10).astype("float32")


def test_the_app_recommends_under_a_spec_and_documents_its_bodies(tmp_path):
    from aiohttp.test_utils import TestClient, TestServer
    from openapi_spec_validator import validate as validate_openapi

    from serving.app import ServingApp
    from tests.conftest import free_port, make_config

    holder = type("Holder", (), {"current": _RowModel(), "load_errors": 0})()
    dead = redis.Redis(port=free_port(), socket_timeout=0.2, socket_connect_timeout=0.2)

    async def go(spec: str, calls: list[tuple[str, str, dict | None]]):
        cfg = make_config(tmp_path, serving={"redis_retry_s": 5}).model_copy(
            update={"spec": SPECS_DIR / spec})
        app = ServingApp(cfg, holder, dead, "serving-test")
        out = []
        async with TestClient(TestServer(app.build())) as client:
            for method, path, body in calls:
                resp = await getattr(client, method)(path, json=body)
                out.append((resp.status, await resp.json()))
        return out

    body = {"context": {"ip": 1, "device": 3, "os": 4},
            "candidates": [{"app": a, "channel": 5} for a in (2, 7, 11)], "top_k": 2}
    (s, doc), (s2, rec), (s3, bad) = asyncio.run(go("adlog.yaml", [
        ("get", "/v1/openapi.json", None), ("post", "/v1/models/ctr:recommend", body),
        ("post", "/v1/models/ctr:recommend", {**body, "candidates": [{"app": -1, "channel": 5}]})]))
    assert s == 200
    validate_openapi(doc)
    assert doc["components"]["schemas"]["RecommendRequest"]["properties"]["candidates"]["maxItems"] == 1000
    assert s2 == 200 and rec["model_version"] == "4"
    assert rec["items"] == [{"app": 11, "channel": 5, "score": pytest.approx(0.3)},
                            {"app": 7, "channel": 5, "score": pytest.approx(0.2)}]
    assert s3 == 400 and bad["error"] == "candidates[0].app: app_out_of_range"

    (s, doc), (s2, rec) = asyncio.run(go("criteo.yaml", [
        ("get", "/v1/openapi.json", None), ("post", "/v1/models/ctr:recommend", {"candidates": [1]})]))
    validate_openapi(doc)
    assert not any(p.endswith(":recommend") for p in doc["paths"])
    assert s2 == 404 and "declares no serving.candidates" in rec["error"]
