"""Graph passes over a ``TracedGraph``; each returns a new graph and what it changed.

* ``fold_constants`` -- nodes computed from constants only become constants.
* ``fold_batchnorm`` -- ``(h @ K + b) * S + O`` with S, O, K, b weight-only (an inference
  BatchNorm after a dense layer, as ``tf.nn.batch_normalization`` emits it) becomes
  ``h @ (K * S) + (b * S + O)``: two per-request ops fewer per layer, and the folded kernel and
  bias are weight-only, so the cache (``exporters.graph.cache``) computes them once per refresh.
* ``simplify_tensordot`` -- a dense layer on rank-3 input, as ``tf.tensordot`` (Keras Dense)
  emits it: ``Reshape(Transpose(x, perm), Pack(Prod(Gather(Shape x)), Prod(...)))`` feeding a
  MatMul, becomes ``Reshape(x, [-1, d])`` when the permutation is the identity (contraction
  over the last axis) and ``d`` is static: Transpose, two Prods, a Pack, a Gather and a Concat
  fewer per layer; the output Reshape stays.  Runs after ``fold_constants`` (which turns the
  permutation into a constant) and before ``fold_batchnorm`` (which looks through the output
  Reshape).
* ``prune_dead`` -- drop nodes nothing reads.
"""
from __future__ import annotations

import copy

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2, graph_pb2, node_def_pb2

from exporters.graph.analysis import (TracedGraph, consumers, derived_only_from, node_of,
                                      weight_only)


def graph_function(gd: graph_pb2.GraphDef, feeds: list[str], fetches: list[str]):
    """A callable ConcreteFunction computing ``fetches`` from ``feeds`` (tensor names) of ``gd``."""
    def imports():
        tf.graph_util.import_graph_def(gd, name="")
    wrapped = tf.compat.v1.wrap_function(imports, [])
    g = wrapped.graph
    return wrapped.prune([g.get_tensor_by_name(t) for t in feeds],
                         [g.get_tensor_by_name(t) for t in fetches])


def _with_nodes(tg: TracedGraph, nodes: list) -> TracedGraph:
    gd = graph_pb2.GraphDef()
    gd.versions.CopyFrom(tg.graph_def.versions)
    gd.library.CopyFrom(tg.graph_def.library)
    gd.node.extend(nodes)
    return TracedGraph(gd, tg.weights, tg.weight_keys, tg.requests, tg.outputs, tg.shapes)


def prune_dead(tg: TracedGraph) -> tuple[TracedGraph, int]:
    """Keep what the outputs need, plus every placeholder (the signature stays the same)."""
    nodes = tg.nodes()
    keep, todo = set(), [node_of(t) for t in tg.outputs]
    while todo:
        n = todo.pop()
        if n not in keep:
            keep.add(n)
            todo.extend(node_of(i) for i in nodes[n].input)
    kept = [n for n in tg.graph_def.node if n.name in keep or n.op == "Placeholder"]
    return _with_nodes(tg, kept), len(tg.graph_def.node) - len(kept)


def _const_node(name: str, value: np.ndarray) -> node_def_pb2.NodeDef:
    n = node_def_pb2.NodeDef(name=name, op="Const")
    n.attr["dtype"].CopyFrom(attr_value_pb2.AttrValue(type=tf.as_dtype(value.dtype).as_datatype_enum))
    n.attr["value"].CopyFrom(attr_value_pb2.AttrValue(tensor=tf.make_tensor_proto(value)))
    return n


def fold_constants(tg: TracedGraph) -> tuple[TracedGraph, int]:
    """Evaluate every single-output node computed from constants only; returns nodes folded."""
    const_only = derived_only_from(tg, set())
    targets = [n for n in tg.graph_def.node if n.op != "Const" and n.name in const_only
               and f"{n.name}:1" not in tg.shapes]   # single-output nodes only
    if not targets:
        return tg, 0
    values = graph_function(tg.graph_def, [], [f"{n.name}:0" for n in targets])()
    folded = {n.name: _const_node(n.name, v.numpy()) for n, v in zip(targets, values)}
    out = [folded.get(n.name, n) for n in tg.graph_def.node]
    pruned, _ = prune_dead(_with_nodes(tg, out))
    return pruned, len(folded)


def _other(node, name: str) -> str | None:
    """The input tensor of a binary ``node`` that is not node ``name`` (None if neither is)."""
    x, y = node.input[0], node.input[1]
    return y if node_of(x) == name else x if node_of(y) == name else None


def _node(name: str, op: str, inputs: list[str], like) -> node_def_pb2.NodeDef:
    n = node_def_pb2.NodeDef(name=name, op=op, input=inputs)
    n.attr["T"].CopyFrom(like.attr["T"])
    return n


def _match_dense_bn(add, nodes, wo, users) -> tuple | None:
    """(h, K, b, S, O, matmul) if ``add`` is ``(h @ K + b) * S + O``, the inner nodes used once."""
    if add.op != "AddV2" or add.name in wo:
        return None
    for mul_t in add.input[:2]:
        mul = nodes[node_of(mul_t)]
        o = _other(add, mul.name)
        if mul.op != "Mul" or mul.name in wo or node_of(o) not in wo or len(users[mul.name]) != 1:
            continue
        for lin_t in mul.input[:2]:
            lin = nodes[node_of(lin_t)]
            s = _other(mul, lin.name)
            if lin.op not in ("AddV2", "BiasAdd") or node_of(s) not in wo or len(users[lin.name]) != 1:
                continue
            for mm_t in lin.input[:2]:
                mm = nodes[node_of(mm_t)]
                b = _other(lin, mm.name)
                reshape = None
                if mm.op == "Reshape" and len(users[mm.name]) == 1:   # a dense on rank-3 input
                    reshape, mm = mm, nodes[node_of(mm.input[0])]
                if (mm.op == "MatMul" and node_of(b) in wo and len(users[mm.name]) == 1
                        and not mm.attr["transpose_a"].b and not mm.attr["transpose_b"].b
                        and node_of(mm.input[1]) in wo):
                    return mm.input[0], mm.input[1], b, s, o, mm, reshape
    return None


def fold_batchnorm(tg: TracedGraph) -> tuple[TracedGraph, int]:
    """Fold ``(h @ K + b) * S + O`` (S, O, K, b weight-only) into ``h @ (K*S) + (b*S + O)``; the
    replacement keeps the final node's name, so its consumers need no change."""
    nodes, wo, users = tg.nodes(), weight_only(tg), consumers(tg)
    users = {k: users.get(k, []) for k in nodes}
    replaced: dict[str, list] = {}
    for add in tg.graph_def.node:
        m = _match_dense_bn(add, nodes, wo, users)
        if m is None:
            continue
        h, k, b, s, o, mm, reshape = m
        p = add.name
        kernel = _node(f"{p}/folded_kernel", "Mul", [k, s], add)
        scaled = _node(f"{p}/folded_bias_scaled", "Mul", [b, s], add)
        bias = _node(f"{p}/folded_bias", "AddV2", [scaled.name, o], add)
        matmul = copy.deepcopy(mm)
        matmul.name = f"{p}/folded_matmul"
        matmul.input[:] = [h, kernel.name]
        new = [kernel, scaled, bias, matmul]
        if reshape is not None:
            out = copy.deepcopy(reshape)
            out.name = f"{p}/folded_reshape"
            out.input[0] = matmul.name
            new.append(out)
        replaced[p] = new + [_node(p, "AddV2", [new[-1].name, bias.name], add)]
    if not replaced:
        return tg, 0
    out = [x for n in tg.graph_def.node for x in replaced.get(n.name, [n])]
    pruned, _ = prune_dead(_with_nodes(tg, out))
    return pruned, len(replaced)


def _const_value(node) -> np.ndarray | None:
    return tf.make_ndarray(node.attr["value"].tensor) if node.op == "Const" else None


def simplify_tensordot(tg: TracedGraph) -> tuple[TracedGraph, int]:
    """Rewrite tensordot's input side of every MatMul as one Reshape; returns layers rewritten."""
    nodes = tg.nodes()
    out, rewritten = [], 0
    for mm in tg.graph_def.node:
        out.append(mm)
        if mm.op != "MatMul" or mm.attr["transpose_a"].b:
            continue
        flat = nodes[node_of(mm.input[0])]
        if flat.op != "Reshape":
            continue
        tr = nodes[node_of(flat.input[0])]
        if tr.op != "Transpose":
            continue
        perm = _const_value(nodes[node_of(tr.input[1])])
        x = tr.input[0] if ":" in tr.input[0] else f"{tr.input[0]}:0"
        shape = tg.shapes.get(x)
        if (perm is None or shape is None or shape[-1] is None
                or perm.tolist() != list(range(len(shape)))):
            continue    # not a contraction over the last axis, or d unknown: leave it
        shape_node = _const_node(f"{mm.name}/flat_shape", np.array([-1, shape[-1]], np.int32))
        reshape = node_def_pb2.NodeDef(name=f"{mm.name}/flat", op="Reshape",
                                       input=[tr.input[0], shape_node.name])
        reshape.attr["T"].CopyFrom(tr.attr["T"])
        reshape.attr["Tshape"].CopyFrom(attr_value_pb2.AttrValue(type=tf.int32.as_datatype_enum))
        new_mm = copy.deepcopy(mm)
        new_mm.input[0] = reshape.name
        out[-1:] = [shape_node, reshape, new_mm]
        rewritten += 1
    if not rewritten:
        return tg, 0
    pruned, _ = prune_dead(_with_nodes(tg, out))
    return pruned, rewritten
