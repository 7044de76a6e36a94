import math

import numpy as np
import pytest
import tensorflow as tf

from bench.registry import BenchResult, available, render
from bench.registry import run as registry_run
from odl.config import Config
from exporters import savedmodel
from exporters import gate
from odl.model_store import Manifest, ModelStore
from tests.unit.helpers import small_cfg
from odl.features import NUM_DENSE
from odl.plot import svg_line_chart
from trainers.model import Batch, CTRModel


def manifest(v: int) -> Manifest:
    return Manifest(version=str(v), parent=None, trainer_step=v, kafka_offsets={}, metrics={},
                    embedding_generation=0)


def test_saved_model_matches_trainer_predictions(tmp_path):
    model = CTRModel(small_cfg(64, 8, (16,)))
    rng = np.random.default_rng(0)
    b = Batch(rng.integers(0, 30, 64), rng.integers(0, 30, 64), rng.integers(0, 5, 64),
              rng.integers(0, 24, 64), (rng.random(64) < 0.3).astype(np.float32))
    for _ in range(5):
        model.train(b)
    store = ModelStore(tmp_path, "ctr")
    store.publish(1, lambda p: savedmodel.save(model.dense_weights(), 8, p), manifest(1))
    fn = tf.saved_model.load(str(store.path(1))).signatures["serving_default"]
    u_rows = model.tables["user"].rows_of(b.user_ids)
    i_rows = model.tables["item"].rows_of(b.item_ids)
    out = fn(user_emb=tf.gather(model.tables["user"].var, u_rows),
             item_emb=tf.gather(model.tables["item"].var, i_rows),
             position=tf.constant(b.positions), hour=tf.constant(b.hours),
             features=tf.constant(b.dense_features))["probability"].numpy()
    np.testing.assert_allclose(out, model.predict(b), atol=1e-5)


def test_store_versions_are_atomic_and_retained(tmp_path):
    store = ModelStore(tmp_path, "ctr")
    for v in range(1, 6):
        store.publish(v, lambda p: p.mkdir(), manifest(v))
    assert store.versions() == [1, 2, 3, 4, 5] and store.next_version() == 6
    with pytest.raises(RuntimeError):
        store.publish(6, lambda p: (p.mkdir(), (_ for _ in ()).throw(RuntimeError("boom"))), manifest(6))
    assert store.versions() == [1, 2, 3, 4, 5]
    assert not [p for p in store.dir.iterdir() if p.name.startswith(".tmp")]
    assert store.retain(2, protect={1}) == [2, 3]
    assert store.versions() == [1, 4, 5]


def test_gate_refuses_non_finite_models_with_reasons():
    ok = {"weights": {"a": np.ones(3)}, "step": 5, "metrics": {"loss": 0.4, "auc": math.nan}}
    assert gate.check(ok, None, 0.02).ok
    assert gate.check({**ok, "step": 0, "metrics": {"loss": math.nan}}, None, 0.02).ok  # untrained
    v = gate.check({**ok, "metrics": {"loss": math.inf}}, None, 0.02)
    assert not v.ok and "loss" in v.reason
    v = gate.check({**ok, "weights": {"a": np.array([math.nan])}}, None, 0.02)
    assert not v.ok and "dense weight a" in v.reason
    rows = [("item", np.array([[1.0, 2.0], [math.inf, 0.0]], np.float32))]
    v = gate.check(ok, None, 0.02, rows)
    assert not v.ok and "1 non-finite embedding rows in table item" == v.reason


@pytest.mark.parametrize("new,served,ok", [
    (0.70, 0.71, True),          # within the margin
    (0.70, 0.75, False),         # regressed by more than the margin
    (0.80, 0.75, True),          # better
    (math.nan, 0.75, False),     # lost a measurable AUC
    (math.nan, math.nan, True),  # nothing measured on either side yet
    (0.60, None, True),          # the first version
])
def test_gate_compares_recent_auc_with_the_served_version(new, served, ok):
    snap = {"weights": {"a": np.ones(2)}, "step": 9, "metrics": {"loss": 0.3, "auc": new}}
    verdict = gate.check(snap, None if served is None else {"auc": served}, auc_margin=0.02)
    assert verdict.ok is ok
    if not ok:
        assert "AUC" in verdict.reason


def test_bench_registry_and_result_line():
    assert "embedding-push" in available()
    text = render("x", BenchResult({"ratio": 1.5, "n": 3}, ["figures"]), as_json=False)
    assert text.splitlines()[-1] == "RESULT x ratio=1.5 n=3"
    assert '"ratio": 1.5' in render("x", BenchResult({"ratio": 1.5}), as_json=True)
    assert {"trainer", "serving-graph"} <= set(available())
    with pytest.raises(TypeError, match="--scale"):   # a benchmark without options refuses them
        registry_run("embedding-push", Config(), scale=2)


def test_svg_chart():
    svg = svg_line_chart([(0, 0.5), (10, 0.6), (20, 0.7)], "AUC", "s", "auc")
    assert svg.startswith("<svg") and "polyline" in svg
    assert "no data" in svg_line_chart([], "AUC", "s", "auc")


def test_a_version_exported_before_features_still_serves(tmp_path):
    """Versions in the store from before the model took features have no ``features`` input."""
    from serving.model import LoadedModel

    class Old(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="user_emb"),
                                      tf.TensorSpec([None, 4], tf.float32, name="item_emb"),
                                      tf.TensorSpec([None], tf.int64, name="position"),
                                      tf.TensorSpec([None], tf.int64, name="hour")])
        def serve(self, user_emb, item_emb, position, hour):
            return {"probability": tf.sigmoid(tf.reduce_sum(user_emb * item_emb, axis=1))}

    old = Old()
    tf.saved_model.save(old, str(tmp_path / "old"), signatures={"serving_default": old.serve})
    loaded = tf.saved_model.load(str(tmp_path / "old"))
    m = LoadedModel("1", {"embedding_dim": 4}, loaded.signatures["serving_default"], 0.0, loaded)
    assert not m.takes_features
    ones = np.ones((2, 4), np.float32)
    got = m.predict(ones, ones, np.zeros(2, np.int64), np.zeros(2, np.int64), np.zeros((2, 7), np.float32))
    np.testing.assert_allclose(got, [1 / (1 + np.exp(-4))] * 2, rtol=1e-6)
    cands = m.score_candidates(ones[:1], np.ones((1, 3, 4), np.float32), np.zeros((1, 3), np.int64),
                               np.zeros(1, np.int64), np.zeros((1, 3, 7), np.float32))
    assert cands.shape == (1, 3)


@pytest.mark.parametrize("setting", ["on", "off"])
def test_the_replica_chooses_xla_where_the_graph_runs(setting, tmp_path):
    """The exporter writes each request signature and its XLA twin; the replica's own
    ``serving.xla`` picks (auto: a GPU in the replica's process), and both score alike."""
    from exporters.graph.module import DEFAULT_BUCKETS
    from serving.model import ModelHolder, xla_choice
    model = CTRModel(small_cfg(64, 8, (16,)))
    store = ModelStore(tmp_path, "ctr")
    report = {}
    m = manifest(1)
    m.embedding_dim = 8
    store.publish(1, lambda p: report.update(savedmodel.save_optimised(model.dense_weights(), 8, p)), m)
    assert report["xla"] is False and report["xla_twins"] is True
    sigs = tf.saved_model.load(str(store.path(1))).signatures
    assert {"serving_default", "serving_xla", "score_candidates", "score_candidates_xla"} <= set(sigs)
    loaded = ModelHolder(store, cp=None, xla=setting).load("1")
    assert loaded.xla is (setting == "on")
    rng = np.random.default_rng(1)
    n = DEFAULT_BUCKETS[2] + 3          # between buckets: the XLA twin pads and slices back
    args = (rng.normal(size=(n, 8)).astype(np.float32), rng.normal(size=(n, 8)).astype(np.float32),
            rng.integers(0, 5, n), rng.integers(0, 24, n), np.zeros((n, NUM_DENSE), np.float32))
    want = sigs["serving_default"](**loaded._inputs(*args))["probability"].numpy()
    np.testing.assert_allclose(loaded.predict(*args), want, atol=1e-5)
    assert xla_choice("auto") == bool(tf.config.list_physical_devices("GPU"))


def test_chaos_fault_counts_change_the_kinds_named():
    from bench.chaos import ChaosPlan, fault_counts
    base = ChaosPlan().faults
    got = fault_counts("feature-job=3, redis=0", base)
    assert got == {**base, "feature-job": 3, "redis": 0}
    for bad, says in (("kafka=1", "unknown fault kind 'kafka'"), ("trainer", "kind=count"),
                      ("trainer=-1", "kind=count"),
                      (",".join(f"{k}=0" for k in base), "no fault left")):
        with pytest.raises(TypeError, match=says):
            fault_counts(bad, base)
    with pytest.raises(TypeError, match="--seed"):     # chaos' options, refused elsewhere
        registry_run("embedding-push", Config(), seed=2)
