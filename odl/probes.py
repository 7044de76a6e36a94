"""Liveness and readiness of a process's real work, served beside its Prometheus metrics.

A probe on ``/metrics`` only proves that the HTTP thread answers: an exporter stuck for good in
a call to a hung actor, or a feature-store writer whose poll loop died, still answers it, and
Kubernetes keeps the pod.  So each process's work loops report their progress here, and the
probe endpoints judge that:

* ``/healthz`` (liveness): 503 naming the loop once any loop that has started has not passed
  for ``stall_s`` (``metrics.stall_s``), or once the process declared itself failed; 200
  otherwise, including before a loop's first pass (starting is readiness's business).
  A loop that waits for a dependency (the trainer actor, Redis) still passes: restarting this
  process would not bring the dependency back.
* ``/ready`` (readiness): 200 once every loop has passed at least once and none is waiting;
  503 naming what it waits for otherwise.
* ``/metrics``: the Prometheus exposition.

The paths are spelled here once: the components, the trainer's relay, the Kubernetes probes'
test and the stack tests import them.
"""
from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

METRICS_PATH = "/metrics"
HEALTH_PATH = "/healthz"
READY_PATH = "/ready"
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TEXT_TYPE = "text/plain; charset=utf-8"


class WorkProbe:
    """What a process's work loops report: ``beat(loop, waiting=...)`` once per pass."""

    def __init__(self, stall_s: float, clock: Callable[[], float] = time.monotonic):
        self.stall_s = stall_s
        self._clock = clock
        # loop -> (monotonic time of its last pass, what it waits for); one dict store per
        # pass, atomic under the GIL, so that a loop may beat per record
        self._loops: dict[str, tuple[float, str | None]] = {}
        self._expected: set[str] = set()
        self.failed: str | None = None

    def expect(self, *loops: str) -> "WorkProbe":
        """Loops that must pass once before the process is ready."""
        self._expected.update(loops)
        return self

    def beat(self, loop: str = "main", waiting: str | None = None) -> None:
        """A pass of ``loop``; ``waiting`` names the dependency it waits for, if it does."""
        self._loops[loop] = (self._clock(), waiting)

    def fail(self, reason: str) -> None:
        self.failed = reason

    def health(self) -> str | None:
        """None while alive, else why not."""
        if self.failed is not None:
            return self.failed
        now = self._clock()
        stalled = [(name, now - at) for name, (at, _) in dict(self._loops).items()
                   if now - at > self.stall_s]
        if stalled:
            name, age = max(stalled, key=lambda s: s[1])
            return f"work loop {name!r} made no progress for {age:.0f} s (limit {self.stall_s:.0f} s)"
        return None

    def readiness(self) -> str | None:
        """None when ready, else why not."""
        why = self.health()
        if why is not None:
            return why
        loops = dict(self._loops)
        missing = sorted(self._expected - set(loops))
        waiting = [f"{name}: {w}" for name, (_, w) in sorted(loops.items()) if w]
        if not loops or missing:
            return "starting" + (f" ({', '.join(missing)})" if missing else "")
        return "; ".join(waiting) or None


class ProbeServer:
    """``/metrics``, ``/healthz`` and ``/ready`` on one port, each answered by a callable."""

    def __init__(self, host: str, port: int, metrics: Callable[[], str],
                 health: Callable[[], str | None], readiness: Callable[[], str | None],
                 name: str = "odl-probes"):
        self.metrics, self.health, self.readiness = metrics, health, readiness
        probes = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                code, body, kind = probes.respond(self.path)
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_):   # probes every few seconds: not worth a log line
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, name=name, daemon=True).start()

    def respond(self, path: str) -> tuple[int, str, str]:
        path = path.split("?", 1)[0]
        if path == METRICS_PATH:
            return 200, self.metrics(), METRICS_TYPE
        if path in (HEALTH_PATH, READY_PATH):
            why = (self.health if path == HEALTH_PATH else self.readiness)()
            ok = "ok\n" if path == HEALTH_PATH else "ready\n"
            return (200, ok, TEXT_TYPE) if why is None else (503, why + "\n", TEXT_TYPE)
        return 404, "not found\n", TEXT_TYPE

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
