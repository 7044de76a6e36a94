"""Publishing embedding rows to Redis as binary float32 vectors, in chunked MSETs.

Key layout is in ``odl.names`` (one hash tag per table, so a chunk is one slot on Redis Cluster).
Each push bumps the table's generation in its meta hash; serving reads the dim from there.
"""
from __future__ import annotations

import numpy as np
import redis

from odl import names

CHUNK = 5000


def push_rows(r: redis.Redis, table: str, ids: np.ndarray, vectors: np.ndarray) -> int:
    """Write rows and bump the table's generation; returns the new generation."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    for start in range(0, len(ids), CHUNK):
        chunk_ids = ids[start:start + CHUNK]
        mapping = {names.emb_key(table, int(i)): vectors[start + k].tobytes()
                   for k, i in enumerate(chunk_ids.tolist())}
        r.mset(mapping)
    pipe = r.pipeline(transaction=True)
    pipe.hset(names.emb_meta(table), mapping={"dim": vectors.shape[1] if vectors.ndim == 2 else 0,
                                              "dtype": "float32"})
    pipe.hincrby(names.emb_meta(table), "generation", 1)
    pipe.hincrby(names.emb_meta(table), "rows_pushed", len(ids))
    return int(pipe.execute()[1])


def delete_rows(r: redis.Redis, table: str, ids: np.ndarray) -> int:
    """Delete evicted ids' vectors (serving then falls back to the default); returns deleted."""
    n = 0
    for start in range(0, len(ids), CHUNK):
        n += int(r.delete(*[names.emb_key(table, int(i)) for i in ids[start:start + CHUNK]]))
    return n


def fetch_rows(r: redis.Redis, table: str, ids: list[int], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(vectors [n, dim] float32, found mask [n]); missing rows are zeros (the default)."""
    out = np.zeros((len(ids), dim), dtype=np.float32)
    found = np.zeros(len(ids), dtype=bool)
    for start in range(0, len(ids), CHUNK):
        keys = [names.emb_key(table, int(i)) for i in ids[start:start + CHUNK]]
        for k, raw in enumerate(r.mget(keys)):
            if raw is not None and len(raw) == 4 * dim:
                out[start + k] = np.frombuffer(raw, dtype=np.float32)
                found[start + k] = True
    return out, found


def count_rows(r: redis.Redis, table: str) -> int:
    n = 0
    for _ in r.scan_iter(match=names.emb_key(table, "*"), count=10000):
        n += 1
    return n - (1 if r.exists(names.emb_meta(table)) else 0)
