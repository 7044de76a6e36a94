"""Build the serving SavedModel from a dense-weight snapshot.

The serving graph takes the user and item vectors (which serving reads from Redis) plus the
position and hour indices, and returns the click probability.  Its forward pass is
``trainers.model.ctr_logits`` itself, so the served model cannot drift from the trained one.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from trainers.model import ctr_logits


class ServingModule(tf.Module):
    def __init__(self, weights: dict[str, np.ndarray], embedding_dim: int):
        super().__init__(name="odl_ctr")
        self.weights = {k: tf.Variable(v, trainable=False, name=k.replace("/", "_"))
                        for k, v in weights.items()}
        self.serve = tf.function(self._serve, input_signature=list(request_specs(embedding_dim).values()))

    def _serve(self, user_emb, item_emb, position, hour):
        return {"probability": serving_fn(self.weights, user_emb, item_emb, position, hour)}


def request_specs(embedding_dim: int) -> dict[str, tf.TensorSpec]:
    d = embedding_dim
    return {"user_emb": tf.TensorSpec([None, d], tf.float32, name="user_emb"),
            "item_emb": tf.TensorSpec([None, d], tf.float32, name="item_emb"),
            "position": tf.TensorSpec([None], tf.int64, name="position"),
            "hour": tf.TensorSpec([None], tf.int64, name="hour")}


def serving_fn(w, user_emb, item_emb, position, hour):
    """Click probability from looked-up vectors and context: the plain serving computation."""
    n_pos = tf.shape(w["position_emb"], out_type=tf.int64)[0]
    position = tf.clip_by_value(position, 0, n_pos - 1)
    hour = tf.math.floormod(hour, 24)
    return tf.sigmoid(ctr_logits(w, user_emb, item_emb, position, hour))


def save(weights: dict[str, np.ndarray], embedding_dim: int, path: Path) -> None:
    """The plain serving SavedModel (the reference the optimised one is checked against)."""
    module = ServingModule(weights, embedding_dim)
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})


def save_optimised(weights: dict[str, np.ndarray], embedding_dim: int, path: Path,
                   jit: bool | None = None) -> dict:
    """The optimised SavedModel (``exporters.graph``): ``serving_default`` as the plain one's,
    plus ``apply_weights`` (in-place dense refresh) and ``refresh_cache`` (which a loader's
    ``CacheRefresher`` calls on its policy).  Returns the passes' report."""
    from exporters.graph.module import OptimisedModule
    module = OptimisedModule(serving_fn, weights, request_specs(embedding_dim), "probability",
                             jit=jit)
    module.warm()
    tf.saved_model.save(module, str(path), signatures={
        "serving_default": module.serve, "apply_weights": module.apply_weights,
        "refresh_cache": module.refresh_cache})
    return {**module.report.to_dict(), "xla": module.jit}
