"""Parameter-server shards compute what one table computes: a model trained through 3 shards
(pull vectors, dense step, push summed gradients) equals a model with local tables, step for
step; and ids spread over the shards by hash."""
import numpy as np
import pytest

from tests.unit.helpers import small_cfg, train_local_and_sharded
from trainers.ps import EmbeddingShard, ShardedTables, shard_of


def test_ids_spread_evenly_over_shards():
    counts = np.bincount(shard_of(np.arange(30_000), 3), minlength=3)
    assert counts.min() > 9_500                       # sequential ids do not pile up


@pytest.mark.parametrize("optimizer", ["adagrad", "adam", "ftrl"])
def test_sharded_training_equals_local_tables(optimizer):
    cfg = small_cfg(capacity=2000, sparse_optimizer=optimizer, hidden=(16,))
    cfg = cfg.model_copy(update={"tables": {n: t.model_copy(update={"admit_min_count": 2})
                                            for n, t in cfg.tables.items()}})
    shards = ShardedTables([EmbeddingShard(cfg, k, 3) for k in range(3)])
    local, sharded, scores_local, scores_sharded = train_local_and_sharded(
        cfg, shards, steps=15, users=400, items=150, seed=4)
    # progressive validation scores the same (new ids score with the default row in both)
    np.testing.assert_allclose(scores_sharded, scores_local, atol=1e-5)
    d = cfg.embedding_dim
    for name in ("user", "item"):
        ids = np.array(sorted(local.tables[name]._rows), np.int64)
        t = local.tables[name]
        np.testing.assert_allclose(shards.lookup({name: ids}, d, 0, train=False)[name][0],
                                   t.vectors(t.rows_of(ids)), atol=1e-5)
        # not admitted locally (seen once) -> not admitted in the shards either: default zeros
        unknown = np.setdiff1d(np.arange(400 if name == "user" else 150), ids)
        assert np.allclose(shards.lookup({name: unknown}, d, 0, train=False)[name][0], 0)
        assert sharded.occupancy()[name]["rows"] == len(t)
    for k, v in local.dense.items():
        np.testing.assert_allclose(sharded.dense[k].numpy(), v.numpy(), atol=1e-5)
