"""The serving side of the CallGraphOp cache: when a loaded optimised model recomputes its
weight-only cache (``refresh_cache``), under the policy its manifest carries
(``odl.model_store.CachePolicy``)."""
from __future__ import annotations

import threading
import time
from typing import Callable

from odl.model_store import CachePolicy


class CacheRefresher:
    """Host-side refresh policy for a loaded optimised model: ``refresh`` (its ``refresh_cache``
    signature) becomes due after ``every_n_calls`` calls or ``every_s`` seconds since the last
    refresh, whichever comes first.  Request threads only count (``on_call``: a counter and a
    clock read); the owner runs a due refresh (``run_due``) where it serialises it with weight
    writes -- the replica's model poll, under the model's write lock -- so a refresh computed
    from old weights can never overwrite the cache a weight refresh just wrote."""

    def __init__(self, refresh: Callable[[], object], policy: CachePolicy,
                 clock: Callable[[], float] = time.monotonic):
        self._refresh, self.policy, self._clock = refresh, policy, clock
        self._calls = 0
        self._at = clock()
        self._lock = threading.Lock()
        self.refreshes = 0

    @property
    def due(self) -> bool:
        with self._lock:
            return (self._calls >= self.policy.every_n_calls
                    or self._clock() - self._at >= self.policy.every_s)

    def on_call(self) -> bool:
        """Count a call; True if a refresh is due now."""
        with self._lock:
            self._calls += 1
        return self.due

    def run_due(self) -> bool:
        """Refresh if due; True if it did.  The caller holds what serialises weight writes."""
        if not self.due:
            return False
        self._refresh()
        with self._lock:
            self._calls, self._at = 0, self._clock()
            self.refreshes += 1
        return True

    def refreshed(self) -> None:
        """The cache was recomputed by other means (a weight refresh): restart the count."""
        with self._lock:
            self._calls, self._at = 0, self._clock()
