"""The spec job's SQL parse (``pipeline.spec_parse_sql``) against the validator it must agree
with (``odl.spec.events`` through ``pipeline.spec_udfs.SpecParser``), on a Flink mini-cluster:
for fuzzed payloads -- valid rows and every trap the module names -- each ``checked`` row equals
the UDF's row, SQL never proves an event the validator refuses, and it proves every plain valid
one (or the test would be vacuous)."""
import json
import random

import pytest
import yaml

from odl.config import load_config
from odl.spec import SPECS_DIR, load_spec
from odl.spec.synth import synthetic_rows
from pipeline import feature_job, spec_udfs
from pipeline.feature_sql import ltz_epoch_ms
from pipeline.spec_parse_sql import checked_views, sql_parse_gap
from pipeline.spec_udfs import SpecParser, parsed_fields

pytestmark = pytest.mark.slow

# a join spec with every type the SQL parse states: a type and version envelope, an event id,
# a string join key, a folded int, bounds, a float, a bool, a count over a cross and a sequence
JOIN_SPEC = {
    "name": "shop", "description": "impressions and clicks of a shop",
    "events": {"type_field": "type", "types": ["impression", "click"], "time_field": "ts_ms",
               "version_field": "v", "version": 2, "id_field": "eid",
               "max_future_skew_s": None, "max_age_s": None,
               "fields": {"ts_ms": {"type": "int", "required": True},
                          "eid": {"type": "string", "non_empty": True, "max_len": 12},
                          "req": {"type": "string", "required": True, "non_empty": True},
                          "user": {"type": "id", "required": True, "max": 1000},
                          "item": {"type": "id", "required": True},
                          "slot": {"type": "int", "required": ["impression"], "min": 0, "max": 9},
                          "hour": {"type": "int", "modulo": 24},
                          "price": {"type": "float", "min": 0},
                          "promo": {"type": "bool"}}},
    "tables": {"id": {"dim": 8, "capacity": 4096}, "small": {"dim": 4, "capacity": 64}},
    "sparse": {"user": {"table": "id", "field": "user"}, "item": {"table": "id", "field": "item"},
               "slot": {"table": "small", "field": "slot"},
               "hour": {"table": "small", "field": "hour"},
               "promo": {"table": "small", "field": "promo"}},
    "numeric": {"price": {"field": "price", "transform": "log1p"}},
    "realtime": {"tile_s": 60, "windows": {"1h": 3600},
                 "counts": {"by_user_item": {"key": ["user", "item"], "windows": ["1h"],
                                             "values": ["impressions"]}},
                 "sequences": {"last_items": {"key": "user", "value": "item", "length": 3,
                                              "table": "id"}}},
    "label": {"join": {"key": ["req", "item"], "attribution_window_s": 60}},
    "serving": {"request": ["user", "item", "slot", "hour", "price", "promo"],
                "entities": ["user"]},
}


def _join_event(rng: random.Random, k: int) -> dict:
    ev = {"type": rng.choice(["impression", "click"]), "v": 2, "ts_ms": 1_700_000_000_000 + k,
          "eid": f"e{k}", "req": f"r{k % 50}", "user": rng.randrange(1000),
          "item": rng.randrange(1 << 40), "slot": rng.randrange(10),
          "hour": rng.randrange(-50, 50), "price": rng.choice([0, 1.5, 12.25, 3]),
          "promo": rng.choice([True, False])}
    for f in ("eid", "hour", "price", "promo", "slot"):
        if rng.random() < 0.2:
            del ev[f]
    return ev


# (field or None, raw JSON text replacing its value / the whole payload)
TRAPS = ['"7"', "3.0", "-0", "1e3", "true", "false", "null", "[1]", '{"a":1}', "99999999999999999999",
         "-1", "1001", '""', '"x"', "0", "1E+400", "NaN", "2.5"]


def _payloads(spec, valid: list[dict], rng: random.Random) -> list[str]:
    fields = list(spec.events.fields)
    out = [json.dumps(ev) for ev in valid]
    out += [json.dumps(ev, indent=1) for ev in valid[:20]]          # whitespace everywhere
    for ev in valid[:200]:
        text = json.dumps(ev)
        f = rng.choice(fields + ([spec.events.type_field, spec.events.version_field]
                                 if spec.events.type_field else []))
        trap = rng.choice(TRAPS)
        doc = dict(ev)
        doc[f] = None
        mutated = json.dumps(doc).replace(f'"{f}": null', f'"{f}": {trap}')
        out += [mutated,
                text + " x", text + "}", text + text, text + ', {"a": 1}', "[" + text + "]",
                text[:-1] + f', "{f}": {trap}}}',                  # a duplicate key wins
                text.replace(f'"{f}"', '"\\u0' + format(ord(f[0]), "03x") + f[1:] + '"', 1),
                text.replace("{", '{"meta": {"' + f + '": "s"}, ', 1),   # a nested namesake
                text[: len(text) // 2]]
    return out + ["", "not json", "{}", "[]", "42", '"s"', "{\"a\": }"]


def _run_checked(tmp_path, spec, payloads: list[str]) -> list[tuple]:
    cfg = load_config(None, env={})
    cfg = cfg.model_copy(update={"paths": cfg.paths.model_copy(update={"state_dir": tmp_path})})
    t_env = feature_job.build_table_env(cfg)
    t_env.get_config().set("restart-strategy.type", "none")     # a failure fails the test
    spec_udfs.register(t_env, spec)
    src = tmp_path / "events.json"
    src.write_text("".join(json.dumps({"payload": p, "partition": 0, "offset": i,
                                       "ts_ms": 1_700_000_000_000 + i}) + "\n"
                           for i, p in enumerate(payloads)))
    t_env.execute_sql(f"""CREATE TABLE events_raw (
        payload STRING, `partition` INT, `offset` BIGINT, ts_ms BIGINT,
        ts AS TO_TIMESTAMP_LTZ(ts_ms, 3), pt AS PROCTIME(), WATERMARK FOR ts AS ts - INTERVAL '1' HOUR
      ) WITH ('connector' = 'filesystem', 'path' = '{src}', 'format' = 'json')""")
    for stmt in checked_views(spec, ltz_epoch_ms("ts"), sql=True):
        t_env.execute_sql(stmt)
    cols = [n for n, _ in parsed_fields(spec)]
    proven = ", proven" if sql_parse_gap(spec) is None else ", FALSE"
    rows = {}
    with t_env.execute_sql(f"SELECT `offset`, {', '.join(cols)} FROM checked").collect() as it:
        for r in it:
            rows[r[0]] = tuple(r[1:])
    with t_env.execute_sql(f"SELECT `offset`{proven} FROM parse_judged" if proven != ", FALSE"
                           else "SELECT `offset`, FALSE FROM parse_in").collect() as it:
        by_sql = {r[0]: r[1] for r in it}
    assert sorted(rows) == list(range(len(payloads))), "every event comes out once"
    return [(rows[i], by_sql[i]) for i in range(len(payloads))]


def _same(spec, sql_row: tuple, py_row: tuple) -> bool:
    cols = [n for n, _ in parsed_fields(spec)]
    for c, a, b in zip(cols, sql_row, py_row):
        if c == "fields" and a and b:
            if json.loads(a) != json.loads(b):
                return False
        elif (a if a is not None else "") != (b if b is not None else ""):
            return False
    return True


@pytest.mark.parametrize("which", ["adlog", "join"])
def test_sql_parse_agrees_with_the_validator_on_fuzzed_events(tmp_path, which):
    rng = random.Random(5)
    if which == "adlog":
        spec = load_spec(SPECS_DIR / "adlog.yaml")
        valid = synthetic_rows(spec, 400, seed=4)
    else:
        path = tmp_path / "shop.yaml"
        path.write_text(yaml.safe_dump(JOIN_SPEC))
        spec = load_spec(path)
        valid = [_join_event(rng, k) for k in range(400)]
    assert sql_parse_gap(spec) is None
    payloads = _payloads(spec, valid, rng)
    parser = SpecParser(spec)
    results = _run_checked(tmp_path, spec, payloads)
    wrong = []
    for k, (payload, (row, by_sql)) in enumerate(zip(payloads, results)):
        expected = parser.row(payload, 1_700_000_000_000 + k)
        if by_sql and expected[0] is not None:
            wrong.append(f"SQL proved an event the validator refuses ({expected[0]}): {payload}")
        elif not _same(spec, row, expected):
            wrong.append(f"{payload}\n  sql {row}\n  udf {expected}")
    assert not wrong, "\n".join(wrong[:10])
    python = [p for k, (p, (_, by)) in enumerate(zip(payloads[:len(valid)], results))
              if not by and parser.row(p, k)[0] is None]
    assert not python, f"{len(python)} plain valid events went to Python: {python[:3]}"
    refused = sum(parser.row(p, 0)[0] is not None for p in payloads)
    assert refused > 500, "the fuzzer must produce refusals, or it proves nothing"


def test_a_spec_sql_cannot_state_parses_in_python(tmp_path):
    spec = load_spec(SPECS_DIR / "movielens.yaml")
    assert "list" in sql_parse_gap(spec)
    rows = synthetic_rows(spec, 50, seed=1)
    payloads = [json.dumps(r) for r in rows] + ["not json"]
    results = _run_checked(tmp_path, spec, payloads)
    parser = SpecParser(spec)
    assert all(_same(spec, row, parser.row(p, 1_700_000_000_000 + k))
               for k, (p, (row, _)) in enumerate(zip(payloads, results)))
    assert results[-1][0][0] == "invalid_json"


def test_the_job_reads_each_field_once_whichever_branch_an_event_takes(tmp_path):
    """The fence holds in the spec job's plan: one JSON_VALUE per field, however many
    expressions, branches and sinks use it (without it the planner copies the extract into
    every consumer and the SQL parse costs several times over)."""
    from pipeline.feature_sql import JobTopics
    from pipeline.spec_sql import spec_statements
    spec = load_spec(SPECS_DIR / "adlog.yaml")
    cfg = load_config(None, env={})
    cfg = cfg.model_copy(update={
        "paths": cfg.paths.model_copy(update={"state_dir": tmp_path}),
        "feature_job": cfg.feature_job.model_copy(update={"sql_parse": True})})
    t_env = feature_job.build_table_env(cfg)
    spec_udfs.register(t_env, spec)
    ddl, inserts = spec_statements(cfg, spec, JobTopics("e", "s", "d", "f"))
    for stmt in ddl:
        t_env.execute_sql(stmt)
    ss = t_env.create_statement_set()
    for ins in inserts:
        ss.add_insert_sql(ins)
    plan = ss.explain()
    plan = plan[plan.index("== Optimized Execution Plan =="):]
    for name in spec.events.fields:
        assert plan.count(f"JSON_VALUE(payload, '$.{name}')") == 1, name
    assert plan.count("odl_spec_parse(") == 1
