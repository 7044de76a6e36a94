"""Small model configs for fast tests."""
from __future__ import annotations

from odl.config import EmbeddingTableConfig, TrainerConfig


def small_cfg(capacity: int = 256, dim: int = 8, hidden: tuple[int, ...] = (16,), **over) -> TrainerConfig:
    table = EmbeddingTableConfig(dim=dim, capacity=capacity, initial_rows=min(64, capacity + 1))
    over.setdefault("batch_size", min(256, capacity))
    return TrainerConfig(tables={"user": table, "item": table}, hidden_units=hidden, **over)


def train_local_and_sharded(cfg: TrainerConfig, shards, steps: int, users: int, items: int,
                            seed: int):
    """Train the same random batches into a model with local tables and, through ``shards``
    (a ``ShardedTables``), into a dense-only twin; returns (local model, dense-only model)."""
    import numpy as np

    from trainers.model import Batch, CTRModel
    local, dense_only = CTRModel(cfg), CTRModel(cfg)
    rng = np.random.default_rng(seed)
    d = cfg.embedding_dim
    for step in range(1, steps + 1):
        n = 128
        b = Batch(rng.integers(0, users, n), rng.integers(0, items, n), rng.integers(0, 5, n),
                  rng.integers(0, 24, n), (rng.random(n) < 0.3).astype(np.float32),
                  np.full(n, 1000 * step))
        local.train(b)
        ue = shards.pull("user", b.user_ids, d, b.clock_ms, step, train=True)
        ie = shards.pull("item", b.item_ids, d, b.clock_ms, step, train=True)
        _, g_u, g_i = dense_only.train_on_vectors(b, ue, ie)
        shards.push("user", b.user_ids, g_u, step)
        shards.push("item", b.item_ids, g_i, step)
    return local, dense_only
