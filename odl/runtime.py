"""What every long-running ODL process shares: graceful stop on SIGTERM/SIGINT, a Prometheus
endpoint with liveness and readiness probes of its work loops (odl.probes) on ``metrics.host``,
and a heartbeat in the control plane."""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Callable

from prometheus_client import REGISTRY, Gauge, generate_latest

from odl.config import Config
from odl.control import ControlPlane, Heartbeater
from odl.probes import ProbeServer, WorkProbe

# Offsets from metrics.base_port, one per process kind; serving adds its replica index.
RESTARTS = Gauge("odl_component_restarts", "restarts of this component instance that its "
                 "supervisor recorded (odl.keeper in the local stack, the trainer's driver)",
                 ["instance"])
METRICS_PORT_OFFSETS = {"source": 0, "feature-job": 1, "trainer": 2, "exporter": 3,
                         "feature-store": 4, "serving": 10}


def metrics_port(cfg: Config, component: str, replica: int = 0) -> int:
    """The Prometheus port of a component instance: the one place the port table is applied
    (components, the trainer's driver, the deployment files' tests)."""
    return cfg.metrics.base_port + METRICS_PORT_OFFSETS[component] + replica


def setup_logging(instance: str) -> logging.Logger:
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s {instance} %(levelname)s %(name)s: %(message)s")
    return logging.getLogger(instance)


class Component:
    """Lifecycle shared by components: ``stop`` is set by signals; ``heartbeat`` runs in a thread;
    the work loops report each pass to ``work`` (``comp.work.beat(loop)``), which the probes
    judge."""

    def __init__(self, cfg: Config, component: str, instance: str | None = None,
                 metrics_port: int | None = None):
        self.cfg = cfg
        self.component = component
        self.instance = instance or component
        self.log = setup_logging(self.instance)
        self.stop = threading.Event()
        self.cp = ControlPlane(cfg)
        self._hb: Heartbeater | None = None
        self.work = WorkProbe(cfg.metrics.stall_s)
        self.probes: ProbeServer | None = None
        if cfg.metrics.enabled:
            port = metrics_port if metrics_port is not None else (
                cfg.metrics.base_port + METRICS_PORT_OFFSETS.get(component, 20))
            try:
                self.probes = ProbeServer(cfg.metrics.host, port,
                                          lambda: generate_latest(REGISTRY).decode(),
                                          self.work.health, self.work.readiness)
            except OSError as exc:   # the keeper restarts it, with backoff; say what to change
                raise SystemExit(f"{self.instance}: cannot serve metrics and probes on "
                                 f"{cfg.metrics.host}:{port} ({exc.strerror}); another process "
                                 "has it: stop it, or move metrics.base_port") from exc
            self.log.info("prometheus metrics and probes on %s:%d", cfg.metrics.host, port)

    def install_signal_handlers(self) -> None:
        def _handler(signum, _frame):
            self.log.info("signal %d: stopping", signum)
            self.stop.set()
        signal.signal(signal.SIGTERM, _handler)
        signal.signal(signal.SIGINT, _handler)

    def start_heartbeat(self, probe: Callable[[], tuple[str, str | None, dict[str, Any]]]) -> Heartbeater:
        gauge = RESTARTS.labels(self.instance)
        self._hb = Heartbeater(self.cp, self.component, self.instance, probe,
                               on_restarts=gauge.set).start()
        return self._hb

    @property
    def paused(self) -> bool:
        return bool(self._hb and self._hb.paused)

    def close(self, final_state: str = "stopped") -> None:
        if self._hb:
            self._hb.stop(final_state)
        if self.probes:
            self.probes.close()
