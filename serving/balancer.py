"""A client that behaves like the load balancer in front of the serving fleet.

Kubernetes' Service (or any L7 balancer with health checks) sends a request to one replica that
passes its readiness check, and a request whose connection fails is retried once on another
replica.  ``odl bench chaos`` puts its load through this client, so a killed replica costs what
it would cost behind a real balancer -- not what a client pinned to one address would see.

Readiness is ``GET /healthz`` (200 once a model is loaded), checked every ``check_every_s`` in a
thread; with no replica ready, any replica is tried (a balancer that fails open).  Only
connection errors and timeouts are retried: a non-2xx answer is the fleet's answer.
"""
from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

import requests

from odl.names import DEGRADED_HEADER


@dataclass
class Answer:
    """One request's fate through the balancer."""
    status: int | None              # None: no replica answered (after the retry)
    degraded: bool = False
    retried: bool = False
    error: str | None = None
    body: dict | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass
class FleetStats:
    sent: int = 0
    ok: int = 0
    degraded: int = 0
    retried: int = 0
    failed: int = 0
    failures: dict[str, int] = field(default_factory=dict)   # reason -> count

    def add(self, a: Answer) -> None:
        self.sent += 1
        self.retried += a.retried
        if a.ok:
            self.ok += 1
            self.degraded += a.degraded
            return
        self.failed += 1
        why = f"http {a.status}" if a.status is not None else (a.error or "no answer")
        self.failures[why] = self.failures.get(why, 0) + 1


class FleetClient:
    def __init__(self, urls: list[str], timeout_s: float = 5.0, check_every_s: float = 1.0,
                 seed: int | None = None):
        if not urls:
            raise ValueError("a fleet needs at least one replica URL")
        self.urls = list(urls)
        self.timeout_s = timeout_s
        self.check_every_s = check_every_s
        self._ready = set(self.urls)
        self._rng = random.Random(seed)
        self._local = threading.local()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.stats = FleetStats()
        self._checker = threading.Thread(target=self._check_loop, name="odl-balancer-health", daemon=True)
        self._checker.start()

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
        return s

    def _check_loop(self) -> None:
        s = requests.Session()
        while not self._stop.is_set():
            ready = set()
            for url in self.urls:
                try:
                    if s.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                        ready.add(url)
                except requests.RequestException:
                    pass
            self._ready = ready
            self._stop.wait(self.check_every_s)

    def ready(self) -> set[str]:
        return set(self._ready)

    def _pick(self, exclude: str | None = None) -> str:
        pool = sorted((self._ready or set(self.urls)) - {exclude}) or [u for u in self.urls if u != exclude]
        with self._lock:
            return self._rng.choice(pool or self.urls)

    def post(self, path: str, body: dict) -> Answer:
        """POST ``body`` to ``path`` on one ready replica; once more on another on a connection
        error or timeout.  Never raises for the fleet's faults: the Answer says what happened."""
        first = self._pick()
        answer = self._try(first, path, body)
        if answer.status is None and len(self.urls) > 1:
            answer = self._try(self._pick(exclude=first), path, body)
            answer.retried = True
        with self._lock:
            self.stats.add(answer)
        return answer

    def _try(self, url: str, path: str, body: dict) -> Answer:
        try:
            resp = self._session().post(f"{url}{path}", json=body, timeout=self.timeout_s)
        except requests.RequestException as exc:
            self._local.session = None     # a broken keep-alive connection: start afresh
            return Answer(None, error=type(exc).__name__)
        try:
            payload = resp.json()
        except ValueError:
            payload = None
        return Answer(resp.status_code, degraded=DEGRADED_HEADER in resp.headers, body=payload)

    def close(self) -> None:
        self._stop.set()
        self._checker.join(timeout=5)


def run_load(client: FleetClient, path: str, body_of, rate_per_s: float, stop: threading.Event,
             threads: int = 2) -> list[threading.Thread]:
    """Steady load: ``threads`` senders, together ``rate_per_s`` requests a second (a sender
    that falls behind does not burst to catch up: the load stays bounded), until ``stop``."""
    gap = threads / rate_per_s

    def sender(k: int) -> None:
        rng = random.Random(k)
        nxt = time.monotonic() + rng.random() * gap
        while not stop.is_set():
            delay = nxt - time.monotonic()
            if delay > 0 and stop.wait(delay):
                return
            client.post(path, body_of(rng))
            nxt = max(nxt + gap, time.monotonic())

    out = [threading.Thread(target=sender, args=(k,), name=f"odl-load-{k}", daemon=True)
           for k in range(threads)]
    for t in out:
        t.start()
    return out
