"""Trainer checkpoints: atomic, verified, full + increments, retention; a restored model equals
the saved one, optimiser slots included, and full + increments equal a full checkpoint."""
import json

import numpy as np
import pytest

from tests.unit.helpers import small_cfg
from tests.unit.test_embedding import assert_same
from trainers.checkpoint import CheckpointError, CheckpointStore
from trainers.model import Batch, CTRModel


def batch(rng, n=64, ts=0):
    return Batch(rng.integers(0, 300, n), rng.integers(0, 200, n), rng.integers(0, 5, n),
                 rng.integers(0, 24, n), (rng.random(n) < 0.3).astype(np.float32), np.full(n, ts))


def groups(x):
    return {"g": {"a": np.arange(3) + x}}


def test_write_is_atomic_and_verified(tmp_path):
    store = CheckpointStore(tmp_path, keep_full=2)
    full = store.write("full", groups(0), {"step": 1}, base=None)
    assert full.path.name == "ckpt-00000001-full" and not list(tmp_path.glob(".tmp-*"))
    inc = store.write("incr", groups(1), {"step": 2}, base=full.seq)
    chain = store.restore_chain()
    assert [c.seq for c, _ in chain] == [1, 2]
    np.testing.assert_array_equal(chain[1][1]["g"]["a"], [1, 2, 3])
    with pytest.raises(ValueError):
        store.write("incr", groups(2), {}, base=None)
    # a failing write leaves nothing behind
    with pytest.raises(TypeError):
        store.write("full", {"g": {"a": object()}}, {"step": 3}, base=None)
    assert not list(tmp_path.glob(".tmp-*")) and len(store.list()) == 2
    # a flipped byte is detected, and the restore stops before that increment
    data = (inc.path / "g.npz").read_bytes()
    (inc.path / "g.npz").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="checksum"):
        store.read(inc)
    assert [c.seq for c, _ in store.restore_chain()] == [1]


def test_restore_follows_base_links_and_falls_back_to_an_older_full(tmp_path):
    store = CheckpointStore(tmp_path, keep_full=3)
    f1 = store.write("full", groups(0), {}, None)
    i2 = store.write("incr", groups(1), {}, f1.seq)
    i3 = store.write("incr", groups(2), {}, i2.seq)
    (i3.path / "g.npz").unlink()                     # damaged increment ...
    i4 = store.write("incr", groups(3), {}, i2.seq)  # ... a restored trainer extended i2 instead
    assert [c.seq for c, _ in store.restore_chain()] == [1, 2, 4]
    f5 = store.write("full", groups(5), {}, None)
    (f5.path / "manifest.json").write_text("{broken")
    assert [c.seq for c, _ in store.restore_chain()] == [1, 2, 4]   # newest full unusable
    assert i4.seq == 4 and f5.seq == 5


def test_retention_keeps_the_last_k_full_chains(tmp_path):
    store = CheckpointStore(tmp_path, keep_full=2)
    for k in range(4):
        f = store.write("full", groups(k), {}, None)
        store.write("incr", groups(k), {}, f.seq)
    assert [(c.seq, c.kind) for c in store.list()] == [(5, "full"), (6, "incr"), (7, "full"), (8, "incr")]


def test_model_state_round_trip_includes_slots_and_increments(tmp_path):
    cfg = small_cfg(capacity=150, sparse_optimizer="adam")
    rng = np.random.default_rng(0)
    model = CTRModel(cfg)
    for s in range(5):
        model.train(batch(rng, ts=s * 1000))
    store = CheckpointStore(tmp_path)
    full = store.write("full", model.state(), {}, None)
    mark = model.step
    for s in range(5, 12):   # more steps, with LFU evictions (capacity 150 < 300 users)
        model.train(batch(rng, ts=s * 1000))
    assert model.tables["user"].stats.evicted_lfu > 0
    store.write("incr", model.state(since=mark), {}, full.seq)

    restored = CTRModel(cfg)
    for k, (_, g) in enumerate(store.restore_chain()):
        restored.load(g, increment=k > 0)
    direct = CTRModel(cfg)
    direct.load(model.state())
    for other in (restored, direct):
        assert other.step == model.step and other.clock_ms == model.clock_ms
        for name in model.tables:
            assert_same(model.tables[name], other.tables[name])
        for k, v in model.dense.items():
            np.testing.assert_array_equal(v.numpy(), other.dense[k].numpy())
        for a, b in zip(model.dense_opt.variables, other.dense_opt.variables):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    # and they keep training identically
    b = batch(rng, ts=20_000)
    model.train(b)
    restored.train(b)
    np.testing.assert_allclose(model.predict(b), restored.predict(b), atol=1e-6)


def test_a_different_network_refuses_the_checkpoint():
    a = CTRModel(small_cfg(hidden=(16,)))
    b = CTRModel(small_cfg(hidden=(16, 8)))
    with pytest.raises((ValueError, KeyError)):
        b.load(a.state())


def test_manifest_is_readable_json(tmp_path):
    store = CheckpointStore(tmp_path)
    info = store.write("full", groups(0), {"positions": {"0": 12}}, None)
    m = json.loads((info.path / "manifest.json").read_text())
    assert m["meta"]["positions"] == {"0": 12} and set(m["files"]) == {"g.npz"}


def test_a_checkpoint_of_another_model_is_a_clear_startup_error(tmp_path):
    from tests.conftest import make_config
    from trainers.streaming import StreamingTrainer, checkpoint_dir
    cfg = make_config(tmp_path, trainer={"hidden_units": [8], "tables": {
        "user": {"dim": 4}, "item": {"dim": 4}}})
    model = CTRModel(cfg.trainer)
    CheckpointStore(checkpoint_dir(cfg, "trainer-0")).write(
        "full", {**model.state(), "stream": {}}, {"positions": {}}, None)
    bigger = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"hidden_units": (16,)})})
    with pytest.raises(RuntimeError, match="does not fit this model"):
        StreamingTrainer(bigger)
