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


class ProvisionalScores:
    """Progressive validation under delayed feedback.

    A provisional negative is trained the moment its impression is shown, long before its label
    is known, so it cannot be scored against its label then.  Its scores (the live model's, and
    the frozen copy's and the served version's shadow, NaN where absent) are kept here under the impression's key until the impression's final sample -- the positive,
    or the negative when the window closes -- brings the label: then the pair (score at
    impression time, final label) is what the validator sees, as in `odl eval`.  Bounded: the
    oldest scores go first.  Not checkpointed: after a restart, impressions provisionally scored
    before it are left out of the figures (only of the figures: training is unaffected).
    """

    def __init__(self, capacity: int):
        from collections import OrderedDict
        self.capacity = capacity
        self._scores: "OrderedDict[int, tuple[float, ...]]" = OrderedDict()
        self.unmatched = 0   # final samples whose provisional score was not (or no longer) here

    def __len__(self) -> int:
        return len(self._scores)

    def remember(self, keys, *columns) -> None:
        """One score column per model (the same columns every call)."""
        for k, *s in zip(keys.tolist(), *(c.tolist() for c in columns)):
            self._scores[k] = tuple(s)
        while len(self._scores) > self.capacity:
            self._scores.popitem(last=False)

    def settle(self, keys, labels, columns: int = 3):
        """(score columns..., labels) of the final samples whose provisional scores are here."""
        import numpy as np
        got = [(self._scores.pop(k), y) for k, y in zip(keys.tolist(), labels.tolist())
               if k in self._scores]
        self.unmatched += len(keys) - len(got)
        if not got:
            return tuple(np.zeros(0, np.float32) for _ in range(columns + 1))
        rows, ys = zip(*got)
        return (*(np.asarray(c, np.float32) for c in zip(*rows)), np.asarray(ys, np.float32))
