"""Tracing the serving function into a GraphDef and finding what in it depends only on weights.

The serving function is traced with its weights as *inputs* (placeholders), not captured
variables, so the graph says exactly which values come from weights and which from the request.
A node is **weight-only** when it is stateless and every input is a weight, a constant or another
weight-only node; such a node gives the same value for every request until the weights change.
The **cache frontier** is the set of computed weight-only tensors that request-dependent nodes
consume: exactly what a cache must hold for the per-request graph to need nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import graph_pb2

# ops that read or write state, or are random: never weight-only, never folded
STATEFUL_OPS = {"ReadVariableOp", "VarHandleOp", "AssignVariableOp", "RandomUniform",
             "RandomStandardNormal", "StatefulPartitionedCall", "Timestamp", "Print", "PrintV2"}


@dataclass
class TracedGraph:
    graph_def: graph_pb2.GraphDef
    weights: list[str]                 # weight placeholder names, one per weight key...
    weight_keys: list[str]             # ... sorted, as TF flattens the weights dict
    requests: list[str]                # request placeholder names, in signature order
    outputs: list[str]                 # output tensor names ("node:0")
    shapes: dict[str, tuple] = field(default_factory=dict)   # tensor name -> static shape

    def nodes(self) -> dict[str, graph_pb2.NodeDef]:
        return {n.name: n for n in self.graph_def.node}

    def op_counts(self, names: set[str] | None = None) -> dict[str, int]:
        out: dict[str, int] = {}
        for n in self.graph_def.node:
            if names is None or n.name in names:
                out[n.op] = out.get(n.op, 0) + 1
        return out


def node_of(tensor: str) -> str:
    """'^ctrl', 'name:1' or 'name' -> 'name'."""
    return tensor.lstrip("^").split(":")[0]


def trace(fn: Callable, weights: dict[str, np.ndarray], request_specs: dict[str, tf.TensorSpec]
          ) -> TracedGraph:
    """Trace ``fn(weights_dict, **requests)`` (returning one tensor) with weights as inputs."""
    wspec = {k: tf.TensorSpec(v.shape, tf.as_dtype(v.dtype)) for k, v in weights.items()}
    names = list(request_specs)
    cf = tf.function(lambda w, *req: fn(w, **dict(zip(names, req)))).get_concrete_function(
        wspec, *request_specs.values())
    n_w = len(weights)
    ins = [t.name.split(":")[0] for t in cf.inputs]
    shapes = {}
    for op in cf.graph.get_operations():
        for t in op.outputs:
            shapes[t.name] = tuple(t.shape.as_list()) if t.shape.rank is not None else None
    return TracedGraph(cf.graph.as_graph_def(), ins[:n_w], sorted(weights), ins[n_w:],
                       [t.name for t in cf.outputs], shapes)


def derived_only_from(tg: TracedGraph, sources: set[str]) -> set[str]:
    """Names of the nodes whose value depends on the ``sources`` nodes and constants only:
    stateless all the way down, every input (control inputs too) such a node."""
    nodes = tg.nodes()
    memo: dict[str, bool] = {}

    def visit(name: str) -> bool:
        if name in memo:
            return memo[name]
        n = nodes[name]
        if name in sources or n.op == "Const":
            ok = True
        elif n.op == "Placeholder" or n.op in STATEFUL_OPS or not n.input:
            ok = False
        else:
            memo[name] = False   # cycles cannot occur in a GraphDef of a function, but be safe
            ok = all(visit(node_of(i)) for i in n.input)
        memo[name] = ok
        return ok

    for name in nodes:
        visit(name)
    return {k for k, v in memo.items() if v}


def weight_only(tg: TracedGraph) -> set[str]:
    """Names of the nodes whose value depends on weights and constants only."""
    return derived_only_from(tg, set(tg.weights))


def consumers(tg: TracedGraph) -> dict[str, list[graph_pb2.NodeDef]]:
    out: dict[str, list] = {}
    for n in tg.graph_def.node:
        for i in n.input:
            out.setdefault(node_of(i), []).append(n)
    return out


def cache_frontier(tg: TracedGraph, only_weights: set[str] | None = None) -> list[str]:
    """Computed weight-only tensors ("node:k") consumed by request-dependent nodes (or returned).
    Bare weights and constants are not in it: those the request graph reads directly."""
    wo = weight_only(tg) if only_weights is None else only_weights
    nodes = tg.nodes()
    computed = {n for n in wo if n not in set(tg.weights) and nodes[n].op != "Const"}
    out = []
    for n in tg.graph_def.node:
        if n.name in wo:
            continue
        for i in n.input:
            if i.startswith("^"):
                continue
            src = node_of(i)
            t = i if ":" in i else f"{i}:0"
            if src in computed and t not in out:
                out.append(t)
    for t in tg.outputs:
        if node_of(t) in computed and t not in out:
            out.append(t)
    return out


def request_nodes(tg: TracedGraph) -> set[str]:
    """Nodes evaluated per request: everything that is not weight-only."""
    return {n.name for n in tg.graph_def.node} - weight_only(tg)
