"""Build the serving SavedModel from a dense-weight snapshot.

The serving graph takes the user and item vectors (which serving reads from Redis) plus the
position and hour indices, and returns the click probability.  Its forward pass is
``trainers.model.ctr_logits`` itself, so the served model cannot drift from the trained one.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from odl.features import NUM_DENSE
from trainers.model import ctr_logits, dense_last_axis, forward


class ServingModule(tf.Module):
    def __init__(self, weights: dict[str, np.ndarray], embedding_dim: int):
        super().__init__(name="odl_ctr")
        self.weights = {k: tf.Variable(v, trainable=False, name=k.replace("/", "_"))
                        for k, v in weights.items()}
        self.serve = tf.function(self._serve, input_signature=list(request_specs(embedding_dim).values()))
        self.score_candidates = tf.function(
            self._candidates, input_signature=list(candidate_specs(embedding_dim).values()))

    def _serve(self, user_emb, item_emb, position, hour, features):
        return {"probability": serving_fn(self.weights, user_emb, item_emb, position, hour, features)}

    def _candidates(self, user_emb, item_emb, position, hour, features):
        return {"probability": candidates_fn(self.weights, user_emb, item_emb, position, hour, features)}


def request_specs(embedding_dim: int) -> dict[str, tf.TensorSpec]:
    """One row per (user, item) pair."""
    d = embedding_dim
    return {"user_emb": tf.TensorSpec([None, d], tf.float32, name="user_emb"),
            "item_emb": tf.TensorSpec([None, d], tf.float32, name="item_emb"),
            "position": tf.TensorSpec([None], tf.int64, name="position"),
            "hour": tf.TensorSpec([None], tf.int64, name="hour"),
            "features": tf.TensorSpec([None, NUM_DENSE], tf.float32, name="features")}


def candidate_specs(embedding_dim: int) -> dict[str, tf.TensorSpec]:
    """B users with C candidate items each: the recommendation request."""
    d = embedding_dim
    return {"user_emb": tf.TensorSpec([None, d], tf.float32, name="user_emb"),
            "item_emb": tf.TensorSpec([None, None, d], tf.float32, name="item_emb"),
            "position": tf.TensorSpec([None, None], tf.int64, name="position"),
            "hour": tf.TensorSpec([None], tf.int64, name="hour"),
            "features": tf.TensorSpec([None, None, NUM_DENSE], tf.float32, name="features")}


def _context(w, position, hour):
    n_pos = tf.shape(w["position_emb"], out_type=tf.int64)[0]
    return tf.clip_by_value(position, 0, n_pos - 1), tf.math.floormod(hour, 24)


def serving_fn(w, user_emb, item_emb, position, hour, features):
    """Click probability [B] from looked-up vectors, context and the real-time features
    (``odl.features.Features.dense``): the plain serving computation."""
    position, hour = _context(w, position, hour)
    return tf.sigmoid(ctr_logits(w, user_emb, item_emb, position, hour, features))


def candidates_fn(w, user_emb, item_emb, position, hour, features):
    """Click probabilities [B, C] of C candidates per user (features [B, C, F]: the user's and
    each candidate's): the same network on rank-3 input, its dense layers as Keras would run
    them there (tensordot on the last axis)."""
    position, hour = _context(w, position, hour)
    shape = tf.shape(item_emb)
    user = tf.broadcast_to(user_emb[:, None, :], shape)
    hour = tf.broadcast_to(hour[:, None], shape[:2])
    return tf.sigmoid(forward(w, user, item_emb, position, hour, features, dense=dense_last_axis)[0])


def save(weights: dict[str, np.ndarray], embedding_dim: int, path: Path) -> None:
    """The plain serving SavedModel (the reference the optimised one is checked against)."""
    module = ServingModule(weights, embedding_dim)
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve,
                                                       "score_candidates": module.score_candidates})


def optimised_module(weights: dict[str, np.ndarray], embedding_dim: int, jit: bool | None = None):
    from exporters.graph.module import OptimisedModule, Signature
    return OptimisedModule({
        "serve": Signature(serving_fn, request_specs(embedding_dim), "probability"),
        "score_candidates": Signature(candidates_fn, candidate_specs(embedding_dim), "probability"),
    }, weights, jit=jit)


def save_optimised(weights: dict[str, np.ndarray], embedding_dim: int, path: Path,
                   jit: bool | None = None) -> dict:
    """The optimised SavedModel (``exporters.graph``): ``serving_default`` and
    ``score_candidates`` as the plain one's, plus ``apply_weights`` (in-place dense refresh)
    and ``refresh_cache`` (which a loader's ``CacheRefresher`` calls on its policy).  Returns
    the passes' report per signature."""
    module = optimised_module(weights, embedding_dim, jit)
    module.warm()
    tf.saved_model.save(module, str(path), signatures=exported_signatures(module, {
        "serving_default": "serve", "score_candidates": "score_candidates"}))
    return {"signatures": {k: r.to_dict() for k, r in module.reports.items()}, "xla": module.jit,
            "xla_twins": bool(module.xla_twins)}


def exported_signatures(module, names: dict[str, str]) -> dict:
    """The SavedModel signatures of an optimised module: each request signature (exported name
    -> module attribute), its XLA twin (``<exported>_xla``, where the module has twins; a
    replica chooses, ``serving.model.xla_choice``), ``apply_weights`` and ``refresh_cache``."""
    out = {exported: getattr(module, attr) for exported, attr in names.items()}
    if module.xla_twins:
        prefix = {"serving_default": "serving"}
        out.update({f"{prefix.get(e, e)}_xla": getattr(module, f"{a}_xla") for e, a in names.items()})
    out.update(apply_weights=module.apply_weights, refresh_cache=module.refresh_cache)
    return out
