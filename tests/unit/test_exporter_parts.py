"""Exporter pieces that need no server: row codec, hot-set index, snapshots and history in the
model store, the dense-refresh encoding and the publishing schedule."""
import time

import numpy as np
import pytest

from odl import dense_channel
from exporters.exporter import Schedule
from odl.embedding_store import Codec, HotIndex
from odl.model_store import Manifest, ModelStore


@pytest.mark.parametrize("dtype,tol", [("float32", 0.0), ("float16", 1e-3)])
def test_codec_round_trips_rows(dtype, tol):
    codec = Codec(dtype, 8)
    vecs = np.random.default_rng(1).normal(size=(5, 8)).astype(np.float32)
    raw = codec.encode(vecs)
    assert [len(b) for b in raw] == [codec.row_bytes] * 5
    assert codec.row_bytes == 8 * (4 if dtype == "float32" else 2)
    out, found = np.zeros((6, 8), np.float32), np.zeros(6, bool)
    codec.decode_into(raw + [None], out, found)
    assert found.tolist() == [True] * 5 + [False]
    np.testing.assert_allclose(out[:5], vecs, rtol=tol, atol=tol)
    assert not out[5].any()


def test_codec_rejects_bad_shapes_and_dtypes():
    with pytest.raises(ValueError, match="dtype"):
        Codec("int8", 4)
    with pytest.raises(ValueError, match=r"\[n, 4\]"):
        Codec("float32", 4).encode(np.zeros((3, 5)))
    out, found = np.zeros((1, 4), np.float32), np.zeros(1, bool)
    Codec("float32", 4).decode_into([b"short"], out, found)   # a foreign value is a miss
    assert not found[0]


def test_hot_index_names_the_least_recently_updated_rows():
    idx = HotIndex()
    idx.touch(list(range(100)))        # tick 1
    idx.touch(list(range(50, 120)))    # tick 2: 50..119 are fresh
    assert len(idx) == 120
    assert len(idx.over(200)) == 0
    cold = idx.over(100, slack=0.1)    # keep 90: evict 30 of the 50 rows only touched at tick 1
    assert len(cold) == 30 and set(cold.tolist()) <= set(range(50))
    idx.forget(cold.tolist())
    assert len(idx) == 90


def test_store_keeps_snapshots_and_history(tmp_path):
    store = ModelStore(tmp_path, "ctr")
    rows = {"user": (np.array([3, 9]), np.ones((2, 4), np.float32)),
            "item": (np.array([5]), np.full((1, 4), 2.0, np.float32))}
    m = Manifest(version="1", parent=None, trainer_step=1, kafka_offsets={}, metrics={},
                 embedding_generation=4)
    store.publish(1, lambda p: p.mkdir(), m, embeddings=rows)
    man = store.manifest(1)
    assert man["embedding_snapshot"] == "embeddings" and man["embedding_rows"] == {"user": 2, "item": 1}
    snap = store.snapshot(1)
    np.testing.assert_array_equal(snap["user"][0], [3, 9])
    np.testing.assert_array_equal(snap["item"][1], rows["item"][1])
    store.publish(2, lambda p: p.mkdir(), Manifest("2", "1", 2, {}, {}, None))
    with pytest.raises(KeyError, match="no embedding snapshot"):
        store.snapshot(2)
    store.record("published", version=1)
    store.record("refused", version=2, reason="AUC")
    with open(store.dir / "history.jsonl", "a") as f:
        f.write('{"event": "cut mid-wri')                       # a crash mid-line
    assert [h["event"] for h in store.history()] == ["published", "refused"]


def test_dense_refresh_encoding_round_trips():
    w = {"dense_0/kernel": np.arange(6, dtype=np.float32).reshape(2, 3), "out/bias": np.ones(1)}
    back = dense_channel.decode(dense_channel.encode(w))
    assert set(back) == set(w)
    np.testing.assert_array_equal(back["dense_0/kernel"], w["dense_0/kernel"])


def test_schedule_orders_versions_before_dense_before_deltas():
    s = Schedule(delta_s=1, dense_s=5, version_s=30)
    now = time.monotonic()
    assert s.due(now) == "delta"
    assert s.due(now + 6) == "dense" and s.due(now + 7) == "delta"
    assert s.due(now + 31) == "version"
    assert s.due(now + 31.5) == "dense"   # the dense refresh due since t+11 comes next


def test_read_write_lock_lets_a_waiting_writer_through_a_stream_of_readers():
    import threading

    from serving.model import ReadWriteLock
    lock, stop, wrote = ReadWriteLock(), threading.Event(), threading.Event()
    inside = [0]

    def reader():
        while not stop.is_set():
            with lock.read():
                inside[0] += 1
                time.sleep(0.001)
    readers = [threading.Thread(target=reader) for _ in range(4)]
    for t in readers:
        t.start()
    time.sleep(0.05)

    def writer():
        with lock.write():
            wrote.set()
    w = threading.Thread(target=writer)
    w.start()
    assert wrote.wait(2.0), "the writer starved"
    stop.set()
    for t in readers + [w]:
        t.join()
    assert inside[0] > 0
