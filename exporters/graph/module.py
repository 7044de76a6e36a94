"""The optimised serving module: the passes applied to the serving function, split into a cache
function (weight-only work) and a per-request function (XLA-compiled, padded to batch buckets).

* **Cache (the CallGraphOp idea).**  Every tensor of the cache frontier
  (``exporters.graph.analysis``) lives in a variable, computed by ``refresh_cache``.
  ``apply_weights`` (the in-place dense refresh) assigns the weights and recomputes the cache in
  the same call, so the exported SavedModel is correct for any plain TensorFlow caller.  The
  periodic refresh (every ``every_n_calls`` calls or ``every_s`` seconds, for weights changed
  behind the module's back) is ``CacheRefresher``, on the host: a ``tf.cond`` in
  ``serving_default`` measured ~100 us a call here, a quarter of the whole request.
* **Per-request function**: reads the cache variables, the weights it still needs directly and
  the request.  With ``jit`` it is compiled with XLA (so on a GPU it could be captured as a CUDA
  graph) while the cache function stays outside it, and requests are padded up to the next batch
  bucket (beyond the largest, to a multiple of it) so XLA compiles a few shapes once (``warm``),
  not one per batch size.  ``jit=None`` (the default) uses XLA when a GPU is visible: on these
  CPUs XLA measured slower than TensorFlow's own kernels (docs/serving-graph.md).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import tensorflow as tf

from exporters.graph.analysis import TracedGraph, cache_frontier, node_of, request_nodes, trace
from exporters.graph.passes import fold_batchnorm, fold_constants, graph_function, prune_dead

DEFAULT_BUCKETS = (1, 8, 64, 512)


@dataclass
class CachePolicy:
    every_n_calls: int = 1000
    every_s: float = 5.0


@dataclass
class PassReport:
    """What the passes did, for tests, the benchmark and the manifest."""
    folded_batchnorms: int = 0
    folded_constants: int = 0
    pruned_nodes: int = 0
    cached_tensors: list[str] = field(default_factory=list)
    request_ops_before: dict[str, int] = field(default_factory=dict)
    request_ops_after: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def optimise(tg: TracedGraph) -> tuple[TracedGraph, PassReport]:
    """Run the passes in order and report their effect on the per-request graph."""
    rep = PassReport(request_ops_before=tg.op_counts(request_nodes(tg)))
    tg, rep.folded_constants = fold_constants(tg)
    tg, rep.folded_batchnorms = fold_batchnorm(tg)
    tg, rep.pruned_nodes = prune_dead(tg)
    rep.cached_tensors = cache_frontier(tg)
    rep.request_ops_after = tg.op_counts(request_nodes(tg))
    return tg, rep


class OptimisedModule(tf.Module):
    def __init__(self, fn: Callable, weights: dict[str, np.ndarray],
                 request_specs: dict[str, tf.TensorSpec], output: str,
                 buckets: tuple[int, ...] = DEFAULT_BUCKETS, jit: bool | None = None):
        super().__init__(name="odl_ctr_optimised")
        tg, self.report = optimise(trace(fn, weights, request_specs))
        self.keys = tg.weight_keys
        self.weights = [tf.Variable(weights[k], trainable=False, name=k.replace("/", "_"))
                        for k in self.keys]
        placeholder = dict(zip(tg.weights, range(len(tg.weights))))
        frontier = self.report.cached_tensors
        # weights the per-request graph reads directly (not through the cache)
        req = request_nodes(tg)
        nodes = tg.nodes()
        direct = sorted({placeholder[node_of(i)] for n in req for i in nodes[n].input
                         if node_of(i) in placeholder})
        self._direct = direct
        self._cache_fn = graph_function(tg.graph_def, [f"{w}:0" for w in tg.weights], frontier)
        self._request_fn = graph_function(
            tg.graph_def, [f"{tg.weights[i]}:0" for i in direct] + frontier
            + [f"{r}:0" for r in tg.requests], tg.outputs)
        # the cache starts computed from the exported weights (its shapes come from them too)
        first = self._cache_fn(*[w.read_value() for w in self.weights])
        self.cache = [tf.Variable(v, trainable=False, name=f"cache_{k}") for k, v in enumerate(first)]
        self.refreshes = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.buckets = tf.constant(sorted(buckets), tf.int32)
        self._max_bucket = max(buckets)
        self._output = output
        self._specs = request_specs
        self.jit = bool(tf.config.list_physical_devices("GPU")) if jit is None else jit
        self.request = tf.function(self._request, jit_compile=True) if self.jit else self._request
        self.serve = tf.function(self._serve, input_signature=list(request_specs.values()))
        self.apply_weights = tf.function(self._apply_weights, input_signature=[
            tf.TensorSpec(v.shape, v.dtype, name=k.replace("/", "_"))
            for k, v in zip(self.keys, self.weights)])
        self.refresh_cache = tf.function(self._refresh, input_signature=[])

    # --- the cache -----------------------------------------------------------------------------
    def _refresh(self):
        values = self._cache_fn(*[w.read_value() for w in self.weights])
        for var, value in zip(self.cache, values):
            var.assign(value)
        self.refreshes.assign_add(1)
        return {"refreshes": self.refreshes.read_value()}

    def _apply_weights(self, *values):
        """Replace the weights in place (a dense refresh) and recompute the cache at once."""
        for var, value in zip(self.weights, values):
            var.assign(value)
        return self._refresh()

    # --- per request ---------------------------------------------------------------------------
    def _request(self, *args):
        return self._request_fn(*args)[0]

    def _pad_to(self, n):
        i = tf.searchsorted(self.buckets, tf.reshape(n, [1]))[0]
        beyond = (n + self._max_bucket - 1) // self._max_bucket * self._max_bucket
        return tf.where(i < tf.size(self.buckets), tf.gather(self.buckets, tf.minimum(i, tf.size(self.buckets) - 1)), beyond)

    def _serve(self, *inputs):
        args = [self.weights[i].read_value() for i in self._direct] + [c.read_value() for c in self.cache]
        if not self.jit:   # TensorFlow's kernels take any batch size: no padding
            return {self._output: self.request(*args, *inputs)}
        n = tf.shape(inputs[0])[0]
        size = self._pad_to(n)
        padded = [tf.pad(x, [[0, size - n]] + [[0, 0]] * (len(x.shape) - 1)) for x in inputs]
        out = self.request(*args, *padded)
        return {self._output: out[:n]}

    def warm(self) -> None:
        """Compile every bucket now (load time), not on the first request of each size."""
        if not self.jit:
            return
        for b in self.buckets.numpy().tolist():
            self.serve(*[tf.zeros([b] + list(s.shape[1:]), s.dtype) for s in self._specs.values()])


class CacheRefresher:
    """Host-side refresh policy for a loaded optimised model: ``refresh`` (its ``refresh_cache``
    signature) runs after ``every_n_calls`` calls or ``every_s`` seconds since the last refresh,
    whichever comes first.  ``on_call`` is cheap (a counter and a clock read)."""

    def __init__(self, refresh: Callable[[], object], policy: CachePolicy,
                 clock: Callable[[], float] = time.monotonic):
        self._refresh, self.policy, self._clock = refresh, policy, clock
        self._calls = 0
        self._at = clock()
        self._lock = threading.Lock()
        self.refreshes = 0

    def on_call(self) -> bool:
        """Count a call; refresh if due.  True if this call refreshed."""
        with self._lock:
            self._calls += 1
            due = (self._calls >= self.policy.every_n_calls
                   or self._clock() - self._at >= self.policy.every_s)
            if due:
                self._calls, self._at = 0, self._clock()
                self.refreshes += 1
        if due:
            self._refresh()
        return due
