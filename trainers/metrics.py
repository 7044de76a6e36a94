"""Progressive validation: every batch is scored before it is trained on, and AUC / log-loss are
computed over a sliding window of the most recent scored samples."""
from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass

import numpy as np


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties averaged; NaN if one class only."""
    labels = labels.astype(bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # ranks 1..n, ties averaged: a value's rank is the mean of the positions its copies occupy
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    r = (ends - (counts - 1) / 2.0)[inverse]
    return float((r[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(scores: np.ndarray, labels: np.ndarray) -> float:
    p = np.clip(scores, 1e-7, 1 - 1e-7)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def calibration(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean predicted over observed click rate: 1 is calibrated, below 1 under-predicts."""
    ctr = float(np.mean(labels)) if len(labels) else math.nan
    return float(np.mean(scores)) / ctr if ctr else math.nan


@dataclass(frozen=True)
class Figures:
    """The figures ODL reports for a set of scored samples, live (``ProgressiveValidator``) and
    in `odl eval` alike."""
    auc: float
    logloss: float
    calibration: float
    rows: int

    @classmethod
    def of(cls, scores: np.ndarray, labels: np.ndarray) -> "Figures":
        return cls(auc(scores, labels), log_loss(scores, labels), calibration(scores, labels),
                   len(labels))


class ProgressiveValidator:
    def __init__(self, window: int):
        self.scores: deque[float] = deque(maxlen=window)
        self.labels: deque[float] = deque(maxlen=window)
        self.seen = 0

    def add(self, scores: np.ndarray, labels: np.ndarray) -> None:
        self.scores.extend(scores.tolist())
        self.labels.extend(labels.tolist())
        self.seen += len(labels)

    def summary(self) -> dict[str, float]:
        if not self.labels:
            return {"auc": math.nan, "logloss": math.nan, "calibration": math.nan,
                    "ctr": math.nan, "window": 0}
        s, y = np.asarray(self.scores), np.asarray(self.labels)
        f = Figures.of(s, y)
        return {"auc": f.auc, "logloss": f.logloss, "calibration": f.calibration,
                "ctr": float(y.mean()), "window": len(y)}


class PairedValidator:
    """The live model and another (``other``: the served version's shadow, the frozen copy)
    scored on the same samples: two windows of different samples differ by their samples as
    much as by their models.  The quality gate compares a candidate with what is served this
    way; the frozen baseline too (a window of the live model's alone reached back to samples
    scored before the copy existed, by a younger model: two such windows read 0.621 live
    against 0.653 frozen in a 60 s demo).  Reset (the served pair, whenever the served version
    changes) runs in the exporter's thread, while the training thread adds and the heartbeat
    summarises: hence the lock (a summary between two of reset's clears once paired 807 labels
    with no scores)."""

    def __init__(self, window: int, other: str = "served"):
        self.other = other
        self.live: deque[float] = deque(maxlen=window)
        self.other_scores: deque[float] = deque(maxlen=window)
        self.labels: deque[float] = deque(maxlen=window)
        self.seen = 0
        self._lock = threading.Lock()

    def reset(self) -> None:
        with self._lock:
            for d in (self.live, self.other_scores, self.labels):
                d.clear()

    def add(self, live: np.ndarray, other: np.ndarray, labels: np.ndarray) -> None:
        """``other``: the other model's scores, NaN where it gave none (not paired)."""
        known = ~np.isnan(other)
        with self._lock:
            self.live.extend(live[known].tolist())
            self.other_scores.extend(other[known].tolist())
            self.labels.extend(labels[known].tolist())
            self.seen += int(known.sum())

    def summary(self) -> dict[str, float]:
        with self._lock:
            if not self.labels:
                return {"n": 0}
            y, live, other = (np.asarray(d) for d in (self.labels, self.live, self.other_scores))
        a, b = Figures.of(live, y), Figures.of(other, y)
        return {"n": len(y), "auc_live": a.auc, f"auc_{self.other}": b.auc,
                "logloss_live": a.logloss, f"logloss_{self.other}": b.logloss}
