"""The trainer's Prometheus endpoint and probes, served by the driver (`odl run trainer`).

The trainer's work runs in a Ray actor, which on a cluster lives on a Ray worker, not in the
pod or container that Prometheus scrapes and Kubernetes probes (the driver's).  So the driver
serves the endpoint on ``metrics.host`` and relays what the actor's own registry holds:

* ``/metrics``: the actor's metrics as it last exposed them (``metrics_text``: a single trainer's
  registry; a training group's coordinator and each member, the members' series labelled
  ``member``), plus the driver's ``odl_trainer_up``, ``odl_trainer_restarts_total`` and
  ``odl_trainer_relay_age_seconds``;
* ``/healthz`` (liveness): 200 while the actor answers the driver's polls (within
  ``stale_s``) and its run loop has not ended; 503 with the reason otherwise;
* ``/ready`` (readiness): 200 once the actor has answered at least once (it has restored its
  checkpoint and is consuming).
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from odl.probes import ProbeServer

POLL_S = 5.0


def merge(parts: list[tuple[str, dict[str, str]]],
          only: dict[int, tuple[str, ...]] | None = None) -> str:
    """One exposition of several processes' ``(text, labels)``: each sample gets its part's
    labels (a group member's ``member="i"``), and a family that several parts define appears
    once (Prometheus refuses a family declared twice in one scrape).  ``only`` keeps, of part
    k, the families whose names start with the given prefixes (a coordinator imports the
    members' modules, whose metrics it never sets)."""
    from prometheus_client.core import Metric
    from prometheus_client.exposition import generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.registry import Collector, CollectorRegistry

    families: dict[str, Metric] = {}
    for k, (text, labels) in enumerate(parts):
        for fam in text_string_to_metric_families(text):
            if only and k in only and not fam.name.startswith(only[k]):
                continue
            m = families.get(fam.name)
            if m is None:
                m = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for smp in fam.samples:
                m.add_sample(smp.name, {**smp.labels, **labels}, smp.value, smp.timestamp,
                             smp.exemplar)

    class _Fixed(Collector):
        def collect(self):
            return list(families.values())

    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Fixed())
    return generate_latest(reg).decode()


class MetricsRelay:
    """Polls ``fetch`` (the actor's ``metrics_text``) on a thread and serves the result."""

    def __init__(self, host: str, port: int, fetch: Callable[[], str], stale_s: float = 60.0,
                 poll_s: float = POLL_S):
        self.fetch, self.stale_s, self.poll_s = fetch, stale_s, poll_s
        self.text = ""
        self.answered_at: float | None = None
        self.restarts = 0
        self.ended: str | None = None       # why the run loop ended, once it has
        self.last_error: str | None = None
        self._stop = threading.Event()
        self.probes = ProbeServer(host, port, self.metrics_text, self.health, self.readiness,
                                  name="odl-metrics-relay")
        self.port = self.probes.port
        threading.Thread(target=self._poll, name="odl-metrics-poll", daemon=True).start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                self.text = self.fetch()
                self.answered_at = time.monotonic()
                self.last_error = None
            except Exception as exc:  # noqa: BLE001 - the actor restarting, or gone: reported
                self.last_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self._stop.wait(self.poll_s)

    def age_s(self) -> float | None:
        return None if self.answered_at is None else time.monotonic() - self.answered_at

    def health(self) -> str | None:
        """None when live, else why not."""
        if self.ended is not None:
            return f"trainer run ended: {self.ended}"
        age = self.age_s()
        if age is None:
            return None   # starting (restoring a checkpoint): readiness says so, not liveness
        if age > self.stale_s:
            return f"trainer actor has not answered for {age:.0f} s ({self.last_error})"
        return None

    def readiness(self) -> str | None:
        """None once the actor has answered and is live, else why not."""
        if self.answered_at is None:
            return self.health() or "trainer actor starting"
        return self.health()

    def metrics_text(self) -> str:
        age = self.age_s()
        up = int(age is not None and self.health() is None)
        driver = (
            "# HELP odl_trainer_up 1 while the trainer actor answers its driver\n"
            "# TYPE odl_trainer_up gauge\n"
            f"odl_trainer_up {up}\n"
            "# HELP odl_trainer_restarts_total trainer actor processes that died and were restarted\n"
            "# TYPE odl_trainer_restarts_total counter\n"
            f"odl_trainer_restarts_total {self.restarts}\n"
            "# HELP odl_trainer_relay_age_seconds age of the relayed actor metrics\n"
            "# TYPE odl_trainer_relay_age_seconds gauge\n"
            f"odl_trainer_relay_age_seconds {-1 if age is None else round(age, 3)}\n")
        return self.text + driver

    def close(self) -> None:
        self._stop.set()
        self.probes.close()
