"""Restart budgets and actor incarnations: the one rule every ODL supervisor applies.

A supervisor restarts what died, but a crash loop must end with a visible failure instead of
spinning forever.  The budget is a *rate* -- at most ``max_restarts`` within any ``window_s`` --
so ten crashes spread over weeks never add up to a give-up, while ten in an hour do.

A Ray actor that is restarting answers every call with ``ActorUnavailableError`` (or a
``RayActorError`` saying it is restarting) until its new process is up, often several times a
second.  Those answers are one death, not many: a death is counted once per *incarnation*, and
the incarnation is the actor process's pid (:func:`wait_for_incarnation`).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable


class BudgetExhausted(RuntimeError):
    """More restarts within the window than the budget allows: the supervisor gives up."""


@dataclass
class RestartBudget:
    """At most ``max_restarts`` restarts within any ``window_s`` seconds (a sliding window)."""

    max_restarts: int
    window_s: float
    clock: Callable[[], float] = time.monotonic
    total: int = 0
    _recent: deque[float] = field(default_factory=deque)

    def record(self, why: str) -> None:
        """Count one restart; raise :class:`BudgetExhausted` when it breaks the budget."""
        self.total += 1
        self._recent.append(self.clock())
        if self.in_window > self.max_restarts:
            raise BudgetExhausted(
                f"{len(self._recent)} restarts within {self.window_s:.0f} s (budget "
                f"{self.max_restarts}); last: {why}")

    @property
    def in_window(self) -> int:
        """Restarts within the last ``window_s`` (older ones are forgotten)."""
        now = self.clock()
        while self._recent and now - self._recent[0] > self.window_s:
            self._recent.popleft()
        return len(self._recent)


def note_restart(cp: Any, instance: str, log: logging.Logger) -> None:
    """Count a restart in the control plane (``odl status`` shows it); with Redis away the
    restart still happens, only the count is missed (and logged)."""
    try:
        cp.record_restart(instance)
    except Exception as exc:  # noqa: BLE001
        log.warning("restart of %s not recorded in the control plane: %s", instance, exc)


class RunOnce:
    """Runs an actor's long ``run`` method once per process.  A driver whose call was lost (the
    actor unreachable for a moment, but not restarted) calls ``run`` again; that call must join
    the loop already running, not start a second one beside it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = False
        self._result: Any = None

    def __call__(self, fn: Callable[[], Any]) -> Any:
        with self._lock:
            if not self._done:
                try:
                    self._result = fn()
                finally:
                    self._done = True
            return self._result


def wait_for_incarnation(ray: Any, actor: Any, stop: threading.Event, timeout_s: float,
                         log: logging.Logger, died_grace_s: float = 5.0) -> int | None:
    """The pid of the actor's live process, waiting while Ray restarts it.

    Returns None when ``stop`` is set first; raises ``ActorDiedError`` when the actor stays dead
    for ``died_grace_s`` (Ray gave it up, or it was killed for good), and ``TimeoutError`` when
    it is still unreachable after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    died_since: float | None = None
    while not stop.is_set():
        try:
            return int(ray.get(actor.pid.remote(), timeout=10))
        except ray.exceptions.ActorDiedError:
            # normally final; tolerated briefly in case a restart is still being scheduled
            died_since = died_since or time.monotonic()
            if time.monotonic() - died_since > died_grace_s:
                raise
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
            # ActorUnavailableError, "The actor is restarting", a slow first call: same death
            died_since = None
            if time.monotonic() > deadline:
                raise TimeoutError(f"actor unreachable for {timeout_s:.0f} s: {exc}") from exc
            log.info("waiting for the actor to come back: %s", str(exc).splitlines()[0])
        stop.wait(0.5)
    return None
