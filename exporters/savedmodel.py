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
        d = embedding_dim
        self.serve = tf.function(self._serve, input_signature=[
            tf.TensorSpec([None, d], tf.float32, name="user_emb"),
            tf.TensorSpec([None, d], tf.float32, name="item_emb"),
            tf.TensorSpec([None], tf.int64, name="position"),
            tf.TensorSpec([None], tf.int64, name="hour"),
        ])

    def _serve(self, user_emb, item_emb, position, hour):
        n_pos = tf.shape(self.weights["position_emb"], out_type=tf.int64)[0]
        position = tf.clip_by_value(position, 0, n_pos - 1)
        hour = tf.math.floormod(hour, 24)
        return {"probability": tf.sigmoid(ctr_logits(self.weights, user_emb, item_emb, position, hour))}


def check_weights(weights: dict[str, np.ndarray]) -> str | None:
    """Reason to refuse an export, or None: every weight must be finite."""
    for k, v in weights.items():
        if not np.all(np.isfinite(v)):
            return f"non-finite values in {k}"
    return None


def save(weights: dict[str, np.ndarray], embedding_dim: int, path: Path) -> None:
    module = ServingModule(weights, embedding_dim)
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
