"""Parameter-server shards as Ray actors: the remote client path trains what local tables train."""
from __future__ import annotations

import os

import numpy as np
import pytest

from odl.ray_util import LOOPBACK_ENV
from tests.unit.helpers import small_cfg, train_local_and_sharded
from trainers.ps import EmbeddingShard, ShardedTables

pytestmark = pytest.mark.slow


@pytest.fixture
def ray_local(tmp_path_factory):
    os.environ.update(LOOPBACK_ENV)
    import ray
    temp = f"/tmp/odl-ray-test-{os.getpid()}"
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, _node_ip_address="127.0.0.1",
             log_to_driver=False, namespace="odl-test")
    try:
        yield ray
    finally:
        ray.shutdown()


def test_shards_as_ray_actors_train_like_local_tables(ray_local):
    cfg = small_cfg(capacity=2000, hidden=(16,))
    Shard = ray_local.remote(EmbeddingShard).options(num_cpus=0)
    shards = ShardedTables([Shard.remote(cfg, k, 2) for k in range(2)], remote=True)
    local, _, scores_local, scores_sharded = train_local_and_sharded(
        cfg, shards, steps=8, users=300, items=100, seed=9)
    np.testing.assert_allclose(scores_sharded, scores_local, atol=1e-5)
    d = cfg.embedding_dim
    for name in ("user", "item"):
        t = local.tables[name]
        ids = np.array(sorted(t._rows), np.int64)
        np.testing.assert_allclose(shards.lookup({name: ids}, d, 0, train=False)[name][0],
                                   t.vectors(t.rows_of(ids)), atol=1e-5)
    rows = sum(o["user"]["rows"] for o in ray_local.get([s.occupancy.remote() for s in shards.shards]))
    assert rows == len(local.tables["user"])
