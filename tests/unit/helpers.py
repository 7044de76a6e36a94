"""Small model configs for fast tests."""
from __future__ import annotations

from odl.config import EmbeddingTableConfig, TrainerConfig


def small_cfg(capacity: int = 256, dim: int = 8, hidden: tuple[int, ...] = (16,), **over) -> TrainerConfig:
    table = EmbeddingTableConfig(dim=dim, capacity=capacity, initial_rows=min(64, capacity + 1))
    over.setdefault("batch_size", min(256, capacity))
    return TrainerConfig(tables={"user": table, "item": table}, hidden_units=hidden, **over)
