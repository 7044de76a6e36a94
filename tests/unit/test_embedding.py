"""Dynamic embedding tables: no collisions, growth, admission, TTL and LFU eviction, deltas,
state round trips; and the sparse optimisers against dense reference formulas."""
import numpy as np
import pytest
import tensorflow as tf

from odl.config import EmbeddingTableConfig
from trainers import sparse_optim
from trainers.embedding import DynamicEmbedding, initial_vectors


def table(**cfg) -> DynamicEmbedding:
    base = dict(dim=4, initial_rows=4, capacity=1000)
    return DynamicEmbedding("t", EmbeddingTableConfig(**{**base, **cfg}), sparse_optim.Adagrad(0.1), seed=3)


def test_every_id_gets_its_own_row_and_the_table_grows():
    t = table()
    ids = np.random.default_rng(0).choice(10**15, 700, replace=False)  # ids far beyond any modulo
    rows = t.lookup_train(ids, 1000, step=1)
    assert len(set(rows.tolist())) == 700 and 0 not in rows           # collision-free
    assert t.allocated >= 701 and t.stats.grown >= 8                   # 4 -> ... -> 1024
    np.testing.assert_array_equal(t.rows_of(ids), rows)
    assert t.rows_of(np.array([-5]))[0] == 0                           # unknown: default row
    vecs = t.vectors(rows)
    np.testing.assert_allclose(vecs, initial_vectors(ids, 4, 3, 0.05))  # init depends on id only
    assert np.allclose(t.vectors(np.array([0])), 0)                     # default row is zeros


def test_initial_vectors_are_normal_and_deterministic():
    v = initial_vectors(np.arange(20000), 8, 1, 0.05)
    assert abs(v.mean()) < 1e-3 and abs(v.std() - 0.05) < 1e-3
    np.testing.assert_array_equal(v[:5], initial_vectors(np.arange(5), 8, 1, 0.05))
    assert not np.allclose(v[:5], initial_vectors(np.arange(5), 8, 2, 0.05))


def test_admission_after_k_sightings():
    t = table(admit_min_count=3)
    assert t.lookup_train(np.array([7, 7]), 0, 1).tolist() == [0, 0]   # 2 sightings: default
    assert t.stats.default_lookups == 2 and len(t) == 0
    r = t.lookup_train(np.array([7, 8]), 0, 2)
    assert r[0] > 0 and r[1] == 0 and len(t) == 1                       # 3rd sighting admits


def test_probabilistic_admission_rate_and_replay():
    t1, t2 = table(admit_probability=0.25), table(admit_probability=0.25)
    ids = np.arange(4000)
    a = t1.lookup_train(ids, 0, 1)
    b = t2.lookup_train(ids, 0, 1)
    np.testing.assert_array_equal(a > 0, b > 0)            # same ids, same decisions
    assert 0.2 < (a > 0).mean() < 0.3


def test_filter_is_bounded():
    t = table(admit_min_count=5, filter_capacity=100)
    for k in range(10):
        t.lookup_train(np.arange(k * 50, k * 50 + 50), k, k + 1)
    assert len(t._pending) <= 100


def test_ttl_eviction_in_event_time_and_deltas():
    t = table(ttl_s=60)
    t.lookup_train(np.array([1, 2, 3]), 0, step=1)
    t.lookup_train(np.array([3, 4]), 50_000, step=2)
    ids, rows, removed, complete = t.changed_since(1)
    assert sorted(ids.tolist()) == [3, 4] and complete and len(removed) == 0
    assert t.expire(90_000, step=3) == 2                                  # 1, 2 not seen for 90 s
    assert (t.rows_of(np.array([1, 2, 3, 4])) > 0).tolist() == [False, False, True, True]
    _, _, removed, _ = t.changed_since(2)
    assert sorted(removed.tolist()) == [1, 2] and t.stats.evicted_ttl == 2
    t.lookup_train(np.array([1]), 95_000, step=4)                         # re-admitted: an upsert
    ids, _, removed, _ = t.changed_since(2)
    assert ids.tolist() == [1] and removed.tolist() == [2]


def test_lfu_eviction_at_capacity_keeps_the_frequent_and_the_current_batch():
    t = table(capacity=128, initial_rows=8)
    hot = np.arange(10)
    for s in range(5):
        t.lookup_train(hot, 0, step=s + 1)
    t.lookup_train(np.arange(100, 218), 0, step=6)                        # fills 128 rows exactly
    assert len(t) == 128 and t.stats.evicted_lfu == 0
    batch = np.arange(1000, 1010)
    rows = t.lookup_train(batch, 0, step=7)
    assert (rows > 0).all() and len(set(rows.tolist())) == 10 and len(t) <= 128
    assert (t.rows_of(hot) > 0).all()                                     # frequent rows stay
    assert t.stats.evicted_lfu >= 10
    assert t.allocated == 129                                             # never beyond the cap


def test_an_eviction_never_takes_a_row_the_same_batch_uses():
    t = table(capacity=128, initial_rows=8)
    t.lookup_train(np.arange(100, 228), 0, step=1)       # full; all equal, so the lowest ids go first
    before = t.rows_of(np.array([100, 101]))
    # id 5 is new and sorts first: making room for it must not evict 100 and 101, which this
    # batch trains (they would come back as fresh rows, their learned vectors lost)
    rows = t.lookup_train(np.array([101, 5, 100]), 0, step=2)
    np.testing.assert_array_equal(rows[[2, 0]], before)
    assert t.rows_of(np.array([102, 103])).tolist() == [0, 0]    # the next least used went instead
    assert t.stats.evicted_lfu == 2 and rows[1] > 0


def test_capacity_smaller_than_a_batch_is_a_clear_error():
    t = table(capacity=4, initial_rows=2)
    with pytest.raises(RuntimeError, match="capacity"):
        t.lookup_train(np.arange(10), 0, 1)


def test_state_round_trip_and_increment_equal_full():
    t = table(admit_min_count=2, ttl_s=100)
    rng = np.random.default_rng(1)
    for s in range(1, 6):
        rows = t.lookup_train(rng.integers(0, 60, 40), s * 10_000, step=s)
        t.var.scatter_nd_update(rows[:, None], rng.normal(size=(40, 4)).astype(np.float32))
    full = t.state()
    for s in range(6, 9):
        t.lookup_train(rng.integers(40, 90, 30), s * 40_000, step=s)
        t.expire(s * 40_000, step=s)
    inc = t.state(since=5)
    restored = table(admit_min_count=2, ttl_s=100)
    restored.load(full)
    restored.load(inc, increment=True)
    assert_same(t, restored)
    again = table(admit_min_count=2, ttl_s=100)
    again.load(t.state())
    assert_same(t, again)


def assert_same(a: DynamicEmbedding, b: DynamicEmbedding) -> None:
    ids = np.array(sorted(a._rows), np.int64)
    assert sorted(b._rows) == ids.tolist()
    ra, rb = a.rows_of(ids), b.rows_of(ids)
    np.testing.assert_array_equal(a.vectors(ra), b.vectors(rb))
    for s in a.slots:
        np.testing.assert_array_equal(tf.gather(a.slots[s], ra).numpy(), tf.gather(b.slots[s], rb).numpy())
    np.testing.assert_array_equal(a.freq[ra], b.freq[rb])
    np.testing.assert_array_equal(a.last_seen[ra], b.last_seen[rb])
    assert a._pending == b._pending


@pytest.mark.parametrize("kind", ["adagrad", "adam", "ftrl"])
def test_sparse_optimisers_touch_only_the_batch_rows(kind):
    opt = sparse_optim.make(kind, 0.1)
    n, d = 8, 3
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(n, d)).astype(np.float32)
    var = tf.Variable(w0)
    slots = {s: tf.Variable(np.full((n, d), opt.slot_init(s), np.float32)) for s in opt.slot_names}
    rows = tf.constant([1, 5], tf.int64)
    g = rng.normal(size=(2, d)).astype(np.float32)
    opt.apply(var, slots, rows, tf.constant(g), tf.constant(1, tf.int64))
    w = var.numpy()
    untouched = [r for r in range(n) if r not in (1, 5)]
    np.testing.assert_array_equal(w[untouched], w0[untouched])
    if kind == "adagrad":
        acc = 0.1 + g ** 2
        expect = w0[[1, 5]] - 0.1 * g / (np.sqrt(acc) + 1e-7)
    elif kind == "adam":
        m, v = 0.1 * g, 0.001 * g ** 2
        lr_t = 0.1 * np.sqrt(1 - 0.999) / (1 - 0.9)
        expect = w0[[1, 5]] - lr_t * m / (np.sqrt(v) + 1e-7)
    else:  # FTRL-proximal with l1 = l2 = 0: w = -z / (sqrt(n) / lr)
        acc = 0.1 + g ** 2
        sigma = (np.sqrt(acc) - np.sqrt(0.1)) / 0.1
        z = g - sigma * w0[[1, 5]]
        expect = -z / (np.sqrt(acc) / 0.1)
    np.testing.assert_allclose(w[[1, 5]], expect, rtol=1e-4, atol=1e-5)


def test_unknown_optimizer_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown sparse optimizer"):
        sparse_optim.make("sgdx", 0.1)
