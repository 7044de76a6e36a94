"""Label alignment: train on an impression only once its label is final.

The feature job emits a positive the moment its click arrives but a negative only when the
attribution window closes, so a trainer that learns from samples as they arrive sees each
entity's positives ~one window before its negatives.  On bursty streams (MovieLens: a user rates
dozens of films within minutes) that bias drives progressive AUC far below 0.5.  The aligner
holds samples until the stream's own clock (the newest impression time seen) has passed
``impression time + hold``, then releases them in impression-time order, positives and negatives
together.  The price is freshness: ``hold`` (window + watermark delay + slack) more latency.

Held samples are not yet trained; the trainer's checkpoints store them with the consumer
positions, so a crash neither loses nor repeats them.  Rows are int64 arrays (``trainers.samples``)
kept in arrival-ordered parts: samples arrive nearly in time order, so a release only looks at the
oldest parts, and a stable sort by time keeps arrival order among equal times.
"""

from __future__ import annotations

import numpy as np

from trainers.samples import DEFAULT_LAYOUT, RowLayout


class LabelAligner:
    def __init__(self, hold_ms: int, layout: RowLayout = DEFAULT_LAYOUT):
        self.hold_ms = hold_ms
        self.layout = layout
        self._parts: list[np.ndarray] = []   # arrival order
        self._min_ts: list[int] = []
        self._n = 0
        self.clock_ms = 0

    def __len__(self) -> int:
        return self._n

    def add(self, rows: np.ndarray) -> None:
        if not len(rows):
            return
        self._parts.append(rows)
        self._min_ts.append(int(rows[:, self.layout.ts].min()))
        self._n += len(rows)
        self.clock_ms = max(self.clock_ms, int(rows[:, self.layout.ts].max()))

    def release(self, flush: bool = False) -> np.ndarray:
        """Rows whose window has closed (all of them with ``flush``), oldest impression first."""
        limit = self.clock_ms - self.hold_ms
        out, parts, mins = [], [], []
        for part, low in zip(self._parts, self._min_ts):
            if not flush and low > limit:
                parts.append(part)
                mins.append(low)
                continue
            due = np.ones(len(part), bool) if flush else part[:, self.layout.ts] <= limit
            out.append(part[due])
            rest = part[~due]
            if len(rest):
                parts.append(rest)
                mins.append(int(rest[:, self.layout.ts].min()))
        if not out:
            return self.layout.empty()
        self._parts, self._min_ts = parts, mins
        rows = np.concatenate(out)
        self._n -= len(rows)
        return rows[np.argsort(rows[:, self.layout.ts], kind="stable")]

    def snapshot(self) -> np.ndarray:
        """The held rows in arrival order (for a checkpoint)."""
        return np.concatenate(self._parts) if self._parts else self.layout.empty()

    def restore(self, rows: np.ndarray, clock_ms: int) -> None:
        self._parts, self._min_ts, self._n = [], [], 0
        self.add(rows)
        self.clock_ms = clock_ms
