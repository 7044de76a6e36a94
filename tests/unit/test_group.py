"""Training-group parts without Ray: partition assignment, the dense averager, the commit record,
epoch-aware checkpoint restore, and shard checkpoints (restore equals the saved state)."""
import numpy as np
import pytest

from odl.config import Config, TrainerScaleConfig
from tests.conftest import make_config
from tests.unit.helpers import small_cfg, train_local_and_sharded
from trainers.checkpoint import CheckpointError, CheckpointStore
from trainers.group import DenseAverager, GroupCommit, partitions_for
from trainers.ps import EmbeddingShard, ShardedTables


def test_partitions_are_disjoint_and_cover_the_topic():
    got = [partitions_for(i, 3, 8) for i in range(3)]
    assert got == [[0, 3, 6], [1, 4, 7], [2, 5]]
    with pytest.raises(ValueError):
        partitions_for(0, 5, 4)


def test_scale_config_is_validated():
    with pytest.raises(ValueError, match="ps_shards"):
        TrainerScaleConfig(trainers=2, ps_shards=0)
    with pytest.raises(ValueError, match="no partition"):
        Config.model_validate({"kafka": {"partitions": 2}, "trainer": {"scale": {"trainers": 3, "ps_shards": 1}}})
    assert not TrainerScaleConfig().grouped and TrainerScaleConfig(ps_shards=1).grouped


def test_averager_returns_the_mean_of_each_trainers_latest_weights():
    avg = DenseAverager(2)
    a = {"w": np.array([1.0, 3.0], np.float32)}
    assert np.allclose(avg.exchange(0, a)["w"], [1.0, 3.0])        # alone so far
    got = avg.exchange(1, {"w": np.array([3.0, 5.0], np.float32)})
    assert np.allclose(got["w"], [2.0, 4.0]) and got["w"].dtype == np.float32
    got = avg.exchange(0, {"w": np.array([5.0, 5.0], np.float32)})  # replaces trainer 0's copy
    assert np.allclose(got["w"], [4.0, 5.0])
    with pytest.raises(ValueError):
        avg.exchange(2, a)


def test_commit_record_round_trip_and_shape_check(tmp_path):
    cfg = make_config(tmp_path)
    assert GroupCommit.read(cfg) is None
    GroupCommit(7, 2, 3).write(cfg)
    got = GroupCommit.read(cfg)
    assert (got.epoch, got.trainers, got.ps_shards) == (7, 2, 3)
    got.check_shape(2, 3, GroupCommit.path(cfg))
    with pytest.raises(RuntimeError, match="2 trainers and 3 shards"):
        got.check_shape(4, 3, GroupCommit.path(cfg))
    GroupCommit.path(cfg).write_text("{not json")
    with pytest.raises(RuntimeError, match="unreadable"):
        GroupCommit.read(cfg)


def test_restore_chain_ends_at_the_committed_epoch(tmp_path):
    store = CheckpointStore(tmp_path)
    g = {"a": {"x": np.arange(3)}}
    full = store.write("full", g, {"epoch": 1}, None)
    inc = store.write("incr", g, {"epoch": 2}, full.seq)
    store.write("incr", g, {"epoch": 3}, inc.seq)              # written, never committed
    with pytest.raises(CheckpointError, match="epoch 2"):
        store.restore_chain(2)                                  # epoch 3 still there
    assert len(store.discard_after(2)) == 1
    assert [c.meta["epoch"] for c, _ in store.restore_chain(2)] == [1, 2]
    store.discard_after(None)
    assert store.list() == []


def test_shard_checkpoints_restore_the_saved_state(tmp_path):
    cfg = small_cfg(capacity=2000, sparse_optimizer="adam")
    shards = [EmbeddingShard(cfg, k, 2, tmp_path / f"ps-{k}") for k in range(2)]
    tables = ShardedTables(shards)
    train_local_and_sharded(cfg, tables, steps=6, users=300, items=100, seed=1)
    for s in shards:
        s.checkpoint(1, "full")
    train_local_and_sharded(cfg, tables, steps=4, users=300, items=100, seed=2)
    for s in shards:
        assert s.checkpoint(2, "incr")["kind"] == "incr"
    before = [s.state() for s in shards]
    train_local_and_sharded(cfg, tables, steps=3, users=300, items=100, seed=3)
    for s in shards:
        s.checkpoint(3, "incr")                                  # never committed
    for k, s in enumerate(shards):
        back = EmbeddingShard(cfg, k, 2, tmp_path / f"ps-{k}", epoch=2)
        want, got = before[k], back.state()
        assert int(got["shard"]["version"]) == int(want["shard"]["version"])
        for table in ("table_user", "table_item"):
            order_w, order_g = np.argsort(want[table]["ids"]), np.argsort(got[table]["ids"])
            np.testing.assert_array_equal(got[table]["ids"][order_g], want[table]["ids"][order_w])
            for key in ("vectors", "slot_m", "slot_v", "freq", "last_seen"):
                np.testing.assert_allclose(got[table][key][order_g], want[table][key][order_w])
        assert [c.meta["epoch"] for c in back.store.list()] == [1, 2]


def test_step_gate_answers_back_to_back_holds_of_a_loop_still_parked():
    """A release followed at once by the next hold (a scheduled group checkpoint, then the one at
    stop) must not wait for a loop that never left its park: it answers the new request."""
    import threading
    import time

    from trainers.loop import StepGate
    gate, stop, steps = StepGate("t"), threading.Event(), [0]

    def loop():
        while not stop.is_set():
            if gate.requested:
                gate.park(stop.is_set)
                continue
            steps[0] += 1
            time.sleep(0.001)
        gate.end()

    t = threading.Thread(target=loop)
    t.start()
    try:
        for _ in range(50):
            gate.hold(timeout_s=5)
            assert gate.parked
            frozen = steps[0]
            time.sleep(0.002)
            assert steps[0] == frozen                 # no step while held
            gate.release()                            # ... and the next hold at once
        assert not gate.parked
    finally:
        stop.set()
        t.join(5)
    with pytest.raises(TimeoutError, match="its loop ended"):
        gate.hold(timeout_s=5)
