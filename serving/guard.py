"""Degraded mode: a circuit breaker in front of serving's Redis reads.

A replica must keep answering when Redis is away.  Every Redis read on the request path goes
through ``RedisGuard.call``: while Redis answers, calls pass through; the first connection error
or timeout opens the breaker, and for ``retry_s`` every call fails at once with ``Unavailable``
(callers fall back to the local cache and defaults) instead of each request waiting for a socket
timeout.  After ``retry_s`` one call is let through as a probe; its success closes the breaker,
so a replica recovers by itself when Redis comes back.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, TypeVar

import redis

log = logging.getLogger("odl.serving.guard")
T = TypeVar("T")
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError, OSError)


class Unavailable(Exception):
    """Redis is (or was, less than ``retry_s`` ago) unreachable."""


class RedisGuard:
    def __init__(self, retry_s: float = 1.0, on_change: Callable[[bool], None] | None = None):
        self.retry_s = retry_s
        self.on_change = on_change or (lambda degraded: None)
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._next_probe = 0.0
        self.failures = 0
        self.outages = 0

    @property
    def degraded(self) -> bool:
        return self._down_since is not None

    def call(self, fn: Callable[..., T], *args, **kwargs) -> T:
        with self._lock:
            if self._down_since is not None:
                now = time.monotonic()
                if now < self._next_probe:
                    raise Unavailable("redis unavailable")
                self._next_probe = now + self.retry_s    # this call is the probe
        try:
            out = fn(*args, **kwargs)
        except REDIS_DOWN as exc:
            self._failed(exc)
            raise Unavailable(str(exc)) from exc
        if self._down_since is not None:
            self._recovered()
        return out

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            self.failures += 1
            self._next_probe = time.monotonic() + self.retry_s
            if self._down_since is not None:
                return
            self._down_since = time.monotonic()
            self.outages += 1
        log.warning("redis unavailable (%s): serving from the local cache and defaults", exc)
        self.on_change(True)

    def _recovered(self) -> None:
        with self._lock:
            if self._down_since is None:
                return
            down_for = time.monotonic() - self._down_since
            self._down_since = None
        log.info("redis is back after %.1f s", down_for)
        self.on_change(False)
