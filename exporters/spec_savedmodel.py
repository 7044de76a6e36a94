"""The serving graph of a feature spec's model (``trainers.spec_model``), plain and optimised.

A request brings, per model input, the vectors serving looked up for its keys ([B, width, dim]:
one row for a field or a cross, ``width`` for a list or a sequence), the [B, W] mask of real
keys over all inputs side by side (``SpecNet.spans``) and the numeric inputs; the graph returns
the click probability.  Its forward pass is ``trainers.spec_model.spec_logits`` itself, so the
served model cannot drift from the trained one.  The plain module is the reference; the
optimised one runs the same function through ``exporters.graph`` (folded constants and
BatchNorms, the weight-only cache, XLA on batch buckets where a GPU is visible).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from trainers.spec_model import SpecNet, spec_logits


def request_specs(net: SpecNet) -> dict[str, tf.TensorSpec]:
    specs = {f"{i.name}_emb": tf.TensorSpec([None, i.width, d], tf.float32, name=f"{i.name}_emb")
             for i, d in zip(net.inputs, net.dims)}
    specs["mask"] = tf.TensorSpec([None, net.width], tf.float32, name="mask")
    specs["numeric"] = tf.TensorSpec([None, net.num_numeric], tf.float32, name="numeric")
    return specs


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
        gathered = [req[f"{i.name}_emb"] for i in net.inputs]
        return tf.sigmoid(spec_logits(net, w, gathered, req["mask"], req["numeric"],
                                      dense=dense)[0])
    return fn


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
    """The optimised SavedModel: ``serving_default``, ``apply_weights`` (in-place dense
    refresh) and ``refresh_cache``; returns the passes' report."""
    from exporters.graph.module import OptimisedModule, Signature
    module = OptimisedModule({"serve": Signature(serving_fn(net, precision), request_specs(net),
                                                 "probability")}, weights, jit=jit)
    module.warm()
    from exporters.savedmodel import exported_signatures
    tf.saved_model.save(module, str(path),
                        signatures=exported_signatures(module, {"serving_default": "serve"}))
    return {**module.reports["serve"].to_dict(), "xla": module.jit,
            "xla_twins": bool(module.xla_twins), "precision": precision}
