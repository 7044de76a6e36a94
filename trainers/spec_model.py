"""The CTR model of a feature spec: one dynamic table per declared table, one input per declared
sparse feature and sequence, the numeric features beside them.

Same learning rules as the default shape's ``trainers.model.CTRModel`` (and the same network
code, ``model.dcn_head``): component 0 of every input's vector is a first-order weight (the wide
part), the other components meet in a factorisation machine over all inputs of the common dim,
and everything feeds DCN-v2 cross layers beside a deep tower.  Each table row moves by the summed
gradients of its own samples (per-sample sums, ``CTRModel._dense_step``); the network by Adam on
the batch mean; delayed-feedback samples are importance-weighted.

Inputs are ``SpecBatch``es: per input ``[n, width]`` keys (``odl.spec.encode``; key 0 = padding)
pooled by sum, mean or, for sequences, attention against the candidate (the single-valued
inputs on the sequence's table: e.g. the movie being scored for the user's last liked movies).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from odl.config import EmbeddingTableConfig, TrainerConfig
from odl.spec import FeatureSpec
from odl.spec.encode import PAD
from odl.spec.net import SpecNet, table_learning_rate
from trainers import sparse_optim
from trainers.embedding import DynamicEmbedding
from trainers.model import (LearnedState, dcn_head, init_head, is_trainable, new_incarnation,
                            update_moving_moments, weighted_loss)


def stack_singles(net: SpecNet, gathered: list) -> dict[int, tf.Tensor]:
    """dim -> the single-valued inputs of that dim stacked, [B, k, dim] (``SpecNet.single_groups``:
    the packed request's ``singles_<dim>``)."""
    return {d: gathered[ks[0]] if len(ks) == 1 else tf.concat([gathered[k] for k in ks], 1)
            for d, ks in net.single_groups.items()}


def spec_logits(net: SpecNet, w: dict, gathered: list, mask, numeric,
                training: bool = False, dense=tf.matmul) -> tuple[tf.Tensor, dict]:
    """Logits [B] (and BatchNorm moments when training) from each input's looked-up vectors
    ``gathered`` ([B, width, dim] each), the [B, W] mask of real keys and the numeric inputs
    (``stacked_logits``)."""
    return stacked_logits(net, w, stack_singles(net, gathered),
                          {k: gathered[k] for k in net.multi_valued}, mask, numeric,
                          training=training, dense=dense)


def stacked_logits(net: SpecNet, w: dict, singles: dict[int, tf.Tensor], multi: dict[int, tf.Tensor],
                   mask, numeric, training: bool = False, dense=tf.matmul) -> tuple[tf.Tensor, dict]:
    """The forward pass over the stacked single-valued inputs (``stack_singles``) and the list
    and sequence inputs by index: first-order weights + FM over the inputs of the common dim +
    the DCN head, whose input is the single-valued inputs (grouped by dim, in input order),
    then the pooled list and sequence inputs, then the numeric ones.  Stacking handles 26
    single-valued inputs (Criteo) in a few ops, not a few per input."""
    groups = net.single_groups
    # The attention queries: only for tables an attention-pooled input reads (a graph computes
    # what it traces, and a slice and a sum per single-valued input are not free).
    attended = {net.inputs[k].table for k in net.multi_valued if net.inputs[k].pooling == "attention"}
    queries: dict[str, tf.Tensor] = {}
    for d, ks in groups.items():
        for j, k in enumerate(ks):
            t = net.inputs[k].table
            if t in attended:
                queries[t] = queries.get(t, 0.0) + singles[d][:, j, :]
    vecs, firsts, fm_sums, fm_squares, fm_members = [], [], [], [], 0
    for d, ks in groups.items():
        v = singles[d] * tf.gather(mask, [net.spans[k][0] for k in ks], axis=1)[..., None]
        vecs.append(tf.reshape(v, [-1, len(ks) * d]))
        firsts.append(tf.reduce_sum(v[..., 0], axis=1))
        if d == net.fm_dim:
            fm_sums.append(tf.reduce_sum(v[..., 1:], axis=1))
            fm_squares.append(tf.reduce_sum(tf.square(v[..., 1:]), axis=[1, 2]))
            fm_members += len(ks)
    for k in net.multi_valued:
        inp, (a, b) = net.inputs[k], net.spans[k]
        v = _pool(multi[k], mask[:, a:b], inp.pooling, queries.get(inp.table))
        vecs.append(v)
        firsts.append(v[:, 0])
        if net.dims[k] == net.fm_dim:
            fm_sums.append(v[:, 1:])
            fm_squares.append(tf.reduce_sum(tf.square(v[:, 1:]), axis=-1))
            fm_members += 1
    first = tf.add_n(firsts) if firsts else 0.0
    fm = 0.0
    if fm_members > 1:
        s = tf.add_n(fm_sums)
        fm = 0.5 * (tf.reduce_sum(s * s, axis=-1) - tf.add_n(fm_squares))
    logit, moments = dcn_head(w, tf.concat(vecs + [numeric], axis=-1), training, dense=dense)
    return logit + first + fm, moments


@dataclass
class SpecBatch:
    keys: dict[str, np.ndarray]        # input name -> [n, width] int64 (0 = padding)
    numeric: np.ndarray                # [n, k] float32
    labels: np.ndarray                 # [n] float32
    ts_ms: np.ndarray | None = None
    delayed: np.ndarray | None = None  # [n] 1.0: a delayed-feedback sample

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def delayed_mask(self) -> np.ndarray:
        if self.delayed is None:
            return np.zeros(len(self.labels), np.float32)
        return np.asarray(self.delayed, np.float32)

    @property
    def clock_ms(self) -> int:
        return int(self.ts_ms.max()) if self.ts_ms is not None and len(self.ts_ms) else 0


def _pool(g: tf.Tensor, mask: tf.Tensor, pooling: str, query: tf.Tensor | None) -> tf.Tensor:
    """[B, w, d] vectors and [B, w] mask -> [B, d]."""
    m = mask[..., None]
    if pooling == "sum":
        return tf.reduce_sum(g * m, axis=1)
    if pooling == "attention" and query is not None:
        scores = tf.reduce_sum(g * query[:, None, :], axis=-1) / tf.sqrt(tf.cast(tf.shape(g)[-1], tf.float32))
        scores = tf.where(mask > 0, scores, tf.fill(tf.shape(scores), -1e9))
        att = tf.nn.softmax(scores, axis=1) * mask      # an empty sequence pools to zeros
        return tf.reduce_sum(g * att[..., None], axis=1)
    return tf.reduce_sum(g * m, axis=1) / tf.maximum(tf.reduce_sum(m, axis=1), 1.0)


class SpecModel(LearnedState):
    def __init__(self, spec: FeatureSpec, cfg: TrainerConfig):
        self.spec, self.cfg = spec, cfg
        self.net = net = SpecNet.of(spec)
        self.inputs, self.spans, self.num_numeric = net.inputs, net.spans, net.num_numeric
        self.tables = {}
        for k, (name, t) in enumerate(spec.tables.items()):
            tcfg = EmbeddingTableConfig(dim=t.dim, capacity=t.capacity,
                                        initial_rows=min(1024, t.capacity + 1),
                                        admit_min_count=t.admit_min_count,
                                        admit_probability=t.admit_probability, ttl_s=t.ttl_s)
            opt = sparse_optim.make(t.optimizer or cfg.sparse_optimizer,
                                    table_learning_rate(t, len(net.inputs), cfg.sparse_learning_rate,
                                                        cfg.sparse_rate_inputs))
            self.tables[name] = DynamicEmbedding(name, tcfg, opt, cfg.seed * 1000 + k)
        rng = np.random.default_rng(cfg.seed)
        self.dense = {k: tf.Variable(v, name=k.replace("/", "_"), trainable=is_trainable(k))
                      for k, v in init_head(cfg, net.head_width, rng).items()}
        self._trainable = [v for k, v in self.dense.items() if is_trainable(k)]
        self.dense_opt = tf.keras.optimizers.Adam(cfg.dense_learning_rate)
        self.dense_opt.build(self._trainable)
        self.step, self.clock_ms = 0, 0
        self.incarnation = new_incarnation()
        self.lock = threading.RLock()
        self._init_shadow()
        # all inputs' rows side by side in one [n, W] matrix (and its mask): one tensor per
        # call instead of two per input -- with 26 inputs the per-tensor conversions and
        # signature checks cost more than the network itself
        at = net.width
        self.table_columns = {
            name: np.concatenate([np.arange(a, b) for i, (a, b) in zip(self.inputs, self.spans)
                                  if i.table == name]) for name in self.tables
            if any(i.table == name for i in self.inputs)}
        rows = tf.TensorSpec([None, at], tf.int64)
        masks = tf.TensorSpec([None, at], tf.float32)
        num = tf.TensorSpec([None, self.num_numeric], tf.float32)
        val = tf.TensorSpec([None], tf.float32)
        self._predict_fn = tf.function(self._predict_impl, input_signature=[rows, masks, num])
        self._shadow_fn = tf.function(self._shadow_impl, input_signature=[rows, masks, num])
        self._train_fn = tf.function(self._train_impl, input_signature=[
            rows, masks, num, val, val, tf.TensorSpec([], tf.int64)])

    # --- the network -------------------------------------------------------------------------
    def _logits(self, gathered, mask, numeric, training: bool):
        return spec_logits(self.net, self.dense, gathered, mask, numeric, training)

    def _gather(self, rows):
        return [tf.gather(self.tables[i.table].var, rows[:, a:b])
                for i, (a, b) in zip(self.inputs, self.spans)]

    def _predict_impl(self, rows, masks, numeric):
        return tf.sigmoid(self._logits(self._gather(rows), masks, numeric, training=False)[0])

    def _shadow_impl(self, rows, masks, numeric):
        return tf.sigmoid(spec_logits(self.net, self.shadow, self._gather(rows), masks, numeric,
                                      False)[0])

    def _train_impl(self, rows, masks, numeric, labels, delayed, step):
        gathered = self._gather(rows)
        with tf.GradientTape() as tape:
            tape.watch(gathered)
            logits, moments = self._logits(gathered, masks, numeric, training=True)
            loss = weighted_loss(labels, logits, delayed)
        grads = tape.gradient(loss, gathered + self._trainable)
        g_in, g_dense = grads[:len(gathered)], grads[len(gathered):]
        self.dense_opt.apply_gradients(zip(g_dense, self._trainable))
        update_moving_moments(self.dense, moments)
        n = tf.cast(tf.shape(labels)[0], tf.float32)
        for name, table in self.tables.items():
            parts = [(tf.reshape(rows[:, a:b], [-1]), tf.reshape(g, [-1, table.var.shape[-1]]))
                     for i, (a, b), g in zip(self.inputs, self.spans, g_in) if i.table == name]
            if not parts:
                continue
            all_rows = tf.concat([p[0] for p in parts], axis=0)
            all_grads = tf.concat([p[1] for p in parts], axis=0) * n   # per-sample sums
            uniq, idx = tf.unique(all_rows)
            summed = tf.math.unsorted_segment_sum(all_grads, idx, tf.shape(uniq)[0])
            keep = uniq > 0   # row 0: padding and unknown ids, never trained
            table.opt.apply(table.var, table.slots, tf.boolean_mask(uniq, keep),
                            tf.boolean_mask(summed, keep), step)
        return loss

    # --- rows ----------------------------------------------------------------------------------
    def _rows(self, batch: SpecBatch, train: bool, step: int):
        """The batch's table rows [n, W] and mask, one lookup per table for all its inputs."""
        keys = np.concatenate([batch.keys[i.name] for i in self.inputs], axis=1)
        real = keys != PAD
        rows = np.zeros(keys.shape, np.int64)
        for name, cols in self.table_columns.items():
            sub, ok = keys[:, cols], real[:, cols]
            if ok.any():
                t = self.tables[name]
                r = np.zeros(sub.shape, np.int64)
                r[ok] = (t.lookup_train(sub[ok], self.clock_ms, step) if train
                         else t.rows_of(sub[ok]))
                rows[:, cols] = r
        return tf.constant(rows), tf.constant(real.astype(np.float32))

    # --- public API (as CTRModel's) -----------------------------------------------------------
    def predict(self, batch: SpecBatch) -> np.ndarray:
        with self.lock:
            rows, masks = self._rows(batch, False, self.step)
            return self._predict_fn(rows, masks, tf.constant(batch.numeric, tf.float32)).numpy()

    def predict_shadow(self, batch: SpecBatch) -> np.ndarray | None:
        """The served dense weights' scores over the live rows (None before any is served)."""
        if not self.has_shadow:
            return None
        with self.lock:
            rows, masks = self._rows(batch, False, self.step)
            return self._shadow_fn(rows, masks, tf.constant(batch.numeric, tf.float32)).numpy()

    def train(self, batch: SpecBatch) -> float:
        with self.lock:
            step = self.step + 1
            self.clock_ms = max(self.clock_ms, batch.clock_ms)
            rows, masks = self._rows(batch, True, step)
            loss = self._train_fn(rows, masks, tf.constant(batch.numeric, tf.float32),
                                  tf.constant(batch.labels, tf.float32),
                                  tf.constant(batch.delayed_mask), tf.constant(step, tf.int64))
            self.step = step
            return float(loss)

    def frozen_copy(self) -> "SpecModel":
        """A copy that no longer learns (``odl eval``'s frozen baseline): weights and tables
        duplicated, so the original may go on training."""
        with self.lock:
            copy = SpecModel(self.spec, self.cfg)
            for k, v in self.dense.items():
                copy.dense[k].assign(v)
            for name, t in self.tables.items():
                copy.tables[name].load(t.state())
            copy.step, copy.clock_ms = self.step, self.clock_ms
            return copy

