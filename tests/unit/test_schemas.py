import json
import time

import pytest

from odl.schemas import Click, Impression, Sample, validate_event

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
    (imp(position=-3), "bad_position"),
    (imp(context=[1]), "bad_context"),
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
