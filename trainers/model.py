"""The CTR model: dynamic embedding tables (``trainers.embedding``) feeding a DCN-v2 network --
cross layers beside a deep tower (BatchNorm optional) -- plus a wide part: per-id first-order
weights and a factorisation-machine term (``id_terms``).

Tables are updated by a sparse optimiser (``trainers.sparse_optim``) on the batch's unique rows
only, each row by the summed gradients of its own samples; the network by Keras Adam on the batch
mean.  Delayed-feedback samples are importance-weighted (``trainers.delayed_feedback``).
Embedding lookups are ``tf.gather`` on plain variables (DESIGN.md: ``keras.layers.Embedding``
is 5x slower after sparse writes).

The forward pass (``forward``) is a pure function of a weight dict, shared by the trainer and the
exporter's serving module, so both compute one model.  BatchNorm uses batch statistics while
training and the moving averages (ordinary entries of the weight dict) when serving.
"""
from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import numpy as np
import tensorflow as tf

from odl.config import TrainerConfig
from odl.features import DEFAULT_DENSE, NUM_DENSE
from trainers import delayed_feedback, sparse_optim
from trainers.embedding import DynamicEmbedding

SPARSE_TABLES = ("user", "item")      # large id spaces: live in Redis for serving
NUM_HOURS = 24
SMALL_EMB_DIM = 4
BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3


def deep_layers(w: dict) -> int:
    n = 0
    while f"dense_{n}/kernel" in w:
        n += 1
    return n


def cross_layers(w: dict) -> int:
    n = 0
    while f"cross_{n}/kernel" in w:
        n += 1
    return n


def forward(w: dict[str, tf.Tensor], user: tf.Tensor, item: tf.Tensor, position: tf.Tensor,
            hour: tf.Tensor, features: tf.Tensor, training: bool = False,
            dense=tf.matmul) -> tuple[tf.Tensor, dict[str, tuple]]:
    """Logits [B] from looked-up user/item vectors, position/hour indices and the real-time
    features [B, NUM_DENSE] (``odl.features.Features.dense``), and, when training, the batch
    moments of every BatchNorm (to update its moving averages).

    Inputs may carry extra leading axes (candidate scoring: [B, C, d] vectors, [B, C] indices,
    logits [B, C]) when ``dense`` multiplies on the last axis, as Keras's Dense does on rank-3
    input (``dense_last_axis``: tensordot, which ``exporters.graph.passes`` simplifies)."""
    x0 = tf.concat([user, item, user * item, tf.gather(w["position_emb"], position),
                    tf.gather(w["hour_emb"], hour), features], axis=-1)
    logit, moments = dcn_head(w, x0, training, dense)
    return logit + id_terms(user, item), moments


def dcn_head(w: dict[str, tf.Tensor], x0: tf.Tensor, training: bool = False,
             dense=tf.matmul) -> tuple[tf.Tensor, dict[str, tuple]]:
    """The network over the concatenated inputs ``x0`` [..., width]: DCN-v2 cross layers beside
    a deep tower (BatchNorm where the weights have it), one output unit; logits [...] and, when
    training, the BatchNorm batch moments.  Shared by every model shape (``trainers.spec_model``)."""
    x = x0
    for n in range(cross_layers(w)):        # DCN-v2: x <- x0 * (W x + b) + x
        x = x0 * (dense(x, w[f"cross_{n}/kernel"]) + w[f"cross_{n}/bias"]) + x
    h, moments = x0, {}
    for n in range(deep_layers(w)):
        h = dense(h, w[f"dense_{n}/kernel"]) + w[f"dense_{n}/bias"]
        bn = f"bn_{n}"
        if f"{bn}/gamma" in w:
            if training:
                mean, var = tf.nn.moments(h, axes=[0])
                moments[bn] = (mean, var)
            else:
                mean, var = w[f"{bn}/moving_mean"], w[f"{bn}/moving_variance"]
            h = tf.nn.batch_normalization(h, mean, var, w[f"{bn}/beta"], w[f"{bn}/gamma"], BN_EPSILON)
        h = tf.nn.relu(h)
    logit = dense(tf.concat([x, h], axis=-1), w["out/kernel"]) + w["out/bias"]
    return tf.squeeze(logit, axis=-1), moments


def id_terms(user: tf.Tensor, item: tf.Tensor) -> tf.Tensor:
    """The wide part of the model: each id's first-order weight plus the FM pairwise term.

    Component 0 of every id's vector is that id's first-order weight (a per-user and per-item
    bias, what a logistic regression over one-hot ids learns); the other components meet in the
    factorisation-machine product.  Keeping the bias inside the vector keeps one row per id in
    every contract (tables, checkpoints, Redis, serving inputs)."""
    return user[..., 0] + item[..., 0] + tf.reduce_sum(user[..., 1:] * item[..., 1:], axis=-1)


def dense_last_axis(x: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    """``x @ kernel`` on the last axis of an input of any rank (what Keras Dense does)."""
    return tf.tensordot(x, kernel, axes=1)


def ctr_logits(w: dict[str, tf.Tensor], user: tf.Tensor, item: tf.Tensor,
               position: tf.Tensor, hour: tf.Tensor, features: tf.Tensor) -> tf.Tensor:
    """Serving-time logits (BatchNorm on its moving averages)."""
    return forward(w, user, item, position, hour, features, training=False)[0]


def init_dense(cfg: TrainerConfig) -> dict[str, np.ndarray]:
    """Initial network weights; sizes from config (seeded: the same config gives the same net)."""
    rng = np.random.default_rng(cfg.seed)
    d = cfg.embedding_dim
    w: dict[str, np.ndarray] = {
        "position_emb": rng.normal(0, 0.05, (cfg.num_positions + 1, SMALL_EMB_DIM)),
        "hour_emb": rng.normal(0, 0.05, (NUM_HOURS, SMALL_EMB_DIM)),
    }
    w.update(init_head(cfg, 3 * d + 2 * SMALL_EMB_DIM + NUM_DENSE, rng))
    return {k: v.astype(np.float32) for k, v in w.items()}


def init_head(cfg: TrainerConfig, width: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Initial weights of ``dcn_head`` over inputs of ``width``."""
    w: dict[str, np.ndarray] = {}
    for n in range(cfg.cross_layers):
        w[f"cross_{n}/kernel"] = rng.normal(0, np.sqrt(1.0 / width), (width, width)) * 0.1
        w[f"cross_{n}/bias"] = np.zeros(width)
    fan_in = width
    for n, units in enumerate(cfg.hidden_units):
        w[f"dense_{n}/kernel"] = rng.normal(0, np.sqrt(2.0 / fan_in), (fan_in, units))
        w[f"dense_{n}/bias"] = np.zeros(units)
        if cfg.batch_norm:
            w[f"bn_{n}/gamma"] = np.ones(units)
            w[f"bn_{n}/beta"] = np.zeros(units)
            w[f"bn_{n}/moving_mean"] = np.zeros(units)
            w[f"bn_{n}/moving_variance"] = np.ones(units)
        fan_in = units
    out_in = width + (cfg.hidden_units[-1] if cfg.hidden_units else width)
    w["out/kernel"] = rng.normal(0, np.sqrt(1.0 / out_in), (out_in, 1))
    w["out/bias"] = np.full(1, -1.5)
    return {k: v.astype(np.float32) for k, v in w.items()}


def weighted_loss(labels: tf.Tensor, logits: tf.Tensor, delayed: tf.Tensor) -> tf.Tensor:
    """Batch-mean log-loss, delayed-feedback samples importance-weighted (FNW)."""
    weights = delayed_feedback.fnw_weights(labels, logits, delayed)
    return tf.reduce_mean(weights * tf.nn.sigmoid_cross_entropy_with_logits(labels=labels,
                                                                            logits=logits))


def update_moving_moments(w: dict[str, tf.Variable], moments: dict[str, tuple]) -> None:
    """BatchNorm moving averages from a training step's batch moments."""
    for bn, (mean, var) in moments.items():
        for stat, value in (("moving_mean", mean), ("moving_variance", var)):
            v = w[f"{bn}/{stat}"]
            v.assign(BN_MOMENTUM * v + (1.0 - BN_MOMENTUM) * value)


def is_trainable(name: str) -> bool:
    return not name.endswith(("/moving_mean", "/moving_variance"))


@dataclass
class Batch:
    user_ids: np.ndarray
    item_ids: np.ndarray
    positions: np.ndarray
    hours: np.ndarray
    labels: np.ndarray
    ts_ms: np.ndarray | None = None   # impression event time (the tables' clock)
    features: np.ndarray | None = None   # [n, NUM_DENSE] float32; None: no history for anyone
    delayed: np.ndarray | None = None    # [n] 1.0: a delayed-feedback sample (importance-weighted)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def dense_features(self) -> np.ndarray:
        if self.features is None:
            return np.tile(np.asarray(DEFAULT_DENSE, np.float32), (len(self.labels), 1))
        return np.asarray(self.features, np.float32).reshape(len(self.labels), NUM_DENSE)

    def context(self, num_positions: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Position and hour indices and the real-time features: everything but the ids."""
        pos = np.clip(self.positions, 0, num_positions).astype(np.int64)
        hr = np.mod(self.hours, NUM_HOURS).astype(np.int64)
        return pos, hr, self.dense_features

    @property
    def delayed_mask(self) -> np.ndarray:
        """[n] float32, 1.0 for delayed-feedback samples (``trainers.delayed_feedback``)."""
        if self.delayed is None:
            return np.zeros(len(self.labels), np.float32)
        return np.asarray(self.delayed, np.float32).reshape(len(self.labels))

    @property
    def clock_ms(self) -> int:
        return int(self.ts_ms.max()) if self.ts_ms is not None and len(self.ts_ms) else 0


class LearnedState:
    """What every in-process model shares (``CTRModel``, ``trainers.spec_model.SpecModel``):
    progressive scoring, TTL expiry, the exporter's change feed, occupancy, and the checkpoint
    state -- dense weights, dense optimiser slots, every table, step and clock, all from one
    moment.  Needs ``tables``, ``dense``, ``dense_opt``, ``step``, ``clock_ms``,
    ``incarnation`` and ``lock``; ``predict`` and ``train`` are the model's own."""

    def _init_shadow(self) -> None:
        """The served dense weights (``set_shadow``): scored with this model's live rows, which
        is what serving runs -- the version's or last refresh's network over the rows in Redis
        (the gate compares candidate and served on the same samples)."""
        self.shadow = {k: tf.Variable(v.read_value(), name=f"shadow_{k.replace('/', '_')}",
                                      trainable=False) for k, v in self.dense.items()}
        self.has_shadow = False

    def set_shadow(self, weights: dict[str, np.ndarray]) -> None:
        """Install the served dense weights (a published version's or refresh's)."""
        with self.lock:
            for k, v in weights.items():
                self.shadow[k].assign(v)
            self.has_shadow = True

    def score_and_train(self, batch: Batch) -> tuple[np.ndarray, float]:
        """Progressive validation: the batch's scores before the update, then the update."""
        with self.lock:
            return self.predict(batch), self.train(batch)

    def export_snapshot(self, embeddings: bool = False) -> dict[str, Any]:
        """What the exporter publishes, from one step: dense weights and, with ``embeddings``,
        every table's rows ({table: (ids, vectors)})."""
        with self.lock:
            rows = ({t: (c["ids"], c["vectors"]) for t, c in self.embedding_changes(0)[1].items()}
                    if embeddings else None)
            return {"weights": self.dense_weights(), "step": self.step, "embeddings": rows}

    def flush(self) -> None:
        """Make every update so far visible to other readers (a no-op for in-process tables)."""

    def expire(self) -> int:
        """Evict rows past their tables' TTL at the model's event-time clock."""
        with self.lock:
            return sum(t.expire(self.clock_ms, self.step) for t in self.tables.values())

    def dense_weights(self) -> dict[str, np.ndarray]:
        with self.lock:
            return {k: v.numpy() for k, v in self.dense.items()}

    def embedding_changes(self, since: Mark | int) -> tuple[Mark, dict[str, dict]]:
        """(mark, {table: {ids, vectors, removed, complete}}) for rows changed after the mark
        ``since`` (0: everything); pass the returned mark next time.  Taken under the model
        lock: one step.  After a restore every row comes back with ``complete: False``."""
        with self.lock:
            return table_changes(self.tables, since, self.incarnation, self.step, self.clock_ms)

    def occupancy(self) -> dict[str, dict[str, int]]:
        return {name: t.occupancy() for name, t in self.tables.items()}

    # --- state (checkpoints) -----------------------------------------------------------------
    def state(self, since: int | None = None) -> dict[str, dict[str, np.ndarray]]:
        """Dense weights, dense optimiser slots and every table (or, with ``since``, the rows
        changed after that step), all from one moment: the caller holds ``lock``."""
        with self.lock:
            out = {"dense": self.dense_weights(),
                   "dense_opt": {str(k): v.numpy() for k, v in enumerate(self.dense_opt.variables)},
                   "model": {"step": np.array(self.step, np.int64),
                             "clock_ms": np.array(self.clock_ms, np.int64)}}
            for name, t in self.tables.items():
                out[f"table_{name}"] = t.state(since)
            return out

    def load(self, state: dict[str, dict[str, np.ndarray]], increment: bool = False) -> None:
        with self.lock:
            for k, v in state["dense"].items():
                self.dense[k].assign(v)
            opt_vars = self.dense_opt.variables
            if len(state["dense_opt"]) != len(opt_vars):
                raise ValueError(f"checkpoint has {len(state['dense_opt'])} dense optimiser "
                                 f"variables, the model {len(opt_vars)}: a different network")
            for k, v in enumerate(opt_vars):
                v.assign(state["dense_opt"][str(k)])
            for name, t in self.tables.items():
                t.load(state[f"table_{name}"], increment=increment)
            self.step = int(state["model"]["step"])
            self.clock_ms = int(state["model"]["clock_ms"])
            self.incarnation = new_incarnation()
            for t in self.tables.values():
                t.forget_history(self.step)


class CTRModel(LearnedState):
    def __init__(self, cfg: TrainerConfig):
        self.cfg = cfg
        self.sparse_opt = sparse_optim.make(cfg.sparse_optimizer, cfg.sparse_learning_rate)
        self.tables = self._make_tables()
        self.dense = {k: tf.Variable(v, name=k.replace("/", "_"), trainable=is_trainable(k))
                      for k, v in init_dense(cfg).items()}
        self._trainable = [v for k, v in self.dense.items() if is_trainable(k)]
        self.dense_opt = tf.keras.optimizers.Adam(cfg.dense_learning_rate)
        self.dense_opt.build(self._trainable)
        self.step = 0
        self.clock_ms = 0
        self.incarnation = new_incarnation()
        self._init_shadow()
        self.lock = threading.RLock()

    def _make_tables(self) -> dict[str, DynamicEmbedding]:
        """The embedding tables this model trains in-process (none when they live in shards)."""
        return {t: DynamicEmbedding(t, self.cfg.tables[t], self.sparse_opt, self.cfg.seed * 1000 + k)
                for k, t in enumerate(SPARSE_TABLES)}

    # --- compiled steps ----------------------------------------------------------------------
    def _context(self, batch: Batch):
        return batch.context(self.cfg.num_positions)

    # shape-generic signatures: a partial batch must not retrace (~0.4 s each)
    _IDX = tf.TensorSpec([None], tf.int64)
    _FEAT = tf.TensorSpec([None, NUM_DENSE], tf.float32)

    @tf.function(input_signature=[_IDX, _IDX, _IDX, _IDX, _FEAT])
    def _predict(self, u, i, pos, hr, ft):
        return tf.sigmoid(ctr_logits(self.dense, tf.gather(self.tables["user"].var, u),
                                     tf.gather(self.tables["item"].var, i), pos, hr, ft))

    @tf.function(input_signature=[_IDX, _IDX, _IDX, _IDX, _FEAT])
    def _predict_shadow(self, u, i, pos, hr, ft):
        return tf.sigmoid(ctr_logits(self.shadow, tf.gather(self.tables["user"].var, u),
                                     tf.gather(self.tables["item"].var, i), pos, hr, ft))

    def predict_shadow(self, batch: Batch) -> np.ndarray | None:
        """The served dense weights' scores over the live rows, before this batch trains (None
        without a shadow, or with the tables in shards)."""
        if not self.has_shadow or not self.tables:
            return None
        with self.lock:
            u = self.tables["user"].rows_of(batch.user_ids)
            i = self.tables["item"].rows_of(batch.item_ids)
            return self._predict_shadow(u, i, *self._context(batch)).numpy()

    def _dense_step(self, ue, ie, pos, hr, ft, labels, delayed):
        """Forward, backward and the dense update on looked-up vectors; returns (loss, gradients
        of the user and item vectors).  Traced into both training functions below.

        The loss is the batch mean, so the network's step does not depend on the batch size;
        the vectors' gradients are scaled back to per-sample sums: an id's row then moves by
        its own samples' gradients, as a per-id weight does in a logistic regression, instead
        of by their 1/batch share (with the mean, ids learned ~100x slower at batch 256 and
        the model lost to an item-popularity counter -- docs/training.md)."""
        with tf.GradientTape() as tape:
            tape.watch([ue, ie])
            logits, moments = forward(self.dense, ue, ie, pos, hr, ft, training=True)
            loss = weighted_loss(labels, logits, delayed)
        g_ue, g_ie, *g_dense = tape.gradient(loss, [ue, ie] + self._trainable)
        n = tf.cast(tf.shape(labels)[0], tf.float32)
        g_ue, g_ie = g_ue * n, g_ie * n
        self.dense_opt.apply_gradients(zip(g_dense, self._trainable))
        update_moving_moments(self.dense, moments)
        return loss, g_ue, g_ie

    _VAL = tf.TensorSpec([None], tf.float32)

    @tf.function(input_signature=[_IDX, _IDX, _IDX, _IDX, _FEAT, _VAL, _VAL,
                                  tf.TensorSpec([], tf.int64)])
    def _train(self, u, i, pos, hr, ft, labels, delayed, step):
        ut, it = self.tables["user"], self.tables["item"]
        loss, g_ue, g_ie = self._dense_step(tf.gather(ut.var, u), tf.gather(it.var, i), pos, hr, ft,
                                            labels, delayed)
        for table, rows, grad in ((ut, u, g_ue), (it, i, g_ie)):
            uniq, idx = tf.unique(rows)
            summed = tf.math.unsorted_segment_sum(grad, idx, tf.shape(uniq)[0])
            keep = uniq > 0   # row 0 is the shared default: never trained
            table.opt.apply(table.var, table.slots, tf.boolean_mask(uniq, keep),
                            tf.boolean_mask(summed, keep), step)
        return loss

    _VEC = tf.TensorSpec([None, None], tf.float32)

    @tf.function(input_signature=[_VEC, _VEC, _IDX, _IDX, _FEAT, _VAL, _VAL])
    def _train_on_vectors(self, ue, ie, pos, hr, ft, labels, delayed):
        return self._dense_step(ue, ie, pos, hr, ft, labels, delayed)

    @tf.function(input_signature=[_VEC, _VEC, _IDX, _IDX, _FEAT])
    def _predict_vectors(self, ue, ie, pos, hr, ft):
        return tf.sigmoid(ctr_logits(self.dense, ue, ie, pos, hr, ft))

    # --- public API --------------------------------------------------------------------------
    def predict(self, batch: Batch) -> np.ndarray:
        """Score without admitting new ids (unknown ids use the default row)."""
        with self.lock:
            u = self.tables["user"].rows_of(batch.user_ids)
            i = self.tables["item"].rows_of(batch.item_ids)
            return self._predict(u, i, *self._context(batch)).numpy()

    def train(self, batch: Batch) -> float:
        with self.lock:
            step = self.step + 1
            self.clock_ms = max(self.clock_ms, batch.clock_ms)
            u = self.tables["user"].lookup_train(batch.user_ids, self.clock_ms, step)
            i = self.tables["item"].lookup_train(batch.item_ids, self.clock_ms, step)
            loss = self._train(u, i, *self._context(batch), tf.constant(batch.labels, tf.float32),
                               tf.constant(batch.delayed_mask), tf.constant(step, tf.int64))
            self.step = step
            return float(loss)

    def frozen_copy(self) -> "FrozenModel":
        """An immutable copy of the model as it is now (a baseline that stops learning)."""
        with self.lock:
            tables = {n: (dict(t._rows), t.var.numpy()) for n, t in self.tables.items()}
            return FrozenModel(self.dense_weights(), tables, self.cfg.num_positions, self.step)


Mark = tuple[int, int]    # (incarnation, step): where a reader of embedding changes stands


def new_incarnation() -> int:
    """A fresh identity for a model's state: at start and at every restore (checkpoint load)."""
    return secrets.randbits(62)


def table_changes(tables: dict[str, DynamicEmbedding], since: Mark | int, incarnation: int,
                  now: int, clock_ms: int | None = None) -> tuple[Mark, dict[str, dict]]:
    """(mark, {table: {ids, vectors, removed, complete[, clock_ms]}}) of rows changed after
    ``since``; ``clock_ms``, where the caller knows it, is the event time of the newest sample
    the rows have learned from (serving's data age, ``serving.embedding_cache``).

    A mark of another incarnation -- the state was restored since the reader last asked, so
    rows it holds may have been rolled back, however the step numbers compare -- answers with
    every row and ``complete: False``: the reader must replace its whole set."""
    inc, step = since if isinstance(since, (tuple, list)) else (incarnation, since)
    same = inc == incarnation and step <= now
    out = {}
    for name, t in tables.items():
        ids, rows, removed, complete = t.changed_since(step if same else 0)
        out[name] = {"ids": ids, "vectors": t.vectors(rows), "removed": removed,
                     "complete": complete and same}
        if clock_ms:
            out[name]["clock_ms"] = int(clock_ms)
    return (incarnation, now), out


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
        ids = ids.tolist()
        rows = np.fromiter(map(rows_of.get, ids, repeat(0, len(ids))), dtype=np.int64, count=len(ids))
        return tf.constant(var[rows])

    def predict(self, batch: Batch) -> np.ndarray:
        logits = ctr_logits(self.dense, self._vectors("user", batch.user_ids),
                            self._vectors("item", batch.item_ids), *batch.context(self.num_positions))
        return tf.sigmoid(logits).numpy()
