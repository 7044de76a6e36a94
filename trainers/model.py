"""The CTR model: sparse embedding tables + an MLP, trained with sparse Adagrad on the tables and
Adam on the dense network.

Embedding lookups are ``tf.gather`` on plain variables and the table update is
``ResourceSparseApplyAdagradV2`` on the de-duplicated rows of the batch, because Keras'
optimisers rewrite whole tables each step (DESIGN.md: 2-4k vs ~100k samples/s).

The network's forward pass (``ctr_logits``) is a pure function of a weight dict, shared by the
trainer and the exporter's serving module, so both compute one model.
"""
from __future__ import annotations

import threading
import zlib
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from odl.config import TrainerConfig

SPARSE_TABLES = ("user", "item")      # large id spaces: live in Redis for serving
NUM_HOURS = 24


class EmbeddingTable:
    """A collision-free id -> row map over a fixed-capacity variable.

    Row 0 is the shared default row; every id gets its own row until the table is full, after
    which new ids share row 0 (counted as overflow).  Issue-level admission/eviction policies plug
    in here.  ``take_delta`` hands the exporter the ids touched since its last call.
    """

    def __init__(self, name: str, capacity: int, dim: int, seed: int, initial_accumulator: float = 0.1):
        self.name, self.capacity, self.dim = name, capacity, dim
        init = tf.random.stateless_normal([capacity, dim], seed=[seed, zlib.crc32(name.encode()) % 1000], stddev=0.05)
        self.var = tf.Variable(init, name=f"{name}_emb")
        self.accum = tf.Variable(tf.fill([capacity, dim], initial_accumulator), name=f"{name}_acc")
        self._rows: dict[int, int] = {}
        self._dirty: set[int] = set()
        self.overflow = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._rows)

    def lookup_rows(self, ids: np.ndarray, admit: bool) -> np.ndarray:
        rows = np.empty(len(ids), dtype=np.int64)
        with self._lock:
            for k, i in enumerate(ids.tolist()):
                r = self._rows.get(i)
                if r is None and admit:
                    if len(self._rows) + 1 < self.capacity:
                        r = self._rows[i] = len(self._rows) + 1
                    else:
                        self.overflow += 1
                rows[k] = r or 0
                if admit and r:
                    self._dirty.add(i)
        return rows

    def take_delta(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, float32 vectors) of rows changed since the previous call; clears the mark."""
        with self._lock:
            ids = np.fromiter(self._dirty, dtype=np.int64, count=len(self._dirty))
            self._dirty = set()
            rows = np.array([self._rows[i] for i in ids.tolist()], dtype=np.int64)
        vecs = tf.gather(self.var, rows).numpy() if len(rows) else np.zeros((0, self.dim), np.float32)
        return ids, vecs.astype(np.float32)


def ctr_logits(w: dict[str, tf.Tensor], user: tf.Tensor, item: tf.Tensor,
               position: tf.Tensor, hour: tf.Tensor) -> tf.Tensor:
    """Forward pass from looked-up user/item vectors and position/hour indices to logits [B]."""
    pos = tf.gather(w["position_emb"], position)
    hr = tf.gather(w["hour_emb"], hour)
    x = tf.concat([user, item, user * item, pos, hr], axis=1)
    n = 0
    while f"dense_{n}/kernel" in w:
        x = tf.nn.relu(tf.matmul(x, w[f"dense_{n}/kernel"]) + w[f"dense_{n}/bias"])
        n += 1
    logit = tf.matmul(x, w["out/kernel"]) + w["out/bias"]
    return tf.squeeze(logit, axis=1) + tf.reduce_sum(user * item, axis=1)


@dataclass
class Batch:
    user_ids: np.ndarray
    item_ids: np.ndarray
    positions: np.ndarray
    hours: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


class CTRModel:
    def __init__(self, cfg: TrainerConfig):
        self.cfg = cfg
        d = cfg.embedding_dim
        self.tables = {t: EmbeddingTable(t, cfg.table_capacity, d, cfg.seed + k)
                       for k, t in enumerate(SPARSE_TABLES)}
        rng = np.random.default_rng(cfg.seed)
        dense: dict[str, np.ndarray] = {
            "position_emb": rng.normal(0, 0.05, (cfg.num_positions + 1, 4)),
            "hour_emb": rng.normal(0, 0.05, (NUM_HOURS, 4)),
        }
        fan_in = 3 * d + 8
        for n, units in enumerate(cfg.hidden_units):
            dense[f"dense_{n}/kernel"] = rng.normal(0, np.sqrt(2.0 / fan_in), (fan_in, units))
            dense[f"dense_{n}/bias"] = np.zeros(units)
            fan_in = units
        dense["out/kernel"] = rng.normal(0, np.sqrt(1.0 / fan_in), (fan_in, 1))
        dense["out/bias"] = np.full(1, -1.5)
        self.dense = {k: tf.Variable(v.astype(np.float32), name=k.replace("/", "_"))
                      for k, v in dense.items()}
        self._dense_list = list(self.dense.values())
        self.dense_opt = tf.keras.optimizers.Adam(cfg.dense_learning_rate)
        self.dense_opt.build(self._dense_list)
        self.step = 0
        self.lock = threading.RLock()

    # --- compiled steps ----------------------------------------------------------------------
    def _inputs(self, batch: Batch, admit: bool):
        u = self.tables["user"].lookup_rows(batch.user_ids, admit)
        i = self.tables["item"].lookup_rows(batch.item_ids, admit)
        pos = np.clip(batch.positions, 0, self.cfg.num_positions).astype(np.int64)
        hr = np.mod(batch.hours, NUM_HOURS).astype(np.int64)
        return u, i, pos, hr

    @tf.function(reduce_retracing=True)
    def _predict(self, u, i, pos, hr):
        return tf.sigmoid(ctr_logits(self.dense, tf.gather(self.tables["user"].var, u),
                                     tf.gather(self.tables["item"].var, i), pos, hr))

    @tf.function(reduce_retracing=True)
    def _train(self, u, i, pos, hr, labels):
        ut, it = self.tables["user"], self.tables["item"]
        with tf.GradientTape() as tape:
            ue, ie = tf.gather(ut.var, u), tf.gather(it.var, i)
            tape.watch([ue, ie])
            logits = ctr_logits(self.dense, ue, ie, pos, hr)
            loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits))
        g_ue, g_ie, *g_dense = tape.gradient(loss, [ue, ie] + self._dense_list)
        self.dense_opt.apply_gradients(zip(g_dense, self._dense_list))
        lr = tf.constant(self.cfg.sparse_learning_rate)
        for table, rows, grad in ((ut, u, g_ue), (it, i, g_ie)):
            uniq, idx = tf.unique(rows)
            summed = tf.math.unsorted_segment_sum(grad, idx, tf.shape(uniq)[0])
            tf.raw_ops.ResourceSparseApplyAdagradV2(
                var=table.var.handle, accum=table.accum.handle, lr=lr, epsilon=tf.constant(1e-7),
                grad=summed, indices=uniq, use_locking=False)
        return loss

    # --- public API --------------------------------------------------------------------------
    def predict(self, batch: Batch) -> np.ndarray:
        """Score without admitting new ids (unknown ids use the default row)."""
        with self.lock:
            return self._predict(*self._inputs(batch, admit=False)).numpy()

    def train(self, batch: Batch) -> float:
        with self.lock:
            u, i, pos, hr = self._inputs(batch, admit=True)
            loss = self._train(u, i, pos, hr, tf.constant(batch.labels, tf.float32))
            self.step += 1
            return float(loss)

    def dense_weights(self) -> dict[str, np.ndarray]:
        with self.lock:
            return {k: v.numpy() for k, v in self.dense.items()}

    def take_embedding_delta(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        with self.lock:
            return {name: t.take_delta() for name, t in self.tables.items()}

    def frozen_copy(self) -> "FrozenModel":
        """An immutable copy of the model as it is now (a baseline that stops learning)."""
        with self.lock:
            tables = {n: (dict(t._rows), t.var.numpy()) for n, t in self.tables.items()}
            return FrozenModel(self.dense_weights(), tables, self.cfg.num_positions, self.step)

    def occupancy(self) -> dict[str, int]:
        return {name: len(t) for name, t in self.tables.items()}


class FrozenModel:
    """A snapshot of a CTRModel that scores but never learns; ids unknown at the snapshot use the
    default row, as they would in a model that stopped being updated."""

    def __init__(self, dense: dict[str, np.ndarray], tables: dict[str, tuple[dict[int, int], np.ndarray]],
                 num_positions: int, step: int):
        self.dense = {k: tf.constant(v) for k, v in dense.items()}
        self.tables = tables
        self.num_positions = num_positions
        self.step = step

    def _vectors(self, table: str, ids: np.ndarray) -> tf.Tensor:
        rows_of, var = self.tables[table]
        rows = np.fromiter((rows_of.get(i, 0) for i in ids.tolist()), dtype=np.int64, count=len(ids))
        return tf.constant(var[rows])

    def predict(self, batch: Batch) -> np.ndarray:
        pos = np.clip(batch.positions, 0, self.num_positions).astype(np.int64)
        hr = np.mod(batch.hours, NUM_HOURS).astype(np.int64)
        logits = ctr_logits(self.dense, self._vectors("user", batch.user_ids),
                            self._vectors("item", batch.item_ids), pos, hr)
        return tf.sigmoid(logits).numpy()
