"""Synthetic event stream with hidden, drifting user preferences.

Every user and item has a latent vector; a user's click probability for an item is a logistic
function of their dot product, an item bias and a position penalty.  User vectors follow a
random walk in wall time, so a model that keeps learning beats one frozen at any point: that is
the property online learning exists for, and the demo measures it.
"""
from __future__ import annotations

import heapq
import json
import math
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from odl.config import SourceConfig
from odl.schemas import Click, Impression

CATEGORIES = 20
HOURS = 24


@dataclass(frozen=True, order=True)
class Record:
    """One record to produce: due time (ms), Kafka key, value, record timestamp (ms)."""
    due_ms: int
    key: bytes
    value: bytes
    ts_ms: int
    kind: str = "impression"


class SyntheticWorld:
    def __init__(self, cfg: SourceConfig):
        self.cfg = cfg
        rng = np.random.default_rng(cfg.seed)
        d = cfg.latent_dim
        self.users = rng.normal(size=(cfg.num_users, d)).astype(np.float32)
        self.items = (rng.normal(size=(cfg.num_items, d)) / math.sqrt(d)).astype(np.float32)
        self.item_bias = rng.normal(-1.6, 0.6, size=cfg.num_items).astype(np.float32)
        # Zipf-like item exposure: a few items are shown far more often than the tail.
        w = 1.0 / np.arange(1, cfg.num_items + 1) ** 0.8
        self.item_p = w / w.sum()
        self.rng = rng
        self._last_drift_ms: int | None = None

    def drift(self, now_ms: int) -> None:
        if self._last_drift_ms is None:
            self._last_drift_ms = now_ms
            return
        dt_min = (now_ms - self._last_drift_ms) / 60000.0
        if dt_min <= 0 or self.cfg.drift_per_minute == 0:
            return
        self._last_drift_ms = now_ms
        step = self.rng.normal(scale=self.cfg.drift_per_minute * math.sqrt(dt_min),
                               size=self.users.shape).astype(np.float32)
        self.users += step
        # keep the norm (and so the CTR level) stationary while the direction wanders
        norms = np.linalg.norm(self.users, axis=1, keepdims=True)
        self.users *= math.sqrt(self.cfg.latent_dim) / np.maximum(norms, 1e-6)

    def click_probability(self, user: int, items: np.ndarray, positions: np.ndarray) -> np.ndarray:
        logits = self.items[items] @ self.users[user] + self.item_bias[items] - 0.15 * positions
        return 1.0 / (1.0 + np.exp(-logits))


def _malformed(rng: random.Random, ts_ms: int) -> bytes:
    """A deliberately bad event of one of several kinds, so the DLQ path is always exercised."""
    kind = rng.randrange(5)
    if kind == 0:
        return b'{"type": "impression", "user_id": 1, '  # truncated JSON
    base = {"type": "impression", "request_id": f"bad-{rng.randrange(1 << 30)}", "user_id": 1,
            "item_id": 2, "position": 0, "ts_ms": ts_ms, "schema_version": 1}
    if kind == 1:
        base["schema_version"] = 99
    elif kind == 2:
        base["user_id"] = "not-a-number"
    elif kind == 3:
        del base["item_id"]
    else:
        base["type"] = "purchase"
    return json.dumps(base).encode()


class SyntheticSource:
    """Yields Records in due-time order; impressions at ``cfg.rate`` per second, clicks later."""

    def __init__(self, cfg: SourceConfig, start_ms: int):
        self.cfg = cfg
        self.world = SyntheticWorld(cfg)
        self.rng = random.Random(cfg.seed)
        self.start_ms = start_ms
        self._pending: list[Record] = []
        self._seq = 0

    def _request(self, now_ms: int) -> list[Record]:
        cfg, w = self.cfg, self.world
        w.drift(now_ms)
        user = self.rng.randrange(cfg.num_users)
        k = min(cfg.items_per_request, cfg.num_items)
        items = w.rng.choice(cfg.num_items, size=k, replace=False, p=w.item_p)
        positions = np.arange(k)
        probs = w.click_probability(user, items, positions)
        rid = f"r{self.start_ms:x}-{self._seq}"  # unique across restarts of the source
        self._seq += 1
        hour = (now_ms // 3_600_000) % HOURS
        out = []
        for pos, (item, p) in enumerate(zip(items.tolist(), probs.tolist())):
            imp = Impression(rid, user, item, pos, now_ms,
                             {"hour": int(hour), "category": item % CATEGORIES})
            out.append(Record(now_ms, str(user).encode(), imp.to_json(), now_ms))
            if self.rng.random() < p:
                lo, hi = cfg.click_delay_s
                ts = now_ms + int(1000 * self.rng.uniform(lo, hi))
                clk = Click(rid, user, item, ts, {"category": item % CATEGORIES})
                heapq.heappush(self._pending, Record(ts, str(user).encode(), clk.to_json(), ts, "click"))
        if cfg.malformed_rate and self.rng.random() < cfg.malformed_rate * k:
            out.append(Record(now_ms, b"bad", _malformed(self.rng, now_ms), now_ms, "malformed"))
        return out

    def records(self) -> Iterator[Record]:
        """Infinite (or ``max_events``-bounded) stream; the caller paces by ``due_ms``."""
        interval_ms = 1000.0 * self.cfg.items_per_request / self.cfg.rate
        t = float(self.start_ms)
        emitted = 0
        while self.cfg.max_events is None or emitted < self.cfg.max_events:
            now_ms = int(t)
            while self._pending and self._pending[0].due_ms <= now_ms:
                yield heapq.heappop(self._pending)
            for rec in self._request(now_ms):
                yield rec
                emitted += rec.kind == "impression"
            t += interval_ms
        while self._pending:
            yield heapq.heappop(self._pending)
