"""Request-time features from the online feature store: what the model was trained with.

The feature job built every training sample's features with ``odl.features.features_as_of`` on
the entity state it keeps; the feature-store writer materialises that state in Redis
(``odl.feature_store``).  Serving reads the same state and calls the same function as of the
request's time, so a request sees what a sample at that moment would have seen (up to the
pipeline's lag).  With Redis away (``RedisGuard``) every entity has "no history" -- the
features of a user or item never seen, as training has them for new entities -- and the answer
says it is degraded.

Items repeat across requests (every recommendation scores ~100 candidates), and an item's part
of the features changes only when its state does or the minute turns; so each replica keeps an
item's part for ``item_ttl_s`` within the same minute (0 disables it).  That adds at most
``item_ttl_s`` to the pipeline's lag for item features; user features are read every time.
"""
from __future__ import annotations

import threading
import time

import numpy as np

from odl.feature_store import FeatureStore
from odl.features import (DEFAULT_DENSE, NUM_DENSE, TILE_SLIDE_S, item_dense_as_of,
                          user_dense_as_of)
from serving.guard import RedisGuard, Unavailable

_DEFAULT = np.asarray(DEFAULT_DENSE, np.float32)
MAX_CACHED_ITEMS = 200_000


class RequestFeatures:
    def __init__(self, store: FeatureStore, guard: RedisGuard, item_ttl_s: float = 1.0):
        self.store, self.guard, self.item_ttl_s = store, guard, item_ttl_s
        self._items: dict[int, tuple[float, int, list[float]]] = {}   # item -> (expires, minute, part)
        self._lock = threading.Lock()
        self.item_hits = 0

    def _item_parts(self, items: list[int], now_ms: int) -> dict[int, list[float]]:
        """Each item's part, from the cache or the store (one MGET for the rest)."""
        minute = now_ms - now_ms % (TILE_SLIDE_S * 1000)
        mono = time.monotonic()
        parts, missing = {}, []
        with self._lock:
            for i in items:
                e = self._items.get(i)
                if e is not None and e[0] > mono and e[1] == minute:
                    parts[i] = e[2]
                else:
                    missing.append(i)
            self.item_hits += len(parts)
        if missing:
            states = self.guard.call(self.store.items, missing)
            fresh = {i: item_dense_as_of(s, now_ms) for i, s in zip(missing, states)}
            parts.update(fresh)
            if self.item_ttl_s > 0:
                with self._lock:
                    if len(self._items) > MAX_CACHED_ITEMS:
                        self._items.clear()
                    expires = mono + self.item_ttl_s
                    self._items.update((i, (expires, minute, p)) for i, p in fresh.items())
        return parts

    def pairs(self, users: list[int], items: list[int], as_of_ms: int | None = None
              ) -> tuple[np.ndarray, bool]:
        """[n, NUM_DENSE] features of (users[k], items[k]) as of ``as_of_ms`` (default: now),
        and whether Redis was unavailable (then: the no-history defaults)."""
        n = len(users)
        now = int(time.time() * 1000) if as_of_ms is None else as_of_ms
        try:
            uniq_u = list(dict.fromkeys(users))
            u_part = {u: user_dense_as_of(s, now)
                      for u, s in zip(uniq_u, self.guard.call(self.store.users, uniq_u))}
            i_part = self._item_parts(list(dict.fromkeys(items)), now)
        except Unavailable:
            return self.default(n), True
        rows = [u_part[u] + i_part[i] for u, i in zip(users, items)]
        return np.asarray(rows, np.float32).reshape(n, NUM_DENSE), False

    def default(self, n: int) -> np.ndarray:
        return np.tile(_DEFAULT, (n, 1))
