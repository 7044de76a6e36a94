"""The serving graph of a feature spec's model (``trainers.spec_model``), plain and optimised.

A request brings, per model input, the vectors serving looked up for its keys ([B, width, dim]:
one row for a field or a cross, ``width`` for a list or a sequence), the [B, W] mask of real
keys over all inputs side by side (``SpecNet.spans``) and the numeric inputs; the graph returns
the click probability.  Its forward pass is ``trainers.spec_model.spec_logits`` itself, so the
served model cannot drift from the trained one.  The plain module is the reference; the
optimised one runs the same function through ``exporters.graph`` (folded constants and
BatchNorms, the weight-only cache, XLA on batch buckets where a GPU is visible) and also takes
the packed request (``odl.spec.net``: the single-valued inputs of a dim as one tensor), which
replicas send.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from odl.spec.net import MASK, NUMERIC, PACKED_SIGNATURE, SpecNet, emb_name, singles_name
from trainers.spec_model import spec_logits, stacked_logits


def request_specs(net: SpecNet, packed: bool = False) -> dict[str, tf.TensorSpec]:
    """A request's tensors in the per-input or the packed layout (``odl.spec.net``)."""
    return {name: tf.TensorSpec(list(shape), tf.float32, name=name)
            for name, shape in net.request_shapes(packed).items()}


def bfloat16_dense(x: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    """A dense layer's product in bfloat16, accumulated and returned as float32.  The kernel's
    cast depends on weights only, so the optimised graph keeps the bfloat16 kernel in its
    cache; a request casts only its activations.  CPUs with AMX/AVX512-BF16 and every recent
    GPU multiply bfloat16 several times faster than float32; the price is ~3 significant
    digits per product (``odl bench serving-graph --spec`` prints the probabilities' largest
    difference)."""
    return tf.cast(tf.matmul(tf.cast(x, tf.bfloat16), tf.cast(kernel, tf.bfloat16)), tf.float32)


PRECISIONS = {"float32": tf.matmul, "bfloat16": bfloat16_dense}


def serving_fn(net: SpecNet, precision: str = "float32"):
    """``fn(weights, **request)`` -> click probability [B], the request named as in
    ``request_specs``; ``precision`` of the network's dense layers (``PRECISIONS``)."""
    dense = PRECISIONS[precision]

    def fn(w, **req):
        gathered = [req[emb_name(i)] for i in net.inputs]
        return tf.sigmoid(spec_logits(net, w, gathered, req[MASK], req[NUMERIC], dense=dense)[0])
    return fn


def packed_serving_fn(net: SpecNet, precision: str = "float32"):
    """``serving_fn`` on a packed request: the same forward pass from the stacked tensors."""
    dense = PRECISIONS[precision]

    def fn(w, **req):
        singles = {d: req[singles_name(d)] for d in net.single_groups}
        multi = {k: req[emb_name(net.inputs[k])] for k in net.multi_valued}
        return tf.sigmoid(stacked_logits(net, w, singles, multi, req[MASK], req[NUMERIC],
                                         dense=dense)[0])
    return fn


def probe_request(net: SpecNet, batch: int, seed: int) -> dict[str, tf.Tensor]:
    """A request of ``batch`` rows: unit-normal vectors per input (far wider than trained
    embeddings: a stress, not a sample), every single-valued input present, list and sequence
    inputs partly filled, unit-normal numeric inputs."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((batch, net.width), np.float32)
    for a, b in net.spans:
        mask[:, a] = 1.0
        if b - a > 1:
            mask[:, a + 1:b] = rng.random((batch, b - a - 1)) < 0.5
    out = {}
    for name, spec in request_specs(net).items():
        if name == "mask":
            out[name] = tf.constant(mask)
        else:
            shape = [batch] + spec.shape.as_list()[1:]
            out[name] = tf.constant(rng.normal(size=shape).astype(np.float32))
    return out


def precision_error(net: SpecNet, weights: dict[str, np.ndarray], precision: str,
                    rows: int = 256) -> float:
    """The largest difference of click probabilities between ``precision`` and float32 with
    these weights, on a probe request (``probe_request``)."""
    w = {k: tf.constant(v) for k, v in weights.items()}
    req = probe_request(net, rows, seed=0)
    ref, low = serving_fn(net)(w, **req), serving_fn(net, precision)(w, **req)
    return float(tf.reduce_max(tf.abs(ref - low)))


class SpecServingModule(tf.Module):
    def __init__(self, net: SpecNet, weights: dict[str, np.ndarray]):
        super().__init__(name="odl_spec_ctr")
        self.weights = {k: tf.Variable(v, trainable=False, name=k.replace("/", "_"))
                        for k, v in weights.items()}
        fn, specs = serving_fn(net), request_specs(net)
        self.serve = tf.function(
            lambda *req: {"probability": fn(self.weights, **dict(zip(specs, req)))},
            input_signature=list(specs.values()))


def save(net: SpecNet, weights: dict[str, np.ndarray], path: Path) -> None:
    """The plain serving SavedModel (the reference the optimised one is checked against)."""
    module = SpecServingModule(net, weights)
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})


def save_optimised(net: SpecNet, weights: dict[str, np.ndarray], path: Path,
                   jit: bool | None = None, precision: str = "float32") -> dict:
    """The optimised SavedModel: ``serving_default`` (per-input request, as the plain one),
    ``serving_packed`` (``odl.spec.net``'s packed request: what serving calls), their XLA
    twins where the module has them, ``apply_weights`` (in-place dense refresh) and
    ``refresh_cache``; returns the passes' report of ``serving_default``."""
    from exporters.graph.module import OptimisedModule, Signature
    module = OptimisedModule({
        "serve": Signature(serving_fn(net, precision), request_specs(net), "probability"),
        "serve_packed": Signature(packed_serving_fn(net, precision),
                                  request_specs(net, packed=True), "probability")},
        weights, jit=jit)
    module.warm()
    from exporters.savedmodel import exported_signatures
    tf.saved_model.save(module, str(path), signatures=exported_signatures(
        module, {"serving_default": "serve", PACKED_SIGNATURE: "serve_packed"}))
    return {**module.reports["serve"].to_dict(), "xla": module.jit,
            "xla_twins": bool(module.xla_twins), "precision": precision}


def save_published(net: SpecNet, weights: dict[str, np.ndarray], path: Path, optimised: bool,
                   precision: str = "float32", tolerance: float = 0.02) -> dict | None:
    """What the exporter publishes (``exporter.optimised_graph``, ``exporter.precision``): the
    plain graph, or the optimised one in ``precision`` if, with these weights, its probabilities
    stay within ``tolerance`` of float32's on a probe request -- else in float32, the report's
    ``precision_check`` saying why.  Each version is checked with its own weights."""
    if not optimised:
        save(net, weights, path)
        return None
    check = None
    if precision != "float32":
        err = precision_error(net, weights, precision)
        check = {"wanted": precision, "max_diff": err, "tolerance": tolerance}
        if not err <= tolerance:
            precision = "float32"
    report = save_optimised(net, weights, path, precision=precision)
    return {**report, "precision_check": check} if check else report
