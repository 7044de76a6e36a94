"""`odl run serving --replica N`: one serving replica on serving.host:serving.ports[N].

Besides the HTTP server a replica runs the model poll (a new, pinned or rolled-back version is
loaded and warmed in the background, then swapped in; dense refreshes are applied in place), the
cache follower (the exporter's change stream keeps the local embedding cache fresh) and, as a
component, the heartbeat.  ``Replica`` holds these so tests and benchmarks run the same thing in
a thread (``start_in_thread``).
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading

from aiohttp import web
from prometheus_client import REGISTRY, CollectorRegistry

from odl.model_store import ModelStore
from odl.config import Config
from odl.control import ControlPlane, Heartbeater
from odl.probes import WorkProbe
from odl.redis_conn import redis_client
from odl.runtime import Component, metrics_port
from serving.app import ServingApp
from serving.guard import Unavailable
from odl.spec import running_spec
from serving.model import ModelHolder

FOLLOW_BLOCK_MS = 500
LOOPS = ("follow", "model")   # the work loops a replica's probes judge (odl.probes)


class Replica:
    def __init__(self, cfg: Config, port: int, instance: str, cp: ControlPlane | None = None,
                 registry: CollectorRegistry | None = None):
        self.cfg, self.port, self.instance = cfg, port, instance
        self.cp = cp or ControlPlane(cfg)
        self.log = logging.getLogger(f"odl.{instance}")
        self.stop = threading.Event()
        self.holder = ModelHolder(ModelStore(cfg.paths.model_store, cfg.serving.model_name), self.cp,
                                  xla=cfg.serving.xla, spec_hash=running_spec(cfg).hash)
        self.app = ServingApp(cfg, self.holder,
                              redis_client(cfg, decode=False, timeout_s=cfg.serving.redis_timeout_s),
                              instance, registry=registry)
        self._threads: list[threading.Thread] = []
        self._heartbeat: Heartbeater | None = None
        # the replica's loops report here (a component's probes judge them; tests: unjudged)
        self.work = WorkProbe(cfg.metrics.stall_s).expect(*LOOPS)

    @property
    def url(self) -> str:
        return f"http://{self.cfg.serving.host}:{self.port}"

    def probe(self) -> tuple[str, str | None, dict]:
        state, version, metrics = self.app.probe()
        return state, version, {**metrics, "port": self.port}

    # --- loops -----------------------------------------------------------------------------------
    def follow_changes(self) -> None:
        """Keep the local embedding cache fresh from the exporter's change stream."""
        cfg = self.cfg
        r = redis_client(cfg, decode=False, timeout_s=FOLLOW_BLOCK_MS / 1000 + cfg.serving.redis_timeout_s + 1)
        down = False
        while not self.stop.is_set():
            self.work.beat("follow")   # Redis away is degraded serving, not unready
            try:
                self.app.cache.follow(r, block_ms=FOLLOW_BLOCK_MS)
                down = False
            except Unavailable:
                if not down:
                    self.app.cache.lost_stream()
                    down = True
                self.stop.wait(cfg.serving.redis_retry_s)
            except Exception as exc:  # noqa: BLE001 - a bad entry or a bug: log, keep following
                self.log.warning("cache follower: %r", exc)
                self.stop.wait(1.0)

    def poll_model(self) -> None:
        holder, metrics = self.holder, self.app.metrics
        errors = holder.load_errors
        if holder.refresh():
            metrics.model_loads.labels("ok").inc()
        if holder.load_errors > errors:
            metrics.model_loads.labels("error").inc()
        holder.refresh_dense(self.app.r)
        holder.maintain()

    async def serve(self, started: threading.Event | None = None) -> None:
        runner = web.AppRunner(self.app.build(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, self.cfg.serving.host, self.port).start()
        self.log.info("serving on %s", self.url)
        if started:
            started.set()
        try:
            while not self.stop.is_set():
                try:
                    await asyncio.to_thread(self.poll_model)
                except Exception as exc:  # noqa: BLE001 - control plane away: keep the current model
                    self.log.warning("model poll failed: %s", exc)
                self.work.beat("model", waiting=None if self.holder.current else "no model version loaded")
                await asyncio.sleep(self.cfg.serving.poll_interval_s)
        finally:
            await runner.cleanup()

    def start_threads(self, heartbeat: bool = True) -> None:
        t = threading.Thread(target=self.follow_changes, name=f"{self.instance}-follower", daemon=True)
        t.start()
        self._threads.append(t)
        if heartbeat:
            self._heartbeat = Heartbeater(self.cp, "serving", self.instance, self.probe).start()

    # --- in a thread (tests, benchmarks) ---------------------------------------------------------
    def start_in_thread(self, heartbeat: bool = True, timeout_s: float = 30.0) -> "Replica":
        started = threading.Event()
        t = threading.Thread(target=lambda: asyncio.run(self.serve(started)), name=self.instance, daemon=True)
        t.start()
        self._threads.append(t)
        if not started.wait(timeout_s):
            raise RuntimeError(f"{self.instance} did not start listening on {self.port}")
        self.start_threads(heartbeat)
        return self

    def close(self) -> None:
        self.stop.set()
        if self._heartbeat:
            self._heartbeat.stop()
        for t in self._threads:
            t.join(10)


def run(cfg: Config, replica: int = 0) -> int:
    if not 0 <= replica < len(cfg.serving.ports):
        raise SystemExit(f"--replica {replica}: serving.ports has {len(cfg.serving.ports)} entries")
    # a pod name on Kubernetes (ODL_INSTANCE), where every replica is --replica 0 on its own pod
    instance = os.environ.get("ODL_INSTANCE") or f"serving-{replica}"
    comp = Component(cfg, "serving", instance,
                     metrics_port=metrics_port(cfg, "serving", replica))
    rep = Replica(cfg, cfg.serving.ports[replica], instance, comp.cp, registry=REGISTRY)
    rep.stop, rep.work = comp.stop, comp.work.expect(*LOOPS)
    comp.start_heartbeat(rep.probe)
    rep.start_threads(heartbeat=False)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, comp.stop.set)
        await rep.serve()

    asyncio.run(main())
    comp.close()
    return 0
