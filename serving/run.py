"""`odl run serving --replica N`: one serving replica on serving.host:serving.ports[N].

Three loops besides the HTTP server: the model poll (a new, pinned or rolled-back version is
loaded and warmed in the background, then swapped in; dense refreshes are applied in place), the
cache follower (the exporter's change stream keeps the local embedding cache fresh), and the
heartbeat.
"""
from __future__ import annotations

import asyncio
import signal
import threading

from aiohttp import web
from prometheus_client import REGISTRY

from exporters.registry import ModelStore
from odl.config import Config
from odl.control import redis_client
from odl.runtime import METRICS_PORT_OFFSETS, Component
from serving.app import ServingApp
from serving.guard import Unavailable
from serving.model import ModelHolder

FOLLOW_BLOCK_MS = 500


def run(cfg: Config, replica: int = 0) -> int:
    if not 0 <= replica < len(cfg.serving.ports):
        raise SystemExit(f"--replica {replica}: serving.ports has {len(cfg.serving.ports)} entries")
    instance = f"serving-{replica}"
    comp = Component(cfg, "serving", instance,
                     metrics_port=cfg.metrics.base_port + METRICS_PORT_OFFSETS["serving"] + replica)
    holder = ModelHolder(ModelStore(cfg.paths.model_store, cfg.serving.model_name), comp.cp)
    app = ServingApp(cfg, holder, redis_client(cfg, decode=False, timeout_s=cfg.serving.redis_timeout_s),
                     instance, registry=REGISTRY)
    comp.start_heartbeat(app.probe)
    follower = threading.Thread(target=follow_changes, args=(cfg, app, comp), name="cache-follower",
                                daemon=True)
    follower.start()
    asyncio.run(_serve(cfg, comp, holder, app, replica))
    comp.close()
    return 0


def follow_changes(cfg: Config, app: ServingApp, comp: Component) -> None:
    """Keep the local embedding cache fresh from the exporter's change stream."""
    r = redis_client(cfg, decode=False, timeout_s=FOLLOW_BLOCK_MS / 1000 + cfg.serving.redis_timeout_s + 1)
    down = False
    while not comp.stop.is_set():
        try:
            app.cache.follow(r, block_ms=FOLLOW_BLOCK_MS)
            down = False
        except Unavailable:
            if not down:
                app.cache.lost_stream()
                down = True
            comp.stop.wait(cfg.serving.redis_retry_s)
        except Exception as exc:  # noqa: BLE001 - a bad entry or a bug: log, keep following
            comp.log.warning("cache follower: %r", exc)
            comp.stop.wait(1.0)


def poll_model(holder: ModelHolder, app: ServingApp) -> None:
    errors = holder.load_errors
    if holder.refresh():
        app.metrics.model_loads.labels("ok").inc()
    if holder.load_errors > errors:
        app.metrics.model_loads.labels("error").inc()
    holder.refresh_dense(app.r)


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
                await asyncio.to_thread(poll_model, holder, app)
            except Exception as exc:  # noqa: BLE001 - control plane away: keep the current model
                comp.log.warning("model poll failed: %s", exc)
            await asyncio.sleep(cfg.serving.poll_interval_s)
    finally:
        await runner.cleanup()
