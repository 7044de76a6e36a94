"""Delayed-feedback training: fake negatives with importance weighting (FNW; Ktena et al.,
"Addressing Delayed Feedback for Continuous Training with Neural Networks in CTR Prediction",
RecSys 2019).

Every impression is trained at once as a negative -- provisional: its click may still come --
and, when the click arrives, the same impression is trained again as a positive.  The samples
the model sees are then drawn from a biased distribution ``b``: a clicked impression appears
once as a negative and once as a positive, so with the true click probability ``p(x)``

    b(y=1 | x) = p / (1 + p),        b(y=0 | x) = 1 / (1 + p).

Importance weighting turns the loss on ``b`` back into the loss on the true distribution:
weight ``p(y | x) / b(y | x)``, i.e. ``1 + p`` on positives and ``(1 - p)(1 + p)`` on
negatives, with ``p`` the model's own current prediction (no gradient through the weight).
The model then estimates ``p`` itself: serving is unchanged.

Why FNW: it trains each impression the moment it is shown (the freshness of the unaligned mode),
needs no second model (ES-DFM learns an elapsed-time model) and no re-ingestion of real
negatives after the window (DEFER), and its correction is exact when every click arrives within
the attribution window.  Its limit: the weights use the model's own estimate, so early in
training, while ``p`` is poor, the correction is poor too.
"""
from __future__ import annotations

import tensorflow as tf


def fnw_weights(labels: tf.Tensor, logits: tf.Tensor, delayed: tf.Tensor) -> tf.Tensor:
    """Per-sample loss weights: FNW's importance weights where ``delayed`` is 1, else 1."""
    p = tf.stop_gradient(tf.sigmoid(logits))
    fnw = tf.where(labels > 0.5, 1.0 + p, (1.0 - p) * (1.0 + p))
    return tf.where(delayed > 0.5, fnw, tf.ones_like(p))
