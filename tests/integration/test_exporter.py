"""The exporter against a real redis-server and model store: cadences, the quality gate, the
hot-set bound, generations and rollback.  The trainer is a real ``CTRModel`` in this process
behind the exporter's two trainer calls (the Ray path is covered by the stack test)."""
import math

import numpy as np
import pytest
import redis
import tensorflow as tf

from exporters import savedmodel
from odl import dense_channel
from exporters.exporter import Exporter, Schedule
from odl.model_store import CachePolicy
from odl.embedding_store import EmbeddingReader, Pointer
from odl.control import ControlPlane
from odl.features import DEFAULT_DENSE
from serving.model import ModelHolder
from tests.conftest import make_config
from tests.integration.helpers import DIM, LocalTrainer, Log
from tests.unit.helpers import small_cfg
from trainers.model import CTRModel

pytestmark = pytest.mark.slow
NAMES = ("user_emb", "item_emb", "position", "hour", "features")


@pytest.fixture
def setup(tmp_path, redis_port):
    redis.Redis(port=redis_port).flushall()
    tc = small_cfg(4096, DIM, (8,), batch_norm=True)   # BatchNorm: weight-only sub-graphs to cache
    cfg = make_config(tmp_path, redis={"port": redis_port}, trainer=tc.model_dump(),
                      exporter={"min_samples_per_version": 0, "retire_generation_after_s": 0.01})
    trainer = LocalTrainer(CTRModel(tc))
    trainer.train()
    r = redis.Redis(port=redis_port)
    ex = Exporter(cfg, trainer, ControlPlane(cfg), Log(), r=r)
    return cfg, trainer, ex, r


def _predict(ex: Exporter, version: int, users, items) -> np.ndarray:
    """What a replica serving ``version`` answers now: rows from Redis, the version's graph."""
    fn = tf.saved_model.load(str(ex.store.path(version))).signatures["serving_default"]
    return fn(**dict(zip(NAMES, map(tf.constant, _inputs(ex.r, users, items)))))["probability"].numpy()


def test_versions_carry_manifest_graph_and_snapshot(setup):
    cfg, trainer, ex, r = setup
    v1 = ex.publish_version()
    assert v1 == 1 and ex.hot.active is not None
    m = ex.store.manifest(1)
    assert m["parent"] is None and m["trainer_step"] == trainer.model.step
    assert m["kafka_offsets"] == {"samples:0": 640} and m["embedding_generation"] == ex.hot.active
    assert m["graph"]["signatures"]["serve"]["cached_tensors"] and m["cache_policy"]["every_n_calls"] == 1000
    assert m["embedding_rows"]["user"] == trainer.model.tables["user"].occupancy()["rows"]
    assert ex.publish_version() is None                       # nothing new trained: no version
    trainer.train()
    assert ex.publish_version() == 2 and ex.store.manifest(2)["parent"] == "1"
    assert [m["version"] for m in ex.cp.versions()] == ["1", "2"]
    assert [h["event"] for h in ex.store.history()] == ["published", "published"]
    loaded = tf.saved_model.load(str(ex.store.path(2)))
    assert {"serving_default", "apply_weights", "refresh_cache"} <= set(loaded.signatures)


def test_redis_restarted_empty_gets_the_set_and_the_registry_back(setup):
    cfg, trainer, ex, r = setup
    assert ex.publish_version() == 1
    trainer.train()
    assert ex.publish_version() == 2
    r.flushall()                                              # Redis restarted without persistence
    assert ex.check_set()                                     # seen: the set is written again...
    assert [m["version"] for m in ex.cp.versions()] == ["1", "2"]   # ...the registry refilled
    assert ex.cp.latest_version() == "2" and ex.store.manifest(2) == ex.cp.versions()[1]
    assert ex.resync("redis-restarted") > 0 and Pointer.read(r) is not None
    assert ex.reregister() == 0                               # not twice


def test_deltas_and_dense_refreshes_follow_training(setup):
    cfg, trainer, ex, r = setup
    ex.publish_version()
    reader = EmbeddingReader(r, pointer_ttl_s=0)
    before, _ = reader.fetch("user", [1, 2, 3], DIM)
    trainer.train()
    assert ex.push_deltas() > 0
    after, found = reader.fetch("user", [1, 2, 3], DIM)
    assert found.all() and not np.allclose(before, after)
    ids, vectors = trainer.model.export_snapshot(True)["embeddings"]["user"]
    row = {int(i): v for i, v in zip(ids, vectors)}
    np.testing.assert_array_equal(after, np.stack([row[1], row[2], row[3]]))
    seq = ex.publish_dense()
    refresh = dense_channel.read(r, cfg.serving.model_name)
    assert seq == refresh.seq == 1 and refresh.base_version == "1"
    assert refresh.trainer_step == trainer.model.step
    w = trainer.model.dense_weights()
    for k, v in w.items():
        np.testing.assert_allclose(refresh.weights[k], v, rtol=1e-6)
    assert ex.publish_dense() is None                        # same step: nothing new to refresh
    # a replica serving version 1 applies it in place: the new weights' predictions, no reload
    holder = ModelHolder(ex.store, ex.cp)
    assert holder.refresh() and holder.current.version == "1"
    loaded_before = holder.current
    args = _inputs(r, [1, 2, 3], [4, 5, 6])
    old = holder.current.predict(*args)
    assert holder.refresh_dense(r) and holder.current is loaded_before
    assert holder.current.refresh_seq == 1 and not holder.refresh_dense(r)
    savedmodel.save(refresh.weights, DIM, ex.store.dir / "plain")
    plain = tf.saved_model.load(str(ex.store.dir / "plain")).signatures["serving_default"]
    want = plain(**dict(zip(NAMES, map(tf.constant, args))))["probability"].numpy()
    got = holder.current.predict(*args)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(got - old).max() > 1e-6
    # the periodic cache refresh runs in the model poll under the write lock, never in a request
    m = holder.current
    m.cache.policy = CachePolicy(every_n_calls=2, every_s=1e9)
    before = m.cache.refreshes
    for _ in range(3):
        m.predict(*args)
    assert m.cache.refreshes == before and m.cache.due
    assert holder.maintain() and m.cache.refreshes == before + 1 and not m.cache.due
    np.testing.assert_allclose(m.predict(*args), want, atol=1e-5)
    ex.cp.pin_version("1")
    trainer.train()
    ex.publish_version(pinned="1")                           # version 2, refreshes now refine 2
    ex.publish_dense()
    assert not holder.refresh_dense(r)                       # pinned to 1: not applied


def _inputs(r, users, items):
    reader = EmbeddingReader(r, pointer_ttl_s=0)
    return (reader.fetch("user", users, DIM)[0], reader.fetch("item", items, DIM)[0],
            np.zeros(len(users), np.int64), np.zeros(len(users), np.int64),
            np.tile(np.asarray(DEFAULT_DENSE, np.float32), (len(users), 1)))


def test_gate_refuses_nan_and_regressed_models_with_reasons(setup):
    cfg, trainer, ex, r = setup
    assert ex.publish_version() == 1
    trainer.train()
    trainer.metrics["auc"] = 0.60                             # served version had 0.70
    assert ex.publish_version() is None
    trainer.model.dense["out/bias"].assign([math.nan])        # a diverged model
    trainer.metrics["auc"] = 0.75
    trainer.train(1)
    assert ex.publish_version() is None
    refused = ex.cp.refused()
    assert "worse than the served version's 0.7000" in refused[1]["reason"]
    assert "non-finite" in refused[0]["reason"]
    assert [h["event"] for h in ex.store.history()] == ["published", "refused", "refused"]
    assert ex.store.versions() == [1] and ex.refused == 2
    assert ex.publish_dense() is None                        # refreshes pass the same gate
    assert dense_channel.read(r, cfg.serving.model_name) is None


def test_rollback_restores_the_versions_embeddings_and_predictions(setup):
    cfg, trainer, ex, r = setup
    users, items = list(range(0, 280, 7)), list(range(0, 200, 5))
    ex.publish_version()
    recorded = _predict(ex, 1, users, items)
    gen1 = ex.hot.active
    for _ in range(3):
        trainer.train()
        ex.push_deltas()
    ex.publish_version()
    assert np.abs(_predict(ex, 1, users, items) - recorded).max() > 1e-4  # the rows moved on
    ex.cp.pin_version("1")
    assert ex.tick(Schedule(1, 5, 30), paused=True) == "paused"  # restores even while paused
    p = Pointer.read(r)
    assert p.generation > gen1 and p.source == "rollback:1" and ex.restored_for == "1"
    np.testing.assert_allclose(_predict(ex, 1, users, items), recorded, atol=1e-6)
    trainer.train()
    assert ex.tick(Schedule(1, 5, 30), paused=False) == "pinned"  # no deltas over the restore
    np.testing.assert_allclose(_predict(ex, 1, users, items), recorded, atol=1e-6)
    ex.cp.pin_version(None)
    ex.tick(Schedule(1, 5, 30), paused=False)                  # unpinned: resync from the trainer
    assert Pointer.read(r).source == "unpinned" and ex.restored_for is None
    assert ex.store.history()[-1]["event"] in ("published", "restored")


def test_hot_set_is_bounded_by_recency_and_memory_reported(setup):
    cfg, trainer, ex, r = setup
    ex.hot.max_rows = 100
    ex.push_deltas()                                         # first push: a full resync
    assert len(ex.hot.index["user"]) <= 100
    trainer.train(2, users=50)                               # users 0..49 are the recent ones
    ex.push_deltas()
    reader = EmbeddingReader(r, pointer_ttl_s=0)
    _, found = reader.fetch("user", list(range(50)), DIM)
    assert found.all()
    assert reader.count("user") == len(ex.hot.index["user"]) <= 100 and ex.hot.evicted > 0
    mem = ex.probe()
    assert mem["redis_used_memory_bytes"] > 0 and mem["hot_rows_user"] <= 100
    assert mem["hot_bytes_user"] >= 32 * mem["hot_rows_user"]  # at least the vectors' bytes


def test_generations_switch_atomically_and_orphans_are_dropped(setup):
    cfg, trainer, ex, r = setup
    ex.push_deltas()
    old = ex.hot.active
    ex.hot.begin()                                          # a crashed exporter's half-built set
    ex.hot.push("user", np.array([1]), np.ones((1, DIM)))
    orphan = ex.hot.building
    ex.hot.building = None
    ex.resync()
    assert Pointer.read(r).generation == ex.hot.active != old
    assert ex.hot.drop_orphans() == [orphan]
    ex.hot.collect(force=True)
    left = {k.split(b":")[2] for k in r.scan_iter(match="{odl:emb:g*", count=1000)}
    assert left == {f"g{ex.hot.active}".encode()}
    # a restarted exporter retires its predecessor's generation once its own is active
    again = Exporter(cfg, trainer, ex.cp, Log(), r=r)
    assert again.hot.drop_orphans() == []
    again.push_deltas()
    again.hot.collect(force=True)
    left = {k.split(b":")[2] for k in r.scan_iter(match="{odl:emb:g*", count=1000)}
    assert left == {f"g{again.hot.active}".encode()} and again.hot.active != ex.hot.active


def _poison(trainer, user: int, value: float) -> None:
    """Make one trained user row poisoned (huge or NaN) and mark it changed at a new step."""
    t = trainer.model.tables["user"]
    row = int(t.rows_of(np.array([user]))[0])
    assert row > 0
    t.var[row].assign(np.full(DIM, value, np.float32))
    trainer.model.step += 1
    t.version[row] = trainer.model.step


def test_gate_checks_every_delta_and_a_refusal_freezes_publishing(setup):
    cfg, trainer, ex, r = setup
    assert ex.publish_version() == 1
    reader = EmbeddingReader(r, pointer_ttl_s=0)
    served, _ = reader.fetch("user", [1, 2], DIM)
    trainer.train()
    _poison(trainer, 1, 1e6)                                 # a poisoned row among good ones
    assert ex.push_deltas() == 0                             # nothing of the delta is written
    np.testing.assert_array_equal(reader.fetch("user", [1, 2], DIM)[0], served)
    assert "longer than exporter.gate_max_row_norm" in ex.cp.frozen()["reason"]
    assert ex.tick(Schedule(1, 5, 30), paused=False) == "frozen"   # deltas and dense held
    assert ex.publish_dense() is None and dense_channel.read(r, cfg.serving.model_name) is None
    assert ex.publish_version() is None                      # the version carries the row too
    assert ex.probe()["frozen"] and ex.store.versions() == [1]
    # the operator lifts the freeze; the row is still poisoned: refused again, not written
    ex.cp.resume("exporter")
    ex.tick(Schedule(1000, 1000, 1000), paused=False)
    assert ex.cp.frozen() is not None
    np.testing.assert_array_equal(reader.fetch("user", [1, 2], DIM)[0], served)
    # the trainer's row recovers (a restore, a fix): the next version passes, lifts the freeze
    # and pushes the held rows, user 2's included
    _poison(trainer, 1, 0.01)
    trainer.train()
    assert ex.publish_version() == 2 and ex.cp.frozen() is None and ex.frozen is None
    ids, vectors = trainer.model.export_snapshot(True)["embeddings"]["user"]
    want = {int(i): v for i, v in zip(ids, vectors)}
    np.testing.assert_array_equal(reader.fetch("user", [2], DIM)[0], want[2][None])
    assert ex.push_deltas() >= 0 and ex.publish_dense() is not None


def test_a_refused_version_freezes_until_one_passes_or_skip_gate(setup):
    cfg, trainer, ex, r = setup
    assert ex.publish_version() == 1
    trainer.train()
    trainer.metrics["auc"] = 0.60                            # served version had 0.70
    assert ex.publish_version() is None and ex.frozen is None   # quality: refused, not frozen
    ex.cfg = cfg.model_copy(update={"exporter": cfg.exporter.model_copy(
        update={"freeze_on_regression": True})})
    trainer.train()
    assert ex.publish_version() is None and ex.frozen["what"] == "version 2"
    reader = EmbeddingReader(r, pointer_ttl_s=0)
    before, _ = reader.fetch("user", [1, 2, 3], DIM)
    trainer.train()
    assert ex.push_deltas() == 0                             # the regressed model's rows held
    np.testing.assert_array_equal(reader.fetch("user", [1, 2, 3], DIM)[0], before)
    assert ex.publish_version(skip_gate=True) == 2 and ex.frozen is None
    assert not np.allclose(reader.fetch("user", [1, 2, 3], DIM)[0], before)
