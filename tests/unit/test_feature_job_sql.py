import time

import pytest

from odl.config import Config
from pipeline.feature_sql import JobTopics, interval, one_insert_per_sink, statements
from pipeline.feature_store_writer import decode
from pipeline.udfs import features_row, parse_row


def test_job_sql_routes_rejects_and_joins_within_the_window():
    cfg = Config.model_validate({"feature_job": {"attribution_window_s": 17, "watermark_delay_ms": 1500}})
    ddl, inserts = statements(cfg, JobTopics("ev", "sa", "dl", "fe"))
    text = "\n".join(ddl + inserts)
    for topic in ("ev", "sa", "dl", "fe"):
        assert f"'topic' = '{topic}'" in text
    assert interval(17_000) in inserts[0] and "LEFT JOIN" in inserts[0]
    assert "c.ts > i.ts" in inserts[0]                      # a click strictly after its impression
    assert "ts - INTERVAL '0 00:00:01.500' DAY TO SECOND(3)" in ddl[0]
    reasons = "\n".join(inserts[1:4])
    for reason in ("late_event", "duplicate_event", "click_unattributed", "click_before_impression"):
        assert reason in reasons
    # features as of the impression: one versioned view per entity kind
    assert text.count("FOR SYSTEM_TIME AS OF i.ts") == 2


def test_interval_literals():
    assert interval(3_600_000) == "INTERVAL '0 01:00:00.000' DAY TO SECOND(3)"
    assert interval(90_061_001) == "INTERVAL '1 01:01:01.001' DAY TO SECOND(3)"


def test_udf_adapters_never_return_null_numbers():
    row = parse_row("{broken", None)
    assert row[0] == "invalid_json" and None not in row
    now = int(time.time() * 1000)
    ok = parse_row('{"type":"click","request_id":"r","user_id":1,"item_id":2,"ts_ms":%d,'
                   '"schema_version":1}' % now, now)
    assert ok[0] is None and ok[-1] == now               # event time = the record timestamp
    user, item = features_row(5, "", "", "", "")
    assert user[:4] == (0, 0, 0, 0) and item[:2] == (0, 0)
    user, item = features_row(120_001, "120000|3|1", "120000|9|2", "100:7:3 120001:8:4",
                              "60000|40|2")     # the item's tile is one slide old: still valid
    assert user[:4] == (3, 1, 9, 2) and user[4][:2] == [7, 0] and item[:2] == (40, 2)


def test_writer_skips_malformed_updates():
    good = b'{"kind":"user","entity_id":1,"part":"t5m","version_ms":60000,"value":"60000|1|0"}'
    updates, bad = decode([good, b"{", b'{"kind":"shop","entity_id":1,"part":"x","version_ms":1,"value":""}',
                           b'{"kind":"item","entity_id":"x","part":"t1h","version_ms":1,"value":""}'])
    assert len(updates) == 1 and bad == 3


def test_the_inserts_into_one_sink_become_one_insert():
    """One sink operator, hence one Kafka producer, per topic (``one_insert_per_sink``)."""
    cfg = Config.model_validate({"trainer": {"delayed_feedback": True}})
    _, inserts = statements(cfg, JobTopics("ev", "sa", "dl", "fe"))
    merged = one_insert_per_sink(inserts)
    assert [m.split()[2] for m in merged] == ["samples_sink", "dlq_sink", "features_sink"]
    for m in merged:
        sink = m.split()[2]
        parts = [i for i in inserts if i.split()[2] == sink]
        assert m.count("UNION ALL") == len(parts) - 1
        assert all(p.split(None, 3)[3].strip() in m for p in parts)   # every SELECT, verbatim
    assert one_insert_per_sink(["INSERT INTO t SELECT 1"]) == ["INSERT INTO t SELECT 1"]
    with pytest.raises(ValueError, match="not an INSERT"):
        one_insert_per_sink(["SELECT 1"])
