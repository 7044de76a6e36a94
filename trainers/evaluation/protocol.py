"""Progressive validation with the stream's label timing.

Every row is scored by every learner before any learner trains on it, in event-time order, a
batch of rows at a time.  When a learner may *train* on a row depends on its label timing -- the
same choices the live trainer has (``trainer.label_mode``):

* ``immediate`` -- the label right after the row is scored (no delay: the plain protocol);
* ``unaligned`` -- a positive when its click arrives, a negative when the attribution window
  closes (what the feature job emits, trained as it arrives);
* ``aligned``   -- both when the window closes, in impression order (``align_labels``);
* ``delayed``   -- a provisional negative at once, and the positive again when the click
  arrives (fake negatives, corrected by importance weights: ``trainers.delayed_feedback``).

Peers and baselines learn with ``unaligned`` timing when there is a delay, else ``immediate``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np


TIMINGS = ("immediate", "unaligned", "aligned", "delayed")

# kinds of training events
FINAL, PROVISIONAL, CORRECTION = 0, 1, 2


@dataclass(frozen=True)
class TrainEvents:
    """Training events of one timing, in the order they are released: (due, row) ascending."""
    due_ms: np.ndarray
    row: np.ndarray
    label: np.ndarray
    kind: np.ndarray


class ReplayLog(Protocol):
    """What the protocol and the contestants read of a log: the default shape's ``EvalLog`` or
    a spec's ``SpecLog``."""
    name: str
    ts_ms: np.ndarray        # int64 [n] event time, non-decreasing
    label: np.ndarray        # float32 [n]
    click_ts_ms: np.ndarray  # int64 [n] the click's event time; -1 without a click
    item: np.ndarray         # int64 [n] what the popularity baseline counts

    def __len__(self) -> int: ...

    @property
    def span_ms(self) -> int: ...

    def batch(self, rows: np.ndarray, labels: np.ndarray | None = None,
              provisional: np.ndarray | None = None) -> Any: ...

    def make_model(self, cfg: Any) -> Any: ...

    def tokens(self, r: int) -> tuple[dict[str, list[str]], dict[str, float]]: ...


class Learner(Protocol):
    name: str
    timing: str

    def predict(self, log: ReplayLog, rows: np.ndarray) -> np.ndarray: ...

    def learn(self, log: ReplayLog, events: TrainEvents, sel: slice) -> None: ...


def train_events(log: ReplayLog, timing: str, window_ms: int) -> TrainEvents:
    """When each label reaches a learner of ``timing``; ``window_ms`` is the attribution window."""
    if timing not in TIMINGS:
        raise ValueError(f"unknown label timing {timing!r}; one of {TIMINGS}")
    n = len(log)
    rows = np.arange(n, dtype=np.int64)
    clicked = log.label > 0
    if timing == "immediate" or window_ms == 0:
        due, row, lab, kind = log.ts_ms, rows, log.label, np.zeros(n, np.int8)
    elif timing == "unaligned":
        due = np.where(clicked, log.click_ts_ms, log.ts_ms + window_ms)
        row, lab, kind = rows, log.label, np.zeros(n, np.int8)
    elif timing == "aligned":
        due, row, lab, kind = log.ts_ms + window_ms, rows, log.label, np.zeros(n, np.int8)
    else:  # delayed
        pos = rows[clicked]
        due = np.concatenate([log.ts_ms, log.click_ts_ms[pos]])
        row = np.concatenate([rows, pos])
        lab = np.concatenate([np.zeros(n, np.float32), np.ones(len(pos), np.float32)])
        kind = np.concatenate([np.full(n, PROVISIONAL, np.int8), np.full(len(pos), CORRECTION, np.int8)])
    order = np.lexsort((row, due))
    return TrainEvents(np.asarray(due, np.int64)[order], row[order],
                       np.asarray(lab, np.float32)[order], kind[order])


@dataclass
class ReplayResult:
    scores: dict[str, np.ndarray]      # learner -> [n] probability scored before training
    seconds: dict[str, float]          # learner -> time spent predicting and learning


def replay(log: ReplayLog, learners: list[Learner], batch_size: int, window_ms: int,
           on_half: Callable[[], None] | None = None,
           progress: Callable[[int, int], None] | None = None) -> ReplayResult:
    """Score every row with every learner, then release the training events that are due."""
    n = len(log)
    events = {t: train_events(log, t, window_ms) for t in {lr.timing for lr in learners}}
    cursor = {t: 0 for t in events}
    scores = {lr.name: np.full(n, np.nan, np.float32) for lr in learners}
    seconds = {lr.name: 0.0 for lr in learners}
    half_done = False
    for a in range(0, n, batch_size):
        b = min(n, a + batch_size)
        rows = np.arange(a, b)
        for lr in learners:
            t0 = time.perf_counter()
            scores[lr.name][a:b] = lr.predict(log, rows)
            seconds[lr.name] += time.perf_counter() - t0
        now = log.ts_ms[b - 1]
        for timing, ev in events.items():
            # due by the end of this batch, and only rows already scored
            lo = cursor[timing]
            hi = lo + int(np.searchsorted(ev.due_ms[lo:], now, side="right"))
            late = np.nonzero(ev.row[lo:hi] >= b)[0]
            if len(late):
                hi = lo + int(late[0])
            cursor[timing] = hi
            for s in range(lo, hi, batch_size):
                sel = slice(s, min(hi, s + batch_size))
                for lr in learners:
                    if lr.timing == timing:
                        t0 = time.perf_counter()
                        lr.learn(log, ev, sel)
                        seconds[lr.name] += time.perf_counter() - t0
        if on_half is not None and not half_done and b >= n // 2:
            on_half()
            half_done = True
        if progress is not None:
            progress(b, n)
    return ReplayResult(scores, seconds)
