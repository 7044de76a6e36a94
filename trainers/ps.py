"""Parameter-server shards for scaled-out training: the embedding tables split by id hash.

Shard k of S owns, for every table, the ids with ``shard_of(id, S) == k`` as a
``DynamicEmbedding`` with ``capacity / S`` rows and the same seed as an unsharded table: ids get
the same initial vectors, admission decisions and optimiser updates wherever they live, so S
shards compute what one table would (``tests/unit/test_ps.py`` checks this step for step).

A trainer pulls the vectors of a batch's ids (admitting them), runs the dense step on them
(``CTRModel.train_on_vectors``) and pushes the gradients back, summed per id.  ``ShardedTables``
is that client; its shards are ``EmbeddingShard`` objects in-process or Ray actor handles running
the same class (``remote=True``).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from odl.config import TrainerConfig
from trainers import sparse_optim
from trainers.embedding import DynamicEmbedding, splitmix64
from trainers.model import SPARSE_TABLES


def shard_of(ids: np.ndarray, shards: int) -> np.ndarray:
    """The shard of each id: a hash, not ``id % S`` (sequential ids would pile up otherwise)."""
    return (splitmix64(np.asarray(ids, np.int64).astype(np.uint64)) % np.uint64(shards)).astype(np.int64)


class EmbeddingShard:
    def __init__(self, cfg: TrainerConfig, index: int, count: int):
        self.index, self.count = index, count
        opt = sparse_optim.make(cfg.sparse_optimizer, cfg.sparse_learning_rate)
        self.tables = {}
        for k, name in enumerate(SPARSE_TABLES):
            tc = cfg.tables[name]
            part = tc.model_copy(update={"capacity": max(1, -(-tc.capacity // count))})
            self.tables[name] = DynamicEmbedding(name, part, opt, cfg.seed * 1000 + k)
        self._apply = {name: self._compile(t) for name, t in self.tables.items()}

    @staticmethod
    def _compile(t: DynamicEmbedding):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.int64),
                                      tf.TensorSpec([None, t.dim], tf.float32),
                                      tf.TensorSpec([], tf.int64)])
        def apply(rows, grads, step):
            t.opt.apply(t.var, t.slots, rows, grads, step)
        return apply

    def pull(self, table: str, ids: np.ndarray, clock_ms: int, step: int, train: bool) -> np.ndarray:
        """Vectors of ``ids`` (all of this shard, repeats allowed); ``train`` admits and counts."""
        t = self.tables[table]
        rows = t.lookup_train(ids, clock_ms, step) if train else t.rows_of(ids)
        return t.vectors(rows)

    def push(self, table: str, ids: np.ndarray, grads: np.ndarray, step: int) -> None:
        """Apply summed gradients of unique ``ids``; ids without a row (not admitted) are skipped."""
        t = self.tables[table]
        with t.lock:
            rows = t.rows_of(ids)
            keep = rows > 0
            if keep.any():
                self._apply[table](tf.constant(rows[keep]), tf.constant(grads[keep], tf.float32),
                                   tf.constant(step, tf.int64))

    def occupancy(self) -> dict[str, dict[str, int]]:
        return {name: t.occupancy() for name, t in self.tables.items()}

    def state(self, since: int | None = None) -> dict[str, dict[str, np.ndarray]]:
        return {f"table_{name}": t.state(since) for name, t in self.tables.items()}

    def load(self, state: dict[str, dict[str, np.ndarray]], increment: bool = False) -> None:
        for name, t in self.tables.items():
            t.load(state[f"table_{name}"], increment=increment)


class ShardedTables:
    """A trainer's view of the shards: split a batch's ids by shard, gather, scatter back."""

    def __init__(self, shards: list[Any], remote: bool = False):
        self.shards, self.remote = shards, remote

    def _call(self, shard, method: str, *args):
        return getattr(shard, method).remote(*args) if self.remote else getattr(shard, method)(*args)

    def _wait(self, results: list) -> list:
        if not self.remote:
            return results
        import ray
        return ray.get(results)

    def pull(self, table: str, ids: np.ndarray, dim: int, clock_ms: int, step: int,
             train: bool) -> np.ndarray:
        """Vectors [len(ids), dim] for ``ids`` in their order.  Each shard gets its ids with their
        repeats: a sighting counts once per occurrence, as in a local table."""
        ids = np.asarray(ids, np.int64)
        owner = shard_of(ids, len(self.shards))
        parts = [np.nonzero(owner == k)[0] for k in range(len(self.shards))]
        calls = [self._call(s, "pull", table, ids[p], clock_ms, step, train)
                 for s, p in zip(self.shards, parts) if len(p)]
        out = np.zeros((len(ids), dim), np.float32)
        for p, vecs in zip([p for p in parts if len(p)], self._wait(calls)):
            out[p] = vecs
        return out

    def push(self, table: str, ids: np.ndarray, grads: np.ndarray, step: int) -> None:
        """Sum per-sample gradients per id and send each shard its part."""
        uniq, inverse = np.unique(np.asarray(ids, np.int64), return_inverse=True)
        summed = np.zeros((len(uniq), grads.shape[1]), np.float32)
        np.add.at(summed, inverse, grads)
        owner = shard_of(uniq, len(self.shards))
        calls = []
        for k, s in enumerate(self.shards):
            p = np.nonzero(owner == k)[0]
            if len(p):
                calls.append(self._call(s, "push", table, uniq[p], summed[p], step))
        self._wait(calls)
