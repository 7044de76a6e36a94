"""Small model configs for fast tests."""
from __future__ import annotations

from odl.config import EmbeddingTableConfig, TrainerConfig


class FakeClock:
    """A monotonic clock a test moves by hand (``clock.t += 60``)."""

    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def small_cfg(capacity: int = 256, dim: int = 8, hidden: tuple[int, ...] = (16,), **over) -> TrainerConfig:
    table = EmbeddingTableConfig(dim=dim, capacity=capacity, initial_rows=min(64, capacity + 1))
    over.setdefault("batch_size", min(256, capacity))
    return TrainerConfig(tables={"user": table, "item": table}, hidden_units=hidden, **over)


def train_local_and_sharded(cfg: TrainerConfig, shards, steps: int, users: int, items: int,
                            seed: int):
    """Score and train the same random batches with local tables and through ``shards`` (a
    ``ShardedTables``); returns (local model, sharded model, scores local, scores sharded)."""
    import numpy as np

    from trainers.model import Batch, CTRModel
    from trainers.ps import ShardedCTRModel
    local, sharded = CTRModel(cfg), ShardedCTRModel(cfg, shards)
    rng = np.random.default_rng(seed)
    got_local, got_sharded = [], []
    for step in range(1, steps + 1):
        n = 128
        b = Batch(rng.integers(0, users, n), rng.integers(0, items, n), rng.integers(0, 5, n),
                  rng.integers(0, 24, n), (rng.random(n) < 0.3).astype(np.float32),
                  np.full(n, 1000 * step))
        got_local.append(local.score_and_train(b)[0])
        got_sharded.append(sharded.score_and_train(b)[0])
    return local, sharded, np.concatenate(got_local), np.concatenate(got_sharded)
