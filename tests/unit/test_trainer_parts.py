import json

import numpy as np

from tests.unit.helpers import small_cfg
from odl.config import SourceConfig
from odl.features import DEFAULT_DENSE, Features, ItemFeatures, UserFeatures
from pipeline.generator import SyntheticWorld
from trainers.metrics import ProgressiveValidator, auc
from trainers.model import Batch, CTRModel
from trainers.align import LabelAligner
from trainers.samples import DedupWindow, decode_records, sample_hash, to_batch


def brute_auc(s, y):
    pos, neg = s[y == 1], s[y == 0]
    return np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])


def test_auc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    s = np.round(rng.random(300), 1)  # many ties
    y = (rng.random(300) < 0.3).astype(float)
    assert abs(auc(s, y) - brute_auc(s, y)) < 1e-12
    assert np.isnan(auc(s, np.zeros(300)))


def test_progressive_window_is_bounded():
    pv = ProgressiveValidator(100)
    pv.add(np.linspace(0, 1, 250), (np.arange(250) % 2).astype(float))
    assert pv.summary()["window"] == 100 and pv.seen == 250


def test_decoding_dedup_and_malformed_samples():
    d = DedupWindow(capacity=3)
    good = {"sample_id": "a", "user_id": 1, "item_id": 2, "position": 0, "hour": 1, "label": 1,
            "impression_ts_ms": 5}
    vals = [json.dumps(good).encode(), json.dumps(good).encode(), b"{oops", json.dumps({"x": 1}).encode(),
            json.dumps({**good, "sample_id": "z", "label": 7}).encode()]
    recs = decode_records([0] * 5, list(range(10, 15)), vals)
    assert recs.valid.tolist() == [True, True, False, False, False]
    assert recs.next_offsets() == {0: 15}                         # malformed records count too
    fresh = d.first_sightings(recs.rows[recs.valid][:, 6])
    assert fresh.tolist() == [True, False]                        # the repeat is dropped
    assert tuple(recs.rows[0].tolist()[:7]) == (1, 2, 0, 1, 1, 5, sample_hash("a"))
    batch = to_batch(recs.rows[:2])
    assert len(batch) == 2 and batch.clock_ms == 5 and to_batch(recs.rows[:0]) is None
    assert batch.dense_features.tolist() == [DEFAULT_DENSE] * 2   # no features: no history
    full, mark = d.state(), d.added
    for sid in "bcd":
        d.seen(sample_hash(sid))
    assert not d.seen(sample_hash("a"))  # evicted from the bounded window (first in, first out)
    # full + the ids added since rebuild the same window
    restored = DedupWindow(capacity=3)
    restored.load(full, mark)
    restored.load(d.state(since_added=mark), d.added, append=True)
    assert restored.state().tolist() == d.state().tolist() and restored.added == d.added


def test_sample_features_survive_decoding_in_bulk_and_one_by_one():
    f = Features(UserFeatures(3, 1, 10, 2), ItemFeatures(40, 2, 0.0625))
    rec = {"sample_id": "f", "user_id": 1, "item_id": 2, "position": 0, "hour": 1, "label": 0,
           "impression_ts_ms": 5, "features": f.to_json()}
    bulk = decode_records([0, 0], [1, 2], [json.dumps(rec).encode(), json.dumps({**rec, "sample_id": "g"}).encode()])
    single = decode_records([0, 0], [1, 2], [json.dumps(rec).encode(), b"{bad"])   # one by one
    for rows in (bulk.rows[:1], single.rows[:1]):
        np.testing.assert_allclose(to_batch(rows).dense_features[0], f.dense(), rtol=1e-6)


def test_model_learns_a_synthetic_preference():
    world = SyntheticWorld(SourceConfig(num_users=50, num_items=40, drift_per_minute=0))
    rng = np.random.default_rng(1)
    model = CTRModel(small_cfg(256, 8, (16,)))
    pv = ProgressiveValidator(4000)

    def batch(n=256):
        u = rng.integers(0, 50, n)
        i = rng.integers(0, 40, n)
        p = np.array([world.click_probability(a, np.array([b]), np.array([0]))[0] for a, b in zip(u, i)])
        return Batch(u, i, np.zeros(n, np.int64), np.zeros(n, np.int64), (rng.random(n) < p).astype(np.float32))

    probe = batch(4000)
    untrained = auc(model.predict(probe), probe.labels)
    for _ in range(150):
        b = batch()
        pv.add(model.predict(b), b.labels)
        model.train(b)
    test = batch(4000)
    learned = auc(model.predict(test), test.labels)
    assert learned > 0.6 and learned > untrained + 0.05, (learned, untrained)
    assert model.step == 150
    w = model.dense_weights()
    assert all(np.all(np.isfinite(v)) for v in w.values())


def test_frozen_copy_scores_like_the_model_then_stops_learning():
    rng = np.random.default_rng(3)
    model = CTRModel(small_cfg(64, 8, (8,)))
    b = Batch(rng.integers(0, 20, 128), rng.integers(0, 20, 128), rng.integers(0, 4, 128),
              rng.integers(0, 24, 128), (rng.random(128) < 0.3).astype(np.float32))
    model.train(b)
    frozen = model.frozen_copy()
    before = frozen.predict(b)
    np.testing.assert_allclose(before, model.predict(b), atol=1e-5)
    for _ in range(10):
        model.train(b)
    assert np.abs(model.predict(b) - before).max() > 1e-3     # the live model moved on
    np.testing.assert_array_equal(frozen.predict(b), before)  # the copy did not


def row(ts, tag):
    return [tag, 0, 0, 0, 0, ts, 0]


def test_label_aligner_releases_in_impression_order_after_the_hold():
    a = LabelAligner(hold_ms=10_000)
    a.add(np.array([row(1_000, 1), row(3_000, 2)]))      # a positive at click time, another
    assert len(a.release()) == 0                          # clock 3 s: both windows still open
    a.add(np.array([row(11_500, 3), row(1_000, 4)]))      # the stream moves on; a late equal time
    assert a.release()[:, 0].tolist() == [1, 4]           # time order, arrival order among equals
    assert len(a) == 2
    snap = a.snapshot()
    b = LabelAligner(hold_ms=10_000)
    b.restore(snap, a.clock_ms)
    for x in (a, b):
        assert x.release(flush=True)[:, 0].tolist() == [2, 3]
        assert len(x) == 0


def test_bad_sample_records_never_break_a_chunk():
    good = {"sample_id": "a", "user_id": 1, "item_id": 2, "position": 0, "hour": 1, "label": 1,
            "impression_ts_ms": 5}
    bad = [{**good, "user_id": 2 ** 63}, {**good, "user_id": 2 ** 70}, {**good, "position": "x"},
           {**good, "label": None}, None, [], {**good, "sample_id": None}, {**good, "sample_id": ""}]
    vals = [json.dumps(good).encode()] + [json.dumps(b).encode() for b in bad] + [b"\xff\xfe"]
    recs = decode_records([0] * len(vals), list(range(len(vals))), vals)
    assert recs.valid.tolist() == [True] + [False] * (len(vals) - 1)
    assert recs.next_offsets() == {0: len(vals)}


def test_paired_figures_stay_consistent_while_another_thread_resets_them():
    """The exporter's thread resets the paired window when a version is served, while the
    heartbeat summarises it.  Here the reset is started in the middle of a summary (while it
    reads the labels): the summary must still pair labels with their own scores."""
    import threading
    from collections import deque

    from trainers.metrics import PairedValidator
    pv = PairedValidator(2000)
    rng = np.random.default_rng(0)
    pv.add(rng.random(807), rng.random(807), (rng.random(807) < 0.3).astype(float))

    class ResetWhileRead(deque):
        armed = True

        def __iter__(self):
            if ResetWhileRead.armed:
                ResetWhileRead.armed = False
                t = threading.Thread(target=pv.reset)
                t.start()
                t.join(0.2)   # with the lock the reset waits for the summary to finish
            return super().__iter__()
    pv.labels = ResetWhileRead(pv.labels, maxlen=2000)
    s = pv.summary()
    assert s["n"] == 807 and 0.0 < s["auc_live"] < 1.0
