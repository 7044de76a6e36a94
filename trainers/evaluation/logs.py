"""Time-ordered logs as arrays: what `odl eval` replays.

A log is one impression per row, in event-time order, with its label and, for a click, the
click's own event time.  The protocol (``evaluation.protocol``) decides from these when each
learner may see each label.  Times are the log's own event times in milliseconds: for MovieLens
the original rating timestamps (not the compressed times of the live replay), for the synthetic
stream the generator's clock.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import orjson

from odl.config import SourceConfig


@dataclass(frozen=True)
class EvalLog:
    name: str
    ts_ms: np.ndarray        # int64 [n] impression event time, non-decreasing
    user: np.ndarray         # int64 [n]
    item: np.ndarray         # int64 [n]
    position: np.ndarray     # int64 [n]
    hour: np.ndarray         # int64 [n]
    label: np.ndarray        # float32 [n] 1.0 = clicked
    click_ts_ms: np.ndarray  # int64 [n] the click's event time; -1 without a click
    features: np.ndarray | None = None  # [n, NUM_DENSE] real-time features; None: no history

    def with_features(self) -> "EvalLog":
        """The log with the feature job's real-time features attached (``evaluation.features``)."""
        from trainers.evaluation.features import window_features
        return replace(self, features=window_features(self))

    def __post_init__(self) -> None:
        n = len(self.ts_ms)
        for f in ("user", "item", "position", "hour", "label", "click_ts_ms"):
            if len(getattr(self, f)) != n:
                raise ValueError(f"log {self.name}: column {f} has {len(getattr(self, f))} rows, "
                                 f"ts_ms has {n}")
        if n and np.any(np.diff(self.ts_ms) < 0):
            raise ValueError(f"log {self.name}: rows are not in event-time order")

    def __len__(self) -> int:
        return len(self.ts_ms)

    def batch(self, rows: np.ndarray, labels: np.ndarray | None = None,
              provisional: np.ndarray | None = None):
        """The rows as the trainer's ``Batch`` (labels: zeros when only scoring)."""
        from trainers.model import Batch
        return Batch(self.user[rows], self.item[rows], self.position[rows], self.hour[rows],
                     labels if labels is not None else np.zeros(len(rows), np.float32),
                     self.ts_ms[rows], None if self.features is None else self.features[rows],
                     delayed=provisional)

    def make_model(self, cfg):
        from trainers.model import CTRModel
        return CTRModel(cfg)

    def tokens(self, r: int) -> tuple[dict[str, list[str]], dict[str, float]]:
        """The row for the linear peers: one-hot user and item ids."""
        return {"u": [f"u{self.user[r]}"], "i": [f"i{self.item[r]}"]}, {}

    @property
    def span_ms(self) -> int:
        return int(self.ts_ms[-1] - self.ts_ms[0]) if len(self) else 0

    def head(self, n: int) -> "EvalLog":
        cut = {f: getattr(self, f)[:n] for f in ("ts_ms", "user", "item", "position", "hour",
                                                   "label", "click_ts_ms")}
        if self.features is not None:
            cut["features"] = self.features[:n]
        return replace(self, **cut)


def movielens_log(directory: Path, click_delay_s: tuple[float, float] = (0.2, 2.0),
                  seed: int = 7) -> EvalLog:
    """The MovieLens ratings as the live replay turns them into events (``pipeline.movielens``:
    a rating >= 4 is a click a moment after the impression), on the dataset's own clock."""
    from pipeline.movielens import CLICK_THRESHOLD, load_ratings
    r = load_ratings(Path(directory))
    if not r:
        raise ValueError(f"no ratings in {directory}")
    a = np.array([(t, u, m) for t, u, m, _ in r], dtype=np.int64)
    label = np.array([y >= CLICK_THRESHOLD for *_, y in r], dtype=np.float32)
    ts = a[:, 0] * 1000
    rng = np.random.default_rng(seed)
    delay = (1000 * rng.uniform(*click_delay_s, size=len(r))).astype(np.int64)
    return EvalLog("movielens", ts, a[:, 1], a[:, 2], np.zeros(len(r), np.int64),
                   (a[:, 0] // 3600) % 24, label, np.where(label > 0, ts + delay, -1))


def synthetic_log(cfg: SourceConfig, impressions: int) -> EvalLog:
    """The synthetic stream (``pipeline.generator``: drifting preferences, delayed clicks) for
    ``impressions`` impressions, without the deliberately malformed events."""
    from pipeline.generator import SyntheticSource
    cfg = cfg.model_copy(update={"max_events": impressions, "malformed_rate": 0.0})
    rows: dict[tuple[str, int], list[int]] = {}
    clicks: dict[tuple[str, int], int] = {}
    for rec in SyntheticSource(cfg, start_ms=1_700_000_000_000).records():
        ev = orjson.loads(rec.value)
        key = (ev["request_id"], ev["item_id"])
        if rec.kind == "impression":
            rows[key] = [ev["ts_ms"], ev["user_id"], ev["item_id"], ev["position"],
                         ev["context"]["hour"]]
        elif rec.kind == "click":
            clicks[key] = ev["ts_ms"]
    keys = list(rows)    # insertion order = event-time order
    a = np.array([rows[k] for k in keys], dtype=np.int64)
    click_ts = np.array([clicks.get(k, -1) for k in keys], dtype=np.int64)
    return EvalLog("synthetic", a[:, 0], a[:, 1], a[:, 2], a[:, 3], a[:, 4],
                   (click_ts >= 0).astype(np.float32), click_ts)


