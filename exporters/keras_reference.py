"""The same network as plain Keras 3 layers: the baseline the optimised graph is measured against
(``odl bench serving-graph``) -- what a team would serve without ODL's graph work.  It takes the
trainer's weight dict, so both models hold the very same weights."""
from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from odl.features import NUM_DENSE
from trainers.model import BN_EPSILON, NUM_HOURS, cross_layers, deep_layers


@keras.saving.register_keras_serializable("odl")
class Cross(keras.layers.Layer):
    """DCN-v2 cross layer: x0 * (x W + b) + x."""

    def build(self, shapes):
        width = shapes[0][-1]
        self.kernel = self.add_weight(shape=(width, width), name="kernel")
        self.bias = self.add_weight(shape=(width,), name="bias", initializer="zeros")

    def call(self, inputs):
        x0, x = inputs
        return x0 * (keras.ops.matmul(x, self.kernel) + self.bias) + x


def build(weights: dict[str, np.ndarray], embedding_dim: int) -> keras.Model:
    d = embedding_dim
    ops = keras.ops
    user = keras.Input((d,), name="user_emb")
    item = keras.Input((d,), name="item_emb")
    position = keras.Input((), dtype="int64", name="position")
    hour = keras.Input((), dtype="int64", name="hour")
    features = keras.Input((NUM_DENSE,), name="features")
    n_pos = weights["position_emb"].shape[0]
    pos_emb = keras.layers.Embedding(n_pos, weights["position_emb"].shape[1], name="position_emb")
    hour_emb = keras.layers.Embedding(NUM_HOURS, weights["hour_emb"].shape[1], name="hour_emb")
    x0 = keras.layers.Concatenate()([user, item, keras.layers.Multiply()([user, item]),
                                     pos_emb(ops.clip(position, 0, n_pos - 1)),
                                     hour_emb(ops.mod(hour, NUM_HOURS)), features])
    x, crosses = x0, []
    for n in range(cross_layers(weights)):
        layer = Cross(name=f"cross_{n}")
        x = layer([x0, x])
        crosses.append(layer)
    h, deep = x0, []
    for n in range(deep_layers(weights)):
        dense = keras.layers.Dense(weights[f"dense_{n}/kernel"].shape[1], name=f"dense_{n}")
        h = dense(h)
        bn = None
        if f"bn_{n}/gamma" in weights:
            bn = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=f"bn_{n}")
            h = bn(h)
        h = keras.layers.ReLU()(h)
        deep.append((dense, bn))
    out = keras.layers.Dense(1, name="out")
    logit = ops.squeeze(out(keras.layers.Concatenate()([x, h])), axis=1)
    prob = keras.layers.Activation("sigmoid", name="probability")(
        logit + user[:, 0] + item[:, 0] + ops.sum(user[:, 1:] * item[:, 1:], axis=1))
    model = keras.Model([user, item, position, hour, features], prob)
    pos_emb.set_weights([weights["position_emb"]])
    hour_emb.set_weights([weights["hour_emb"]])
    for n, layer in enumerate(crosses):
        layer.set_weights([weights[f"cross_{n}/kernel"], weights[f"cross_{n}/bias"]])
    for n, (dense, bn) in enumerate(deep):
        dense.set_weights([weights[f"dense_{n}/kernel"], weights[f"dense_{n}/bias"]])
        if bn is not None:
            bn.set_weights([weights[f"bn_{n}/{k}"] for k in ("gamma", "beta", "moving_mean",
                                                             "moving_variance")])
    out.set_weights([weights["out/kernel"], weights["out/bias"]])
    return model


def export(weights: dict[str, np.ndarray], embedding_dim: int, path: Path) -> None:
    """Keras's own SavedModel export (``serving_default`` = the model's call)."""
    build(weights, embedding_dim).export(str(path), format="tf_saved_model", verbose=False)
