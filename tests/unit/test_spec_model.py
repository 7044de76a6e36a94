"""The spec's model and its log: declared features reach the model, point in time, and it learns
what only those features can explain."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from odl.cli import main
from odl.config import Config
from odl.spec import SPECS_DIR, load_spec, parse_spec
from odl.spec.encode import key_of, numeric_values, sparse_keys
from odl.spec.model import NumericFeature
from trainers.evaluation import learners as L
from trainers.evaluation.protocol import replay
from trainers.evaluation.report import figures
from trainers.evaluation.spec_log import load_spec_log

T0 = 1_700_000_000_000

CROSS_SPEC = """
name: crossed
events:
  type_field: null
  version_field: null
  version: null
  max_future_skew_s: null
  max_age_s: null
  fields:
    ts_ms: {type: int, required: true}
    a: {type: id, required: true}
    b: {type: id, required: true}
    tags: {type: "list[string]", max_len: 4}
    y: {type: int, required: true, min: 0, max: 1}
tables:
  ids: {dim: 8, capacity: 4096}
  tags: {dim: 8, capacity: 64}
sparse:
  a: {table: ids, field: a}
  b: {table: ids, field: b}
  ab: {table: ids, cross: [a, b]}
  tags: {table: tags, field: tags, pooling: mean}
label: {field: y}
"""


def _write(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: "|".join(v) if isinstance(v, list) else v for k, v in r.items()})
    return path


def _cfg():
    return Config().trainer.model_copy(update={"frozen_baseline_after": None})


def test_the_model_learns_what_only_a_declared_cross_and_list_explain(tmp_path: Path):
    """The click depends on a XOR of a and b (no first-order signal in either) or on a tag;
    the spec's model with the cross learns it, a logistic regression on a and b alone cannot."""
    rng = random.Random(5)
    rows = []
    for n in range(6000):
        a, b = rng.randrange(4), rng.randrange(4)
        hot = rng.random() < 0.2
        y = int(((a % 2) ^ (b % 2)) == 1 or hot)
        rows.append({"ts_ms": T0 + n * 1000, "a": a, "b": b,
                     "tags": ["hot", f"t{rng.randrange(3)}"] if hot else [f"t{rng.randrange(3)}"],
                     "y": y if rng.random() > 0.05 else 1 - y})
    spec = parse_spec(CROSS_SPEC)
    log = load_spec_log(spec, _write(tmp_path / "log.csv", rows))
    online = L.OnlineODL(lambda: log.make_model(_cfg()), "immediate")
    res = replay(log, [online, L.Popularity("immediate")], 64, 0)
    overall, _ = figures(res.scores, log.label, 0.3)
    assert overall["online"].auc > 0.9, overall["online"]
    assert overall["pop"].auc < 0.6      # counts of `a` alone carry nothing here


def test_sequences_and_counts_see_only_the_past(tmp_path: Path):
    spec = load_spec(SPECS_DIR / "movielens.yaml")
    rows = [  # user 1 likes 10 and 11 at the same second, then is scored a second later
        {"ts_ms": T0, "user_id": 1, "movie_id": 10, "genres": ["Drama"], "rating": 5.0},
        {"ts_ms": T0, "user_id": 1, "movie_id": 11, "genres": [], "rating": 4.5},
        {"ts_ms": T0 + 1000, "user_id": 1, "movie_id": 12, "genres": ["Drama"], "rating": 1.0},
        {"ts_ms": T0 + 2000, "user_id": 1, "movie_id": 13, "genres": ["Drama"], "rating": 2.0},
    ]
    log = load_spec_log(spec, _write(tmp_path / "log.csv", rows))
    liked = log.keys["liked"]
    k10, k11 = key_of(("movie_id",), (10,)), key_of(("movie_id",), (11,))
    assert not liked[0].any() and not liked[1].any()          # same instant: not yet known
    assert liked[2][:2].tolist() in ([k11, k10], [k10, k11]) and not liked[2][2:].any()
    assert liked[3][:2].tolist() == liked[2][:2].tolist()     # a dislike is not a like
    assert log.keys["movie"][0, 0] == k10 == liked[2][1]     # one key for one movie, both inputs
    names = list(log.numeric_names)
    imps = log.numeric[:, names.index("user.impressions_1m")]
    clicks = log.numeric[:, names.index("user.clicks_1m")]
    np.testing.assert_allclose(np.expm1(imps), [0, 0, 2, 3], atol=1e-5)   # 1 s tiles
    np.testing.assert_allclose(np.expm1(clicks), [0, 0, 2, 2], atol=1e-5)
    assert log.label.tolist() == [1, 1, 0, 0]                             # rating >= 4
    # clicks arriving a second after their rows: known from then on, not at the same instant
    late = load_spec_log(spec, tmp_path / "log.csv", click_delay_s=(1.0, 1.0))
    assert late.click_ts_ms.tolist() == [T0 + 1000, T0 + 1000, -1, -1]
    assert not late.keys["liked"][2].any() and late.keys["liked"][3][:2].tolist() == liked[2][:2].tolist()


def test_keys_padding_and_transforms():
    spec = parse_spec(CROSS_SPEC)
    keys, mask = sparse_keys(spec, spec.sparse["tags"], [{"tags": ["x", "y"]}, {"tags": None}])
    assert keys.shape == (2, 4) and mask.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0]]
    ab, _ = sparse_keys(spec, spec.sparse["ab"], [{"a": 1, "b": 2}, {"a": 2, "b": 1}])
    assert ab[0, 0] != ab[1, 0]                               # a cross is ordered by field
    std = numeric_values(NumericFeature(field="x", transform="standardize"),
                         np.array([1.0, 3.0, np.nan, 5.0]))
    assert std[0] == pytest.approx(1.0) and std[2] == 0.0     # nothing seen yet / missing
    assert std[3] == pytest.approx((5.0 - 2.0) / 1.0)         # moments of the rows before
    lg = numeric_values(NumericFeature(field="x", transform="log1p"), np.array([-1.0, 0.0, 9.0]))
    np.testing.assert_allclose(lg, [-np.log(2), 0, np.log(10)], rtol=1e-6)


def test_standardize_moments_survive_a_restart_and_serving_scores_on_the_versions():
    """The trainer's reader checkpoints its moments (a restored one scales the next records as
    the uninterrupted one does); serving's reader is frozen on the moments a version carries."""
    from odl.spec.sample import SampleReader
    spec = parse_spec(CROSS_SPEC.replace("label: {field: y}", "numeric:\n  x: {field: x, "
                                         "transform: standardize}\nlabel: {field: y}")
                      .replace("    y: {type: int", "    x: {type: float}\n    y: {type: int"))
    recs = [json.dumps({"sample_id": f"s{k}", "ts_ms": T0 + k, "label": 0,
                        "fields": {"a": 1, "b": 2, "x": float(k % 7)}}).encode() for k in range(60)]
    live = SampleReader(spec)
    live.read(recs[:40])
    restored = SampleReader(spec)
    restored.set_moments(json.loads(json.dumps(live.moments)))     # through a checkpoint's JSON
    np.testing.assert_array_equal(restored.read(recs[40:]).numeric, live.read(recs[40:]).numeric)

    n, s1, s2 = live.moments["x"]
    mean, std = s1 / n, np.sqrt(s2 / n - (s1 / n) ** 2)
    serving = SampleReader(spec, frozen=True)
    serving.set_moments(live.moments)
    before = serving.moments
    got = serving.read(recs[:5]).numeric[:, 0]
    np.testing.assert_allclose(got, (np.arange(5) - mean) / std, rtol=1e-5)
    assert serving.moments == before, "requests never move a version's moments"
    assert live.moments["x"][0] == 60 and SampleReader(spec).moments == {"x": [0.0, 0.0, 0.0]}


def test_decoded_records_encode_as_their_json_does():
    """Serving hands the reader dicts (``read_docs``), the trainer bytes (``read``): same inputs."""
    from odl.spec.sample import SampleReader
    spec = parse_spec(CROSS_SPEC)
    docs = [{"sample_id": f"s{k}", "ts_ms": T0 + k, "label": k % 2,
             "fields": {"a": k % 3, "b": 7, "tags": ["t", "u"][: k % 3]}} for k in range(20)]
    a, b = SampleReader(spec).read([json.dumps(d).encode() for d in docs]), SampleReader(spec).read_docs(docs)
    assert a.valid.all() and all((a.keys[n] == b.keys[n]).all() for n in a.keys)
    np.testing.assert_array_equal(a.numeric, b.numeric)
    with pytest.raises(TypeError, match="tags"):
        SampleReader(spec).read_docs([{**docs[0], "fields": {"a": 1, "b": 2, "tags": "t"}}])


def test_frozen_copy_stops_learning_and_padding_is_never_trained(tmp_path: Path):
    spec = parse_spec(CROSS_SPEC)
    rows = [{"ts_ms": T0 + n, "a": n % 3, "b": n % 5, "tags": ["t"], "y": n % 2} for n in range(300)]
    log = load_spec_log(spec, _write(tmp_path / "log.csv", rows))
    model = log.make_model(_cfg())
    idx = np.arange(128)
    model.train(log.batch(idx, log.label[idx]))
    frozen = model.frozen_copy()
    before = frozen.predict(log.batch(idx))
    np.testing.assert_allclose(before, model.predict(log.batch(idx)), rtol=1e-5)
    for _ in range(5):
        model.train(log.batch(idx, log.label[idx]))
    np.testing.assert_allclose(frozen.predict(log.batch(idx)), before, rtol=1e-6)
    assert not np.allclose(model.predict(log.batch(idx)), before)
    for t in model.tables.values():
        np.testing.assert_array_equal(t.var.numpy()[0], frozen.tables[t.name].var.numpy()[0])


def test_odl_eval_spec_on_a_sample_log(tmp_path: Path):
    rng = random.Random(2)
    rows = [{"ts_ms": T0 + n * 500, "ip": rng.randrange(50), "app": rng.randrange(8),
             "device": 1, "os": rng.randrange(3), "channel": rng.randrange(6),
             "is_attributed": int(rng.random() < 0.3)} for n in range(3000)]
    rows[10]["app"] = "x"
    log = _write(tmp_path / "ads.csv", rows)
    res = CliRunner().invoke(main, ["eval", "--spec", str(SPECS_DIR / "adlog.yaml"), "--log",
                                    str(log), "--no-peers", "--json", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("{\n"):])
    assert out["rows"] == 2999 and set(out["overall"]) >= {"online", "frozen", "daily", "pop"}
    assert "{'bad_app': 1}" in res.output
    bad = CliRunner().invoke(main, ["eval", "--spec", str(SPECS_DIR / "adlog.yaml"), "--log",
                                    str(log), "--synthetic"])
    assert bad.exit_code != 0 and "--synthetic does not apply" in bad.output
    bad = CliRunner().invoke(main, ["eval", "--spec", str(SPECS_DIR / "default.yaml"), "--log",
                                    str(log)])
    assert bad.exit_code != 0 and "label.field" in bad.output


def test_a_tables_learning_rate_reaches_its_optimiser():
    """``tables.<t>.learning_rate`` steps that table's optimiser; a table without one takes
    ``trainer.sparse_learning_rate`` (unscaled here: see the next test)."""
    from trainers.spec_model import SpecModel
    spec = parse_spec(CROSS_SPEC.replace("tables:\n", "tables:\n  fast: {dim: 4, learning_rate: 0.05}\n")
                      .replace("sparse:\n", "sparse:\n  a_fast: {table: fast, field: a}\n"))
    tc = Config().trainer.model_copy(update={"sparse_learning_rate": 0.3,
                                               "sparse_rate_inputs": 0})
    model = SpecModel(spec, tc)
    rates = {name: t.opt.learning_rate for name, t in model.tables.items()}
    assert rates.pop("fast") == 0.05 and set(rates.values()) == {0.3}


def test_a_wide_specs_default_table_rate_shrinks_with_its_inputs():
    """A table without its own rate steps at ``sparse_learning_rate`` up to
    ``sparse_rate_inputs`` embedding inputs a row, and at rate * inputs / n beyond (n inputs
    all move one logit); a table's own rate and ``sparse_rate_inputs: 0`` are left alone."""
    from odl.spec.net import table_learning_rate as rule
    from trainers.spec_model import SpecModel
    criteo = load_spec(SPECS_DIR / "criteo.yaml")
    bare = criteo.tables["categorical"]
    own = bare.model_copy(update={"learning_rate": 0.05})
    tc = Config().trainer.model_copy(update={"sparse_learning_rate": 0.2, "sparse_rate_inputs": 4})
    assert bare.learning_rate is None      # the shipped spec relies on the rule
    assert rule(own, 26, 0.2, 4) == 0.05
    assert rule(bare, 26, 0.2, 4) == pytest.approx(0.2 * 4 / 26)
    assert rule(bare, 4, 0.2, 4) == rule(bare, 1, 0.2, 4) == 0.2
    assert rule(bare, 26, 0.2, 0) == 0.2
    model = SpecModel(criteo, tc)
    assert model.tables["categorical"].opt.learning_rate == pytest.approx(0.2 * 4 / 26)
    with pytest.raises(ValueError, match="sparse_rate_inputs"):
        Config.model_validate({"trainer": {"sparse_rate_inputs": -1}})
    # `odl spec check` shows the rate the trainer will use, under the config's overrides
    res = CliRunner().invoke(main, ["spec", "check", str(SPECS_DIR / "criteo.yaml"), "--json"],
                             env={"ODL__TRAINER__SPARSE_LEARNING_RATE": "0.26"})
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["tables"]["categorical"]["learning_rate"] == 0.04
    res = CliRunner().invoke(main, ["spec", "check", str(SPECS_DIR / "criteo.yaml")],
                             env={"ODL__TRAINER__SPARSE_RATE_INPUTS": "-1"})
    assert res.exit_code != 0 and "sparse_rate_inputs" in res.output
