"""The feature job's real-time features, recomputed over a whole log at once.

The stream attaches to each impression the counts of its user's and item's windows as of the
impression (``odl.features``: 1-minute tiles, a window ending at the newest minute boundary at or
before the impression, events strictly before it).  Here the same windows are counted with sorted
arrays, and the same ``odl.features.dense_values`` turns the counts into model inputs, so the
model in `odl eval` sees what the live trainer sees.  Clicks count at their own event time.
"""
from __future__ import annotations

import numpy as np

from odl.features import ITEM_WINDOW_S, TILE_SLIDE_S, USER_WINDOWS_S, dense_values, smoothed_ctr
from trainers.evaluation.logs import EvalLog


def _window_counts(entity: np.ndarray, ev_ts: np.ndarray, q_entity: np.ndarray,
                   lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """For each query q: events of ``q_entity[q]`` with time in [lo[q], hi[q]).  Events are
    keyed ``entity * span + time`` so that one sorted array answers every entity's ranges."""
    if not len(ev_ts) or not len(lo):
        return np.zeros(len(lo), np.int64)
    base = min(int(ev_ts.min()), int(lo.min())) - 1
    span = max(int(ev_ts.max()), int(hi.max())) - base + 1
    keys = np.sort(entity * span + (ev_ts - base))
    return (np.searchsorted(keys, q_entity * span + (hi - base), "left")
            - np.searchsorted(keys, q_entity * span + (lo - base), "left"))


def window_features(log: EvalLog) -> np.ndarray:
    """[n, NUM_DENSE] float32: each impression's ``Features.dense`` as the stream computes it."""
    _, u = np.unique(log.user, return_inverse=True)
    _, i = np.unique(log.item, return_inverse=True)
    slide = TILE_SLIDE_S * 1000
    end = log.ts_ms - log.ts_ms % slide             # the tile in force ends here (exclusive)
    clicked = log.click_ts_ms >= 0

    def counts(ent: np.ndarray, window_s: int) -> tuple[np.ndarray, np.ndarray]:
        lo = end - window_s * 1000
        imps = _window_counts(ent, log.ts_ms, ent, lo, end)
        clicks = _window_counts(ent[clicked], log.click_ts_ms[clicked], ent, lo, end)
        return imps, clicks

    (ui5, uc5), (ui1, uc1) = (counts(u, w) for w in USER_WINDOWS_S)
    ii, ic = counts(i, ITEM_WINDOW_S)
    ctr = smoothed_ctr(ii.astype(np.float64), ic.astype(np.float64))
    cols = zip(ui5.tolist(), uc5.tolist(), ui1.tolist(), uc1.tolist(), ii.tolist(), ic.tolist(),
               ctr.tolist())
    return np.asarray([dense_values(*c) for c in cols], np.float32)
