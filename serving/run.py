"""`odl run serving --replica N`: one serving replica on serving.host:serving.ports[N]."""
from __future__ import annotations

import asyncio
import signal

import numpy as np
from aiohttp import web

from exporters.registry import ModelStore
from odl.config import Config
from odl.control import redis_client
from odl.runtime import METRICS_PORT_OFFSETS, Component
from serving.app import ServingApp
from serving.model import ModelHolder


def run(cfg: Config, replica: int = 0) -> int:
    if not 0 <= replica < len(cfg.serving.ports):
        raise SystemExit(f"--replica {replica}: serving.ports has {len(cfg.serving.ports)} entries")
    instance = f"serving-{replica}"
    comp = Component(cfg, "serving", instance,
                     metrics_port=cfg.metrics.base_port + METRICS_PORT_OFFSETS["serving"] + replica)
    holder = ModelHolder(ModelStore(cfg.paths.model_store, cfg.serving.model_name), comp.cp)
    app = ServingApp(cfg, holder, redis_client(cfg, decode=False), instance)

    def probe():
        lat = np.asarray(app.latency_ms[-2000:]) if app.latency_ms else np.zeros(1)
        m = holder.current
        return ("serving" if m else "waiting-for-model", m.version if m else None,
                {"requests": app.served, "p50_ms": round(float(np.percentile(lat, 50)), 2),
                 "p99_ms": round(float(np.percentile(lat, 99)), 2), "load_errors": holder.load_errors,
                 "dense_refresh": m.refresh_seq if m else 0,
                 "cache_refreshes": m.cache.refreshes if m and m.cache else 0,
                 "port": cfg.serving.ports[replica]})

    comp.start_heartbeat(probe)
    asyncio.run(_serve(cfg, comp, holder, app, replica))
    comp.close()
    return 0


async def _serve(cfg: Config, comp: Component, holder: ModelHolder, app: ServingApp, replica: int) -> None:
    runner = web.AppRunner(app.build(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, cfg.serving.host, cfg.serving.ports[replica])
    await site.start()
    comp.log.info("serving on http://%s:%d", cfg.serving.host, cfg.serving.ports[replica])
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, comp.stop.set)
    try:
        while not comp.stop.is_set():
            try:
                await asyncio.to_thread(holder.refresh)
                await asyncio.to_thread(holder.refresh_dense, app.r)
            except Exception as exc:  # noqa: BLE001 - control plane away: keep the current model
                comp.log.warning("refresh failed: %s", exc)
            await asyncio.sleep(cfg.serving.poll_interval_s)
    finally:
        await runner.cleanup()
