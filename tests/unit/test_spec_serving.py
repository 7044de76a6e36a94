"""A spec's request body and online-store contract, without servers (the whole path runs in
tests/integration/test_spec_stack.py)."""
import json

import pytest

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
