"""The spec feature job's SQL and UDF adapters without a cluster (the job itself runs in
tests/integration/test_spec_feature_job.py)."""
import json

import pytest

from odl.config import Config
from odl.features import smoothed_ctr
from odl.spec import SPECS_DIR, load_spec
from pipeline.feature_sql import JobTopics
from pipeline.spec_sql import SpecJobError, spec_statements
from pipeline.spec_udfs import SpecFeatures, SpecParser, parsed_fields

TOPICS = JobTopics("e", "s", "d", "f")


@pytest.mark.parametrize("name", ["adlog", "criteo", "default"])
def test_every_streamable_shipped_spec_generates_its_job(name):
    spec = load_spec(SPECS_DIR / f"{name}.yaml")
    ddl, inserts = spec_statements(Config(), spec, TOPICS)
    text = "\n".join(ddl + inserts)
    assert text.count("FOR SYSTEM_TIME AS OF") == len(spec.realtime.counts) + len(spec.realtime.sequences)
    assert ("LEFT JOIN clicks c" in text) == (spec.label.join is not None)
    assert ("duplicate_event" in text) == (spec.events.id_field is not None)


def test_a_window_of_too_many_tiles_is_refused_naming_it():
    with pytest.raises(SpecJobError, match=r"realtime.windows.1d is 86400 tiles.*tile_s to at least 60"):
        spec_statements(Config(), load_spec(SPECS_DIR / "movielens.yaml"), TOPICS)


def test_parser_routes_labels_keys_and_refusals():
    spec = load_spec(SPECS_DIR / "adlog.yaml")
    p = SpecParser(spec)
    names = [n for n, _ in parsed_fields(spec)]
    ev = {"ts_ms": 5000, "ip": 7, "app": 3, "device": 1, "os": 2, "channel": 9, "is_attributed": 1}
    row = dict(zip(names, p.row(json.dumps(ev), 5000)))
    assert row["reason"] is None and (row["label"], row["is_imp"], row["is_click"]) == (1, 1, 1)
    assert json.loads(row["fields"]) == {"ip": 7, "app": 3, "device": 1, "os": 2, "channel": 9}
    assert [row["c0"], row["c1"], row["c2"]] == ["7", "3", "7|3"]      # by_ip, by_app, by_ip_app
    bad = dict(zip(names, p.row(json.dumps({**ev, "app": -1}), 5000)))
    assert bad["reason"] == "app_out_of_range" and len(bad) == len(names)
    assert p.row("{", 5000)[0] == "invalid_json"


def test_features_take_only_the_tile_in_force():
    spec = load_spec(SPECS_DIR / "adlog.yaml")          # tiles of 60 s
    f = SpecFeatures(spec)
    at = 180_500
    frag = json.loads("{" + f.fragment(at, "180000|3|1", "", "120000|9|9", "180000|4|2")[1:] + "}")
    # by_ip 10m in force; by_ip 1h absent; by_app's tile ended a slide early: nothing in it
    assert frag["counts"] == {"by_ip.impressions_10m": 3, "by_app.ctr_1h": smoothed_ctr(0, 0),
                              "by_ip_app.impressions_10m": 4}
    # the job's state holds the newest two tiles: on a tile's last millisecond the temporal join
    # finds the tile containing the impression, and the one before is in force
    frag = json.loads("{" + f.fragment(239_999, "180000|3|1 240000|8|2", "", "", "")[1:] + "}")
    assert frag["counts"]["by_ip.impressions_10m"] == 3
