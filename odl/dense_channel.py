"""Dense-weight refreshes between versions, through Redis (``names.dense_refresh``).

The exporter writes the trainer's dense weights every ``dense_interval_s`` as one hash (a
sequence number, the version they refine, the trainer step and the weights as npz bytes); a
replica that serves exactly that version applies them in place (the optimised SavedModel's
``apply_weights`` signature, which also recomputes the CallGraphOp cache) without a reload.
Refreshes never cross versions: a replica pinned to another version ignores them.
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass

import numpy as np
import redis

from odl import names
from odl.redis_conn import atomic


@dataclass(frozen=True)
class DenseRefresh:
    seq: int
    base_version: str
    trainer_step: int
    created_at: float
    weights: dict[str, np.ndarray]


def encode(weights: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v, np.float32) for k, v in weights.items()})
    return buf.getvalue()


def decode(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob)) as z:
        return {k: z[k] for k in z.files}


def publish(r: redis.Redis, model: str, base_version: str, trainer_step: int,
            weights: dict[str, np.ndarray]) -> int:
    """Write a refresh; returns its sequence number (one MULTI, so readers see it whole)."""
    key = names.dense_refresh(model)
    seq = int(r.hincrby(key, "next_seq", 1))
    pipe = atomic(r, key)
    pipe.hset(key, mapping={"seq": seq, "base_version": base_version, "trainer_step": trainer_step,
                            "created_at": time.time(), "weights": encode(weights)})
    pipe.execute()
    return seq


def head(r: redis.Redis, model: str) -> tuple[int, str | None]:
    """(seq, base_version) of the newest refresh without its weights; (0, None) if none."""
    seq, base = r.hmget(names.dense_refresh(model), ["seq", "base_version"])
    return (int(seq), base.decode()) if seq else (0, None)


def read(r: redis.Redis, model: str) -> DenseRefresh | None:
    """The newest refresh; ``r`` must return bytes (``decode_responses=False``)."""
    h = r.hgetall(names.dense_refresh(model))
    if b"seq" not in h:
        return None
    return DenseRefresh(int(h[b"seq"]), h[b"base_version"].decode(), int(h[b"trainer_step"]),
                        float(h[b"created_at"]), decode(h[b"weights"]))
