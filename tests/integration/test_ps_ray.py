"""Parameter-server shards as Ray actors: the remote client path trains what local tables train."""
from __future__ import annotations

import os

import numpy as np
import pytest

from odl.ray_util import LOOPBACK_ENV
from tests.unit.helpers import small_cfg
from trainers.model import Batch, CTRModel
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
    local, dense_only = CTRModel(cfg), CTRModel(cfg)
    rng = np.random.default_rng(9)
    d = cfg.embedding_dim
    for step in range(1, 9):
        n = 128
        b = Batch(rng.integers(0, 300, n), rng.integers(0, 100, n), rng.integers(0, 5, n),
                  rng.integers(0, 24, n), (rng.random(n) < 0.3).astype(np.float32),
                  np.full(n, 1000 * step))
        local.train(b)
        ue = shards.pull("user", b.user_ids, d, b.clock_ms, step, train=True)
        ie = shards.pull("item", b.item_ids, d, b.clock_ms, step, train=True)
        _, g_u, g_i = dense_only.train_on_vectors(b, ue, ie)
        shards.push("user", b.user_ids, g_u, step)
        shards.push("item", b.item_ids, g_i, step)
    for name in ("user", "item"):
        t = local.tables[name]
        ids = np.array(sorted(t._rows), np.int64)
        np.testing.assert_allclose(shards.pull(name, ids, d, 0, 0, train=False),
                                   t.vectors(t.rows_of(ids)), atol=1e-5)
    rows = sum(o["user"]["rows"] for o in ray_local.get([s.occupancy.remote() for s in shards.shards]))
    assert rows == len(local.tables["user"])
