"""Request-time features from the online feature store: what the model was trained with.

The feature job built every training sample's features with ``odl.features.features_as_of`` on
the entity state it keeps; the feature-store writer materialises that state in Redis
(``odl.feature_store``).  Serving reads the same state and calls the same function as of the
request's time, so a request sees what a sample at that moment would have seen (up to the
pipeline's lag).  With Redis away (``RedisGuard``) every entity has "no history" -- the
features of a user or item never seen, as training has them for new entities -- and the answer
says it is degraded.
"""
from __future__ import annotations

import time

import numpy as np

from odl.feature_store import FeatureStore
from odl.features import DEFAULT_DENSE, NUM_DENSE, dense_rows_as_of
from serving.guard import RedisGuard, Unavailable

_DEFAULT = np.asarray(DEFAULT_DENSE, np.float32)


class RequestFeatures:
    def __init__(self, store: FeatureStore, guard: RedisGuard):
        self.store, self.guard = store, guard

    def _states(self, users: list[int], items: list[int]):
        """{user: its state}, {item: its state} in two MGETs; raises Unavailable."""
        uniq_u, uniq_i = list(dict.fromkeys(users)), list(dict.fromkeys(items))
        return (dict(zip(uniq_u, self.guard.call(self.store.users, uniq_u))),
                dict(zip(uniq_i, self.guard.call(self.store.items, uniq_i))))

    def pairs(self, users: list[int], items: list[int], as_of_ms: int | None = None
              ) -> tuple[np.ndarray, bool]:
        """[n, NUM_DENSE] features of (users[k], items[k]) as of ``as_of_ms`` (default: now),
        and whether Redis was unavailable (then: the no-history defaults)."""
        n = len(users)
        try:
            u_state, i_state = self._states(users, items)
        except Unavailable:
            return np.tile(_DEFAULT, (n, 1)), True
        now = int(time.time() * 1000) if as_of_ms is None else as_of_ms
        rows = dense_rows_as_of(u_state, i_state, zip(users, items), now)
        return np.asarray(rows, np.float32).reshape(n, NUM_DENSE), False

    def default(self, n: int) -> np.ndarray:
        return np.tile(_DEFAULT, (n, 1))

