import json
import time

import pytest

from odl.features import Features
from odl.schemas import Click, Impression, Sample, parse_event, validate_event

NOW = int(time.time() * 1000)


def imp(**kw):
    d = json.loads(Impression("r1", 1, 2, 0, NOW, {"hour": 3}).to_json())
    d.update(kw)
    return json.dumps(d)


def test_valid_events_pass():
    assert validate_event(imp(), now_ms=NOW) is None
    assert validate_event(Click("r1", 1, 2, NOW).to_json(), now_ms=NOW) is None


@pytest.mark.parametrize("payload,reason", [
    (None, "empty"),
    ("{not json", "invalid_json"),
    ("[1, 2]", "not_an_object"),
    (imp(schema_version=2), "bad_schema_version"),
    (imp(type="purchase"), "bad_type"),
    (imp(request_id=""), "bad_request_id"),
    (imp(request_id="x" * 500), "bad_request_id"),
    (imp(user_id="7"), "bad_user_id"),
    (imp(user_id=True), "bad_user_id"),
    (imp(item_id=-1), "item_id_out_of_range"),
    (imp(user_id=2**60), "user_id_out_of_range"),
    (imp(ts_ms="now"), "bad_ts_ms"),
    (imp(position=-3), "position_out_of_range"),
    (imp(position="3"), "bad_position"),
    (imp(context=[1]), "bad_context"),
    (imp(event_id=7), "bad_event_id"),
    (imp(event_id=""), "bad_event_id"),
    (imp(ts_ms=NOW + 3_600_000), "event_time_in_future"),
    (imp(ts_ms=NOW - 30 * 86_400_000), "event_time_too_old"),
])
def test_every_reject_reason(payload, reason):
    assert validate_event(payload, now_ms=NOW) == reason


def test_missing_field_is_a_reject():
    d = json.loads(imp())
    del d["item_id"]
    assert validate_event(json.dumps(d), now_ms=NOW) == "bad_item_id"


def test_sample_round_trip():
    raw = json.dumps({"sample_id": "r:1", "request_id": "r", "user_id": 1, "item_id": 2,
                      "position": 3, "hour": None, "label": 1, "impression_ts_ms": NOW})
    s = Sample.from_json(raw)
    assert (s.sample_id, s.hour, s.label) == ("r:1", 0, 1)


def test_parse_event_reduces_a_valid_event_once():
    reason, ev = parse_event(Click("r1", 1, 2, NOW, {"category": 1003}).to_json(), record_ts_ms=NOW + 5)
    assert reason is None
    assert (ev.etype, ev.event_id, ev.category, ev.ts_ms) == ("click", "c:r1:2", 3, NOW + 5)
    assert parse_event(imp(event_id="mine"), now_ms=NOW)[1].event_id == "mine"
    assert parse_event(imp(context={"hour": 27}), now_ms=NOW)[1].hour == 3
    assert parse_event("{x", now_ms=NOW) == ("invalid_json", None)


def test_sample_carries_features():
    f = {"user": {"imps_5m": 1, "clicks_5m": 0, "imps_1h": 4, "clicks_1h": 2,
                  "last_items": [9, 8, 0, 0, 0], "last_categories": [1, 1, 0, 0, 0]},
         "item": {"imps_1h": 10, "clicks_1h": 1, "ctr_1h": 0.06}}
    raw = json.dumps({"sample_id": "r:1", "request_id": "r", "user_id": 1, "item_id": 2,
                      "position": 3, "hour": 4, "category": 7, "label": 0,
                      "impression_ts_ms": NOW, "features": f})
    s = Sample.from_json(raw)
    assert s.category == 7 and s.features.user.last_items == (9, 8, 0, 0, 0)
    assert Features.from_json(s.features.to_json()) == s.features
