"""The feature job of a declared spec (``pipeline.spec_sql``) on a Flink mini-cluster against the
real broker: its sample records carry exactly the inputs ``odl eval --spec`` computes from the
same log (counts by a field and a cross over two windows, a sequence, a multi-hot list, a
numeric), every refused or repeated event reaches the DLQ with its reason, and a join spec
labels impressions as the default job does."""
import json
import random
import time
import uuid
from collections import Counter

import numpy as np
import pytest

from odl.kafka_util import ensure_topics
from odl.spec import DEFAULT_SPEC_PATH, parse_spec
from odl.spec.encode import count_names
from odl.spec.logs import write_log
from odl.spec.sample import SampleReader
from tests.conftest import make_config
from tests.integration.test_feature_job import WINDOW_S, Stream, _collect, _crafted, _job_env, _start
from trainers.evaluation.spec_log import load_spec_log

pytestmark = pytest.mark.slow

SHOP = """
name: shop
events:
  type_field: null
  version_field: null
  version: null
  time_field: ts_ms
  id_field: event_id
  max_future_skew_s: null
  max_age_s: null
  fields:
    ts_ms: {type: int, required: true}
    event_id: {type: string, required: true, non_empty: true}
    user: {type: id, required: true, max: 1000}
    item: {type: id, required: true, max: 1000}
    tags: {type: "list[string]", max_len: 4}
    price: {type: float, min: 0}
    clicked: {type: int, required: true, min: 0, max: 1}
tables:
  user: {dim: 4, capacity: 1024}
  item: {dim: 4, capacity: 1024}
  tag: {dim: 4, capacity: 64}
  cross: {dim: 4, capacity: 4096}
sparse:
  user: {table: user, field: user}
  item: {table: item, field: item}
  tags: {table: tag, field: tags, pooling: mean}
  user_item: {table: cross, cross: [user, item]}
numeric:
  price: {field: price, transform: log1p}
realtime:
  tile_s: 10
  windows: {1m: 60, 5m: 300}
  counts:
    user: {key: [user], windows: [1m, 5m], values: [impressions, clicks, ctr]}
    user_item: {key: [user, item], windows: [5m], values: [impressions]}
  sequences:
    last_items: {key: user, value: item, length: 3, table: item}
label:
  field: clicked
serving:
  request: [user, item, tags, price]
  entities: [user]
"""


def _shop_rows(base: int, n: int, seed: int = 5) -> list[dict]:
    rng = random.Random(seed)
    t, rows = base, []
    for k in range(n):
        t += rng.randrange(100, 1500)
        row = {"ts_ms": t, "event_id": f"e{k}", "user": rng.randrange(1, 9),
               "item": rng.randrange(1, 13), "clicked": int(rng.random() < 0.3)}
        if rng.random() < 0.8:
            row["tags"] = rng.sample(["a", "b", "c", "d", "e"], rng.randrange(1, 4))
        if rng.random() < 0.7:
            row["price"] = round(rng.uniform(0, 90), 2)
        rows.append(row)
    # some rows on a tile's last millisecond (the job's temporal join finds the tile containing
    # them there; the one before is in force)
    moved = 0
    for k in range(50, n - 1):
        last_ms = rows[k]["ts_ms"] // 10_000 * 10_000 + 9_999     # tile_s is 10
        if moved < 8 and last_ms < rows[k + 1]["ts_ms"]:
            rows[k]["ts_ms"] = last_ms
            moved += 1
    return rows


def _spec_env(tmp_path, broker_port, redis_port, prefix, spec_text: str) -> dict[str, str]:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(spec_text)
    return _job_env(tmp_path, broker_port, redis_port, prefix, ODL__SPEC=str(spec_file))


def test_spec_job_writes_the_inputs_eval_computes(tmp_path, broker_port, redis_port):
    spec = parse_spec(SHOP)
    prefix = f"s{uuid.uuid4().hex[:8]}."
    overrides = _spec_env(tmp_path, broker_port, redis_port, prefix, SHOP)
    cfg = make_config(tmp_path, kafka={"bootstrap_servers": f"127.0.0.1:{broker_port}",
                                       "topic_prefix": prefix})
    ensure_topics(cfg)
    base = int(time.time() * 1000) - 20 * 60_000
    rows = _shop_rows(base, 600)
    end = rows[-1]["ts_ms"]
    # later rows on every partition move each watermark past the last real row
    flush = [{"ts_ms": end + 30_000 + u, "event_id": f"z{u}", "user": 900 + u, "item": 1,
              "clicked": 0} for u in range(16)]
    write_log(spec, rows + flush, tmp_path / "shop.csv")
    s = Stream()
    for r in rows + flush:
        s._put(str(r["user"]).encode(), json.dumps(r).encode(), r["ts_ms"], None)
    for r in rows[100:103]:                                       # at-least-once repeats
        s._put(str(r["user"]).encode(), json.dumps(r).encode(), r["ts_ms"], r["ts_ms"] + 1)
    bad = {b"{broken": "invalid_json", json.dumps({"ts_ms": base + 50}).encode(): "bad_event_id",
           json.dumps({**rows[5], "event_id": "x1", "user": -3}).encode(): "user_out_of_range",
           json.dumps({**rows[5], "event_id": "x2", "tags": "a"}).encode(): "bad_tags"}
    for payload, _ in bad.items():
        s.raw(payload, rows[5]["ts_ms"])
    s.send(cfg.kafka.bootstrap_servers, prefix + "events")
    want = {r["event_id"] for r in rows}
    job = _start("feature-job", overrides, tmp_path / "job.log")
    try:
        samples, dlq = _collect(cfg, prefix, want_samples=want, want_dlq=len(bad) + 3, job=job,
                                timeout_s=240)
    finally:
        job.terminate()
        job.wait(60)
    assert Counter(d["reason"] for d in dlq) == Counter({**{r: 1 for r in bad.values()},
                                                         "duplicate_event": 3})
    samples = [x for x in samples if x["sample_id"] in want]
    assert Counter(x["sample_id"] for x in samples) == Counter(want), "each row exactly once"

    log = load_spec_log(spec, tmp_path / "shop.csv")
    at = {int(t): k for k, t in enumerate(log.ts_ms)}
    samples.sort(key=lambda x: x["ts_ms"])
    idx = np.array([at[x["ts_ms"]] for x in samples])
    got = SampleReader(spec).read([json.dumps(x).encode() for x in samples])
    assert got.valid.all(), got.errors
    np.testing.assert_array_equal(got.labels, log.label[idx])
    for name, keys in got.keys.items():
        np.testing.assert_array_equal(keys, log.keys[name][idx], err_msg=name)
    # named, so that a rare mismatch says which input of which sample at what time
    cols = [*spec.numeric, *count_names(spec)]
    bad = np.argwhere(~np.isclose(got.numeric, log.numeric[idx], rtol=1e-6, atol=1e-6))
    assert not len(bad), [(samples[r]["sample_id"], samples[r]["ts_ms"], cols[c],
                           float(got.numeric[r, c]), float(log.numeric[idx][r, c]))
                          for r, c in bad[:10]]
    # not vacuous: the windows, the cross and the sequence all said something
    assert sum("sequences" in x for x in samples) > 300
    assert sum(x["ts_ms"] % 10_000 == 9_999 and "counts" in x for x in samples) >= 3
    counts = Counter(k for x in samples for k in x.get("counts", {}))
    assert counts["user.impressions_1m"] > 300 and counts["user_item.impressions_5m"] > 100


def test_join_spec_labels_impressions_like_the_default_job(tmp_path, broker_port, redis_port):
    """The default events through the spec job (the default spec renamed, so the spec path runs):
    the crafted join cases and DLQ reasons of the default job's test, record by record."""
    text = (DEFAULT_SPEC_PATH.read_text().replace("name: default", "name: default-as-spec")
            .replace("attribution_window_s: 10", f"attribution_window_s: {WINDOW_S}"))
    assert f"attribution_window_s: {WINDOW_S}" in text
    prefix = f"j{uuid.uuid4().hex[:8]}."
    overrides = _spec_env(tmp_path, broker_port, redis_port, prefix, text)
    cfg = make_config(tmp_path, kafka={"bootstrap_servers": f"127.0.0.1:{broker_port}",
                                       "topic_prefix": prefix})
    ensure_topics(cfg)
    base = int(time.time() * 1000) - 15 * 60_000
    s = Stream()
    labels, want_dlq = _crafted(s, base + 20_000)
    from odl.schemas import Impression
    for u in range(16):
        s.add(Impression(f"Z{u}", 900 + u, 999, 0, base + 120_000), key=u)
    s.send(cfg.kafka.bootstrap_servers, prefix + "events")
    job = _start("feature-job", overrides, tmp_path / "job.log")
    try:
        samples, dlq = _collect(cfg, prefix, want_samples=set(labels),
                                want_dlq=sum(want_dlq.values()), job=job, timeout_s=240)
    finally:
        job.terminate()
        job.wait(60)
    by_id = {x["sample_id"]: x for x in samples}
    assert {k: by_id[k]["label"] for k in labels} == labels
    assert all(c == 1 for k, c in Counter(x["sample_id"] for x in samples).items() if k in labels)
    assert Counter(d["reason"] for d in dlq) == Counter(want_dlq)
    # G comes a minute after A: its user's tiles count A's two impressions and two clicks
    g = by_id["G:2"]
    assert g["counts"]["user.impressions_5m"] == 2 and g["counts"]["user.clicks_1h"] == 2
    assert g["fields"] == {"user_id": 1, "item_id": 2, "position": 0, "hour": None}
