"""The optimised serving module: the passes applied to the serving function, split into a cache
function (weight-only work) and a per-request function (XLA-compiled, padded to batch buckets).

* **Cache (the CallGraphOp idea).**  Every tensor of the cache frontier
  (``exporters.graph.analysis``) lives in a variable, computed by ``refresh_cache``.
  ``apply_weights`` (the in-place dense refresh) assigns the weights and recomputes the cache in
  the same call, so the exported SavedModel is correct for any plain TensorFlow caller.  The
  periodic refresh (every ``every_n_calls`` calls or ``every_s`` seconds, for weights changed
  behind the module's back) is ``serving.graph_cache.CacheRefresher``, on the replica's host: a ``tf.cond`` in
  ``serving_default`` measured ~100 us a call here, a quarter of the whole request.
* **Per-request function**: reads the cache variables, the weights it still needs directly and
  the request.  With ``jit`` it is compiled with XLA (so on a GPU it could be captured as a CUDA
  graph) while the cache function stays outside it, and requests are padded up to the next batch
  bucket (beyond the largest, to a multiple of it) so XLA compiles a few shapes once (``warm``),
  not one per batch size.  The choice belongs to the machine that runs the graph, not the
  exporter's: with ``jit=None`` (the default) every signature ``X`` runs TensorFlow's own
  kernels (on these CPUs XLA measured slower, docs/serving-graph.md) and an ``X_xla`` twin,
  sharing its weights and caches, is exported beside it, uncompiled; a replica that sees a GPU
  (``serving.xla``) serves the twins and compiles their buckets when it warms the model.
  ``jit=True`` / ``False`` builds only the one kind (the benchmark's comparisons).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import tensorflow as tf

from exporters.graph.analysis import TracedGraph, cache_frontier, node_of, request_nodes, trace
from exporters.graph.passes import (fold_batchnorm, fold_constants, graph_function, prune_dead,
                                    simplify_tensordot)

DEFAULT_BUCKETS = (1, 8, 64, 512)


@dataclass
class PassReport:
    """What the passes did, for tests, the benchmark and the manifest."""
    folded_batchnorms: int = 0
    simplified_dense: int = 0
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
    tg, rep.simplified_dense = simplify_tensordot(tg)
    tg, rep.folded_batchnorms = fold_batchnorm(tg)
    tg, rep.pruned_nodes = prune_dead(tg)
    rep.cached_tensors = cache_frontier(tg)
    rep.request_ops_after = tg.op_counts(request_nodes(tg))
    return tg, rep


@dataclass(frozen=True)
class Signature:
    """One request function of the module: ``fn(weights, *request)`` -> a tensor."""
    fn: Callable
    specs: dict[str, tf.TensorSpec]
    output: str


class _Compiled:
    """One signature after the passes: its cache function, its per-request function, which
    weights the request reads directly, and the report."""

    def __init__(self, sig: Signature, weights: dict[str, np.ndarray]):
        tg, self.report = optimise(trace(sig.fn, weights, sig.specs))
        self.sig = sig
        placeholder = dict(zip(tg.weights, range(len(tg.weights))))
        frontier = self.report.cached_tensors
        nodes = tg.nodes()
        self.direct = sorted({placeholder[node_of(i)] for n in request_nodes(tg)
                              for i in nodes[n].input if node_of(i) in placeholder})
        self.cache_fn = graph_function(tg.graph_def, [f"{w}:0" for w in tg.weights], frontier)
        self.request_fn = graph_function(
            tg.graph_def, [f"{tg.weights[i]}:0" for i in self.direct] + frontier
            + [f"{r}:0" for r in tg.requests], tg.outputs)


class OptimisedModule(tf.Module):
    """Several request signatures (e.g. ``serve`` on [B, d] rows and ``score_candidates`` on
    [B, C, d]) over one set of weight variables; each has its own cache variables, all
    recomputed by ``refresh_cache`` and by ``apply_weights``."""

    def __init__(self, signatures: dict[str, Signature], weights: dict[str, np.ndarray],
                 buckets: tuple[int, ...] = DEFAULT_BUCKETS, jit: bool | None = None):
        super().__init__(name="odl_ctr_optimised")
        self.keys = sorted(weights)
        self.weights = [tf.Variable(weights[k], trainable=False, name=k.replace("/", "_"))
                        for k in self.keys]
        self._compiled = {name: _Compiled(sig, weights) for name, sig in signatures.items()}
        self.reports = {name: c.report for name, c in self._compiled.items()}
        # caches start computed from the exported weights (their shapes come from them too)
        self.caches = {name: [tf.Variable(v, trainable=False, name=f"cache_{name}_{k}")
                              for k, v in enumerate(c.cache_fn(*[w.read_value() for w in self.weights]))]
                       for name, c in self._compiled.items()}
        self.refreshes = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.buckets = tf.constant(sorted(buckets), tf.int32)
        self._max_bucket = max(buckets)
        self.jit = bool(jit)
        self.xla_twins = [f"{name}_xla" for name in self._compiled] if jit is None else []
        for name, c in self._compiled.items():
            kinds = [(name, self.jit)] + ([(f"{name}_xla", True)] if jit is None else [])
            for attr, compiled in kinds:
                request = tf.function(c.request_fn, jit_compile=True) if compiled else c.request_fn
                setattr(self, attr, tf.function(self._bind(name, request, compiled),
                                                input_signature=list(c.sig.specs.values())))
        self.apply_weights = tf.function(self._apply_weights, input_signature=[
            tf.TensorSpec(v.shape, v.dtype, name=k.replace("/", "_"))
            for k, v in zip(self.keys, self.weights)])
        self.refresh_cache = tf.function(self._refresh, input_signature=[])

    # --- the cache -----------------------------------------------------------------------------
    def _refresh(self):
        current = [w.read_value() for w in self.weights]
        for name, c in self._compiled.items():
            for var, value in zip(self.caches[name], c.cache_fn(*current)):
                var.assign(value)
        self.refreshes.assign_add(1)
        return {"refreshes": self.refreshes.read_value()}

    def _apply_weights(self, *values):
        """Replace the weights in place (a dense refresh) and recompute the caches at once."""
        for var, value in zip(self.weights, values):
            var.assign(value)
        return self._refresh()

    # --- per request ---------------------------------------------------------------------------
    def _pad_to(self, n):
        i = tf.searchsorted(self.buckets, tf.reshape(n, [1]))[0]
        beyond = (n + self._max_bucket - 1) // self._max_bucket * self._max_bucket
        return tf.where(i < tf.size(self.buckets), tf.gather(self.buckets, tf.minimum(i, tf.size(self.buckets) - 1)), beyond)

    def _bind(self, name: str, request, compiled: bool):
        def serve(*inputs):
            return self._serve(name, request, compiled, *inputs)
        return serve

    def _serve(self, name: str, request, compiled: bool, *inputs):
        c = self._compiled[name]
        args = ([self.weights[i].read_value() for i in c.direct]
                + [v.read_value() for v in self.caches[name]])
        if not compiled:   # TensorFlow's kernels take any batch size: no padding
            return {c.sig.output: request(*args, *inputs)[0]}
        n = tf.shape(inputs[0])[0]
        size = self._pad_to(n)
        padded = [tf.pad(x, [[0, size - n]] + [[0, 0]] * (len(x.shape) - 1)) for x in inputs]
        return {c.sig.output: request(*args, *padded)[0][:n]}

    def warm(self) -> None:
        """Compile every bucket now (load time), not on the first request of each size."""
        if not self.jit:
            return
        for name, c in self._compiled.items():
            for b in self.buckets.numpy().tolist():
                getattr(self, name)(*[tf.zeros([b] + [1 if d is None else d for d in s.shape[1:]],
                                               s.dtype) for s in c.sig.specs.values()])
