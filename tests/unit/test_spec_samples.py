"""The spec's sample records (``odl.spec.sample``) and their rows for the streaming trainer
(``trainers.spec_samples``): the stream reads exactly the inputs ``odl eval --spec`` computes from
the same log, malformed records are refused in place, and rows survive the trainer's layout."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import orjson
import pytest

from odl.spec import SPECS_DIR, EventValidator, load_spec
from odl.spec.encode import count_inputs, count_names
from odl.spec.logs import read_log
from odl.spec.sample import SampleReader, sample_fields, sample_record
from odl.spec.synth import synthetic_rows
from trainers.evaluation.spec_log import load_spec_log
from trainers.samples import PROVISIONAL_MASK, sample_hash
from trainers.spec_samples import SpecCodec


def _write_csv(path: Path, rows: list[dict]) -> Path:
    names = sorted({k for r in rows for k in r})
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=names)
        w.writeheader()
        for r in rows:
            w.writerow({k: "|".join(map(str, v)) if isinstance(v, list) else v
                        for k, v in r.items()})
    return path


def _label(spec, ev) -> int:
    v = float(ev[spec.label.field])
    return int(v >= spec.label.threshold if spec.label.threshold is not None else v > 0)


STANDARDIZED = """
name: num
events: {type_field: null, version_field: null, version: null, max_age_s: null,
         max_future_skew_s: null,
         fields: {ts_ms: {type: int, required: true}, x: {type: float}, y: {type: id},
                  label: {type: int, required: true}}}
tables: {t: {dim: 4}}
sparse: {y: {table: t, field: y}}
numeric: {x: {field: x, transform: standardize}}
label: {field: label}
"""


def standardized_docs(n: int = 40):
    """A spec with a standardised numeric input, and ``n`` of its records."""
    from odl.spec import parse_spec
    spec = parse_spec(STANDARDIZED)
    return spec, [orjson.dumps(sample_record(spec, f"s{k}", 1000 + k, k % 2,
                                             {"x": float(k * k % 7) if k % 5 else None,
                                              "y": k % 3}))
                  for k in range(n)]


@pytest.mark.parametrize("name", ["adlog", "criteo", "movielens"])
def test_stream_reads_the_inputs_odl_eval_computes_from_the_same_log(name, tmp_path: Path):
    """Records built from a log's rows, with the log's real-time counts, decode to the keys and
    numeric inputs that ``load_spec_log`` gives the offline evaluation (sequences aside: the
    log computes them from clicks, a record carries the job's)."""
    spec = load_spec(SPECS_DIR / f"{name}.yaml")
    path = _write_csv(tmp_path / "log.csv", synthetic_rows(spec, 400, seed=5))
    log = load_spec_log(spec, path)
    events = sorted((r.values for r in read_log(spec, path)), key=lambda v: v[spec.events.time_field])
    names = list(spec.numeric) + count_names(spec)
    records = []
    for k, ev in enumerate(events):
        counts = {}
        for c, value in count_inputs(spec):
            x = float(log.numeric[k, names.index(c)])
            counts[c] = x if value == "ctr" else float(np.expm1(x))
        records.append(orjson.dumps(sample_record(spec, f"s{k}", ev[spec.events.time_field],
                                                  _label(spec, ev), ev, counts)))
    codec = SpecCodec(spec)
    recs = codec.decode_records([0] * len(records), list(range(len(records))), records)
    assert recs.valid.all()
    batch = codec.to_batch(recs.rows)
    for feature in spec.sparse:
        np.testing.assert_array_equal(batch.keys[feature], log.keys[feature], err_msg=feature)
    np.testing.assert_allclose(batch.numeric, log.numeric, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(batch.labels, log.label)
    np.testing.assert_array_equal(batch.ts_ms, log.ts_ms)


def test_rows_carry_header_keys_and_numeric_through_the_layout():
    spec = load_spec(SPECS_DIR / "movielens.yaml")
    ev = {"user_id": 7, "movie_id": 318, "genres": ["Drama", "Crime"], "ts_ms": 1_700_000_000_000,
          "rating": 4.5}
    recs = [sample_record(spec, "a", ev["ts_ms"], 1, ev, sequences={"liked": [296, 593]}),
            sample_record(spec, "b", ev["ts_ms"] + 5, 0, {**ev, "genres": None}, provisional=True)]
    codec = SpecCodec(spec)
    r = codec.decode_records([0, 0], [4, 5], [orjson.dumps(d) for d in recs])
    lay = codec.layout
    assert r.valid.all() and r.rows.shape == (2, lay.width)
    assert r.rows[:, lay.label].tolist() == [1, 0]
    assert r.rows[:, lay.provisional].tolist() == [0, 1]
    assert r.rows[0, lay.sid] == sample_hash("a")
    assert r.rows[1, lay.sid] == sample_hash("b") ^ PROVISIONAL_MASK
    b = codec.to_batch(r.rows, delayed=True)
    assert (b.keys["genres"][0, :2] != 0).all() and (b.keys["genres"][1] == 0).all()
    assert (b.keys["liked"][0, :2] != 0).all() and (b.keys["liked"][1] == 0).all()
    assert b.delayed_mask.tolist() == [1.0, 1.0] and len(b) == 2
    assert sample_fields(spec) == ["user_id", "movie_id", "genres"]


def test_malformed_records_are_refused_in_place_with_a_reason():
    spec = load_spec(SPECS_DIR / "adlog.yaml")
    check = EventValidator(spec.events).check
    good = []
    for k, row in enumerate(synthetic_rows(spec, 6, seed=1)):
        ev = check(row, now_ms=row["ts_ms"])[1]
        good.append(orjson.dumps(sample_record(spec, f"g{k}", ev["ts_ms"], _label(spec, ev), ev)))
    base = orjson.loads(good[0])
    bad = [b"not json", b"[1]",
           orjson.dumps({**base, "label": 2}),
           orjson.dumps({**base, "provisional": True, "label": 1}),
           orjson.dumps({**base, "sample_id": ""}),
           orjson.dumps({**base, "fields": {**base["fields"], "app": {"x": 1}}}),
           orjson.dumps({k: v for k, v in base.items() if k != "fields"}),
           orjson.dumps({**base, "counts": [1, 2]})]
    values = good[:3] + bad + good[3:]
    codec = SpecCodec(spec)
    clean = codec.decode_records([0] * len(good), list(range(len(good))), good)
    r = codec.decode_records([0] * len(values), list(range(len(values))), values)
    assert r.valid.tolist() == [True] * 3 + [False] * len(bad) + [True] * 3
    np.testing.assert_array_equal(r.rows[r.valid], clean.rows)
    assert (r.rows[~r.valid] == 0).all()
    assert len(codec.rejected) == len(bad)
    assert any("label 2" in e for e in codec.rejected)
    assert any("fields.app" in e or "app" in e for e in codec.rejected)


def test_standardize_moments_carry_from_batch_to_batch():
    """A stream decoding in two batches gives the same inputs as one pass over the whole log."""
    spec, docs = standardized_docs()
    whole = SampleReader(spec).read(docs).numeric
    reader = SampleReader(spec)
    parts = np.concatenate([reader.read(docs[:17]).numeric, reader.read(docs[17:]).numeric])
    np.testing.assert_allclose(parts, whole, rtol=1e-6)
