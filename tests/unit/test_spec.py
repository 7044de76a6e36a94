"""The feature spec: shipped specs load, bad specs fail naming the entry, the generated event
rules behave as declared, and the default spec agrees with the shape the pipeline implements."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from odl import features
from odl.cli import main
from odl.config import Config
from odl.schemas import SCHEMA_VERSION
from odl.spec import (SPECS_DIR, EventValidator, SpecError, SpecMismatch, check_spec,
                      default_spec, load_spec, parse_spec)
from odl.spec.events import stable_bucket

SHIPPED = sorted(SPECS_DIR.glob("*.yaml"))
NOW = 1_700_000_000_000

MINIMAL = """
name: tiny
events:
  type_field: null
  version_field: null
  version: null
  fields:
    ts_ms: {type: int, required: true}
    user: {type: id, required: true}
    tags: {type: "list[string]", max_len: 3}
    price: {type: float, min: 0}
    y: {type: int, required: true, min: 0, max: 1}
tables:
  t: {dim: 8}
sparse:
  user: {table: t, field: user}
  tags: {table: t, field: tags, pooling: mean}
label: {field: y}
"""


def test_every_shipped_spec_loads_with_its_own_hash():
    names = {p.stem for p in SHIPPED}
    assert {"default", "movielens", "adlog", "criteo"} <= names
    specs = [load_spec(p) for p in SHIPPED]
    assert len({s.hash for s in specs}) == len(specs)
    assert [s.hash for s in specs] == [load_spec(p).hash for p in SHIPPED]   # stable
    criteo = load_spec(SPECS_DIR / "criteo.yaml")
    assert len(criteo.numeric) == 13 and len(criteo.sparse) == 26


def test_description_does_not_change_the_hash():
    a = parse_spec(MINIMAL)
    b = parse_spec(MINIMAL.replace("name: tiny", "name: tiny\ndescription: words"))
    assert a.hash == b.hash
    assert parse_spec(MINIMAL.replace("dim: 8", "dim: 4")).hash != a.hash
    # nor does the shape of the recommend body: the model is the same
    c = parse_spec(MINIMAL.replace("label: {field: y}",
                                   "label: {field: y}\nserving: {request: [user], candidates: [user]}"))
    d = parse_spec(MINIMAL.replace("label: {field: y}", "label: {field: y}\nserving: {request: [user]}"))
    assert c.hash == d.hash and c.serving.candidates == ["user"]
    # nor does a table's learning rate: how it trains, not what its state is
    e = parse_spec(MINIMAL.replace("dim: 8", "dim: 8, learning_rate: 0.05"))
    assert e.hash == a.hash and e.tables["t"].learning_rate == 0.05


@pytest.mark.parametrize("change, named", [
    (("field: user}", "field: usr}"), "sparse.user: field 'usr' is not declared"),
    (("{table: t, field: tags", "{table: tt, field: tags"), "sparse.tags: table 'tt' is not declared"),
    (("{table: t, field: tags, pooling: mean}", "{table: t, cross: [user, tags]}"),
     "a cross of a list field"),
    (("  t: {dim: 8}", "  t: {dim: 8, dim: 4}"), "key 'dim' given twice"),
    (("  t: {dim: 8}", "  t: {dim: 8}\n  spare: {dim: 8}"), "tables ['spare']: no sparse feature"),
    (("  t: {dim: 8}", "  t: {dim: 8, colour: red}"), "tables.t.colour: Extra inputs"),
    (("  t: {dim: 8}", "  t: {dim: 8, learning_rate: 0}"), "tables.t.learning_rate"),
    (("label: {field: y}", "label: {field: y}\nrealtime:\n  windows: {5m: 300}"),
     "windows ['5m']: no count uses them"),
    (("label: {field: y}", "label: {field: y}\nrealtime:\n  windows: {90s: 90}\n  counts:\n"
      "    c: {key: [user], windows: [90s]}"), "not a positive multiple of tile_s"),
    (("label: {field: y}", "label: {field: tags}"), "label.field: field 'tags' is list[string]"),
    (("label: {field: y}", "label: {}"), "give exactly one of join or field"),
    (("label: {field: y}", "label: {field: y}\nserving: {entities: [user]}"),
     "serving.entities: 'user' keys no real-time count"),
    (("price: {type: float, min: 0}", "price: {type: float, min: 5, max: 1}"), "min 5.0 > max 1.0"),
    (("label: {field: y}", "label: {field: y}\nserving: {request: [user], candidates: [item]}"),
     "serving.candidates: 'item' is not in serving.request ['user']"),
])
def test_a_spec_that_cannot_work_names_the_entry(change, named):
    text = MINIMAL.replace(*change)
    assert text != MINIMAL
    with pytest.raises(SpecError) as err:
        parse_spec(text, "t.yaml")
    assert named in str(err.value)


def test_generated_rules_for_a_log_that_carries_its_label():
    v = EventValidator(parse_spec(MINIMAL).events)
    ok = {"ts_ms": NOW, "user": 3, "tags": ["a", "b"], "price": 2.5, "y": 1}
    reason, values = v.check(ok, now_ms=NOW)
    assert reason is None and values == ok
    assert v.check({**ok, "price": None}, now_ms=NOW)[1]["price"] is None      # optional
    for bad, why in [({"user": None}, "bad_user"), ({"user": -1}, "user_out_of_range"),
                     ({"user": True}, "bad_user"), ({"tags": ["a"] * 4}, "bad_tags"),
                     ({"tags": [1]}, "bad_tags"), ({"price": -1.0}, "price_out_of_range"),
                     ({"price": float("nan")}, "bad_price"), ({"y": 2}, "y_out_of_range")]:
        assert v.check({**ok, **bad}, now_ms=NOW) == (why, None), bad
    assert v.parse(b"{not json", now_ms=NOW) == ("invalid_json", None)
    assert v.parse(b"[1]", now_ms=NOW) == ("not_an_object", None)


def test_default_spec_rules_fold_and_tolerate_free_form_context():
    v = EventValidator(default_spec().events)
    ev = {"type": "impression", "schema_version": 1, "request_id": "r", "user_id": 1,
          "item_id": 2, "position": 3, "ts_ms": NOW,
          "context": {"hour": 49, "category": 1234}}
    _, values = v.check(ev, now_ms=NOW)
    assert (values["hour"], values["category"]) == (1, 234)
    _, values = v.check({**ev, "context": {"hour": "noon"}}, now_ms=NOW)
    assert values["hour"] is None                      # on_invalid: default
    assert v.check({**ev, "context": [1]}, now_ms=NOW)[0] == "bad_context"
    click = {k: x for k, x in ev.items() if k != "position"} | {"type": "click"}
    assert v.check(click, now_ms=NOW)[0] is None       # position is required of impressions only
    assert v.check({**ev, "position": None}, now_ms=NOW)[0] == "bad_position"


def test_hashed_categories_are_stable_across_processes():
    assert stable_bucket("abc", 1_000_003) == 891568578 % 1_000_003    # crc32("abc")
    assert stable_bucket(1_000_010, 1_000_003) == 7


def test_default_spec_agrees_with_the_pipeline_it_describes():
    """specs/default.yaml drives event validation; the rest describes what the feature job,
    trainer and serving implement.  Until they derive from it, this keeps the two equal."""
    s, cfg = default_spec(), Config()
    assert s.events.version == SCHEMA_VERSION
    rt = s.realtime
    assert rt.tile_s == features.TILE_SLIDE_S
    assert tuple(rt.windows[w] for w in rt.counts["user"].windows) == features.USER_WINDOWS_S
    assert [rt.windows[w] for w in rt.counts["item"].windows] == [features.ITEM_WINDOW_S]
    assert s.label.join.attribution_window_s == cfg.feature_job.attribution_window_s
    for name in ("user", "item"):
        assert s.tables[name].dim == cfg.trainer.tables[name].dim
        assert s.tables[name].capacity == cfg.trainer.tables[name].capacity
    assert s.tables["position"].capacity == cfg.trainer.num_positions + 1
    assert s.field("category").modulo == features.NUM_CATEGORIES


def test_state_of_another_spec_is_refused():
    check_spec(None, "old checkpoint")                 # written before specs: default shape
    check_spec(default_spec().hash, "checkpoint")
    with pytest.raises(SpecMismatch, match="checkpoint x was written under feature spec 0123"):
        check_spec("0123", "checkpoint x", "Move it aside.")


def test_odl_spec_check(tmp_path: Path):
    runner = CliRunner()
    res = runner.invoke(main, ["spec", "check", str(SPECS_DIR / "movielens.yaml"), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["name"] == "movielens" and out["sequences"] and out["live_pipeline"].startswith("refuses it: spec movielens: realtime.windows.1d")
    bad = tmp_path / "bad.yaml"
    bad.write_text(MINIMAL.replace("field: user}", "field: usr}"))
    res = runner.invoke(main, ["spec", "check", str(bad)])
    assert res.exit_code == 1 and "sparse.user: field 'usr'" in res.output
    res = runner.invoke(main, ["spec", "check", str(tmp_path / "none.yaml")])
    assert res.exit_code == 1 and "not found" in res.output


def _value(f, rng, ts):
    """A valid value of a field (what the spec's rules accept)."""
    lo, hi = f.bounds
    if f.type.startswith("list["):
        inner = f.model_copy(update={"type": f.type[5:-1]})
        return [_value(inner, rng, ts) for _ in range(rng.randint(0, min(3, f.max_len or 3)))]
    if f.type in ("id", "int"):
        return rng.randint(int(lo if lo is not None else 0), int(min(hi if hi is not None else 10**6, 10**6)))
    if f.type == "float":
        return round(rng.uniform(lo if lo is not None else 0.0, hi if hi is not None else 100.0), 3)
    if f.type == "bool":
        return rng.random() < 0.5
    return f"v{rng.randint(0, 99)}"


def _sample_log(spec, n=200, seed=3):
    import random
    rng, ts, rows = random.Random(seed), NOW, []
    for _ in range(n):
        ts += rng.randint(0, 5000)
        rows.append({name: ts if name == spec.events.time_field else _value(f, rng, ts)
                     for name, f in spec.events.fields.items() if not f.path and f.type != "object"})
    return rows


def _write_csv(path, rows):
    import csv
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: "|".join(map(str, v)) if isinstance(v, list) else
                        str(v).lower() if isinstance(v, bool) else v for k, v in r.items()})


@pytest.mark.parametrize("name", ["movielens", "adlog", "criteo"])
def test_each_shipped_spec_reads_its_sample_log_csv_and_parquet(name, tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from odl.spec.logs import read_log
    spec = load_spec(SPECS_DIR / f"{name}.yaml")
    rows = _sample_log(spec)
    _write_csv(tmp_path / "log.csv", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "log.parquet")
    for f in ("log.csv", "log.parquet"):
        got = list(read_log(spec, tmp_path / f))
        assert [r.reason for r in got] == [None] * len(rows), f
        assert [r.number for r in got] == list(range(1, len(rows) + 1))
    # a bad cell in one row: that row alone is refused, naming its field
    broken = [dict(r) for r in rows]
    broken[7][spec.events.time_field] = "yesterday"
    _write_csv(tmp_path / "bad.csv", broken)
    got = list(read_log(spec, tmp_path / "bad.csv"))
    assert [(r.number, r.reason) for r in got if r.reason] == [(8, f"bad_{spec.events.time_field}")]


def test_odl_spec_check_reads_a_log_and_names_bad_rows(tmp_path: Path):
    spec = load_spec(SPECS_DIR / "movielens.yaml")
    rows = [{**r, "title": "x"} for r in _sample_log(spec, 50)]
    rows = [{("userId" if k == "user_id" else k): v for k, v in r.items()} for r in rows]
    rows[4]["movie_id"] = -5
    _write_csv(tmp_path / "log.csv", rows)
    res = CliRunner().invoke(main, ["spec", "check", str(SPECS_DIR / "movielens.yaml"), "--log",
                                    str(tmp_path / "log.csv"), "--column", "userId=user_id", "--json"])
    assert res.exit_code == 0, res.output
    lg = json.loads(res.output)["log"]
    assert (lg["rows"], lg["valid"]) == (50, 49)
    assert lg["refused"] == {"movie_id_out_of_range": {"rows": 1, "first": [5]}}
    assert lg["ignored_columns"] == ["title"] and lg["missing_required_columns"] == []
