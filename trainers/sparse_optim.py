"""Sparse optimisers: update only the embedding rows a batch touched.

Keras 3's Adagrad/Adam rewrite every row of a table on every step (DESIGN.md: 2-4k samples/s);
these touch the batch's unique rows only.  Each optimiser names its slot variables (same shape as
the table, so they grow with it), their values for a fresh row, and an ``apply`` that runs inside
the trainer's ``tf.function``.  Adagrad and FTRL use TensorFlow's fused sparse kernels; Adam is
the "lazy" variant (moments of untouched rows are not decayed), written with gather/scatter.
"""
from __future__ import annotations

from dataclasses import dataclass

import tensorflow as tf


@dataclass(frozen=True)
class SparseOptimizer:
    learning_rate: float

    slot_names: tuple[str, ...] = ()

    def slot_init(self, slot: str) -> float:
        raise NotImplementedError

    def apply(self, var: tf.Variable, slots: dict[str, tf.Variable], rows: tf.Tensor,
              grad: tf.Tensor, step: tf.Tensor) -> None:
        """Update ``var[rows]`` (unique rows) with ``grad`` [len(rows), dim]; ``step`` counts from 1."""
        raise NotImplementedError


@dataclass(frozen=True)
class Adagrad(SparseOptimizer):
    initial_accumulator: float = 0.1
    epsilon: float = 1e-7
    slot_names: tuple[str, ...] = ("accum",)

    def slot_init(self, slot: str) -> float:
        return self.initial_accumulator

    def apply(self, var, slots, rows, grad, step) -> None:
        tf.raw_ops.ResourceSparseApplyAdagradV2(
            var=var.handle, accum=slots["accum"].handle, lr=tf.constant(self.learning_rate),
            epsilon=tf.constant(self.epsilon), grad=grad, indices=rows, use_locking=False)


@dataclass(frozen=True)
class LazyAdam(SparseOptimizer):
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7
    slot_names: tuple[str, ...] = ("m", "v")

    def slot_init(self, slot: str) -> float:
        return 0.0

    def apply(self, var, slots, rows, grad, step) -> None:
        b1, b2 = tf.constant(self.beta_1), tf.constant(self.beta_2)
        t = tf.cast(step, tf.float32)
        lr_t = self.learning_rate * tf.sqrt(1.0 - tf.pow(b2, t)) / (1.0 - tf.pow(b1, t))
        m = b1 * tf.gather(slots["m"], rows) + (1.0 - b1) * grad
        v = b2 * tf.gather(slots["v"], rows) + (1.0 - b2) * tf.square(grad)
        slots["m"].scatter_update(tf.IndexedSlices(m, rows))
        slots["v"].scatter_update(tf.IndexedSlices(v, rows))
        var.scatter_sub(tf.IndexedSlices(lr_t * m / (tf.sqrt(v) + self.epsilon), rows))


@dataclass(frozen=True)
class Ftrl(SparseOptimizer):
    initial_accumulator: float = 0.1
    l1: float = 0.0
    l2: float = 0.0
    lr_power: float = -0.5
    slot_names: tuple[str, ...] = ("accum", "linear")

    def slot_init(self, slot: str) -> float:
        return self.initial_accumulator if slot == "accum" else 0.0

    def apply(self, var, slots, rows, grad, step) -> None:
        tf.raw_ops.ResourceSparseApplyFtrlV2(
            var=var.handle, accum=slots["accum"].handle, linear=slots["linear"].handle,
            grad=grad, indices=rows, lr=tf.constant(self.learning_rate),
            l1=tf.constant(self.l1), l2=tf.constant(self.l2), l2_shrinkage=tf.constant(0.0),
            lr_power=tf.constant(self.lr_power), use_locking=False)


def make(kind: str, learning_rate: float) -> SparseOptimizer:
    kinds = {"adagrad": Adagrad, "adam": LazyAdam, "ftrl": Ftrl}
    if kind not in kinds:
        raise ValueError(f"unknown sparse optimizer {kind!r}; one of {sorted(kinds)}")
    return kinds[kind](learning_rate)
