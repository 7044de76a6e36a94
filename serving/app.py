"""The serving replica's HTTP API (TensorFlow-Serving shaped) on aiohttp.

``POST /v1/models/{name}:predict`` with ``{"instances": [{"user_id", "item_id", "position",
"hour"}, ...]}`` answers ``{"predictions": [...], "model_version": "N"}``.  Embeddings come from
Redis; an id Redis does not hold uses the default (zero) vector, and serving never admits ids.
Every client error is a 4xx with a JSON body; nothing a client sends produces a 5xx.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from exporters.hot_embeddings import EmbeddingReader
from odl.config import Config
from serving.model import ModelHolder

REQUESTS = Counter("odl_serving_requests_total", "predict requests", ["code"])
LATENCY = Histogram("odl_serving_latency_seconds", "predict latency",
                    buckets=(.001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2))
INSTANCE_FIELDS = {"user_id": int, "item_id": int, "position": int, "hour": int}
REQUIRED_FIELDS = ("user_id", "item_id")


class BadRequest(Exception):
    pass


@dataclass
class Instances:
    user_ids: list[int]
    item_ids: list[int]
    positions: np.ndarray
    hours: np.ndarray


def parse_instances(body: Any, max_instances: int) -> Instances:
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    unknown = set(body) - {"instances", "signature_name"}
    if unknown:
        raise BadRequest(f"unknown fields: {sorted(unknown)}")
    inst = body.get("instances")
    if not isinstance(inst, list) or not inst:
        raise BadRequest("'instances' must be a non-empty list")
    if len(inst) > max_instances:
        raise BadRequest(f"too many instances: {len(inst)} > {max_instances}")
    cols: dict[str, list[int]] = {k: [] for k in INSTANCE_FIELDS}
    for n, row in enumerate(inst):
        if not isinstance(row, dict):
            raise BadRequest(f"instances[{n}] must be an object")
        extra = set(row) - set(INSTANCE_FIELDS)
        if extra:
            raise BadRequest(f"instances[{n}]: unknown fields {sorted(extra)}")
        for field in INSTANCE_FIELDS:
            v = row.get(field, 0 if field not in REQUIRED_FIELDS else None)
            if v is None:
                raise BadRequest(f"instances[{n}].{field} is required")
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**53:
                raise BadRequest(f"instances[{n}].{field} must be a non-negative integer")
            cols[field].append(v)
    return Instances(cols["user_id"], cols["item_id"], np.asarray(cols["position"], np.int64),
                     np.asarray(cols["hour"], np.int64))


def error(status: int, message: str) -> web.Response:
    REQUESTS.labels(str(status)).inc()
    return web.json_response({"error": message}, status=status)


class ServingApp:
    def __init__(self, cfg: Config, holder: ModelHolder, redis_bytes, instance: str):
        # a sync client with binary replies, used from worker threads
        self.cfg, self.holder, self.r, self.instance = cfg, holder, redis_bytes, instance
        self.embeddings = EmbeddingReader(redis_bytes)
        self.served = 0
        self.latency_ms: list[float] = []

    def routes(self) -> list[web.RouteDef]:
        name = "{name:[A-Za-z0-9_.-]+}"
        return [
            web.get("/healthz", self.healthz),
            web.get("/metrics", self.metrics),
            web.get(f"/v1/models/{name}", self.status),
            web.get(f"/v1/models/{name}/metadata", self.metadata),
            web.post(f"/v1/models/{name}:predict", self.predict),
            web.post(f"/v1/models/{name}/versions/{{version:[0-9]+}}:predict", self.predict),
        ]

    def build(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.serving.max_body_bytes,
                              middlewares=[self._errors])
        app.add_routes(self.routes())
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except web.HTTPException as exc:  # 404/405/413 from aiohttp itself, as JSON
            if exc.status >= 400:
                return error(exc.status, exc.reason)
            raise

    def _check_name(self, request: web.Request) -> web.Response | None:
        if request.match_info["name"] != self.cfg.serving.model_name:
            return error(404, f"model {request.match_info['name']!r} not found")
        return None

    async def healthz(self, _request: web.Request) -> web.Response:
        m = self.holder.current
        return web.json_response({"ok": m is not None, "version": m.version if m else None},
                                 status=200 if m else 503)

    async def metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status(self, request: web.Request) -> web.Response:
        if (resp := self._check_name(request)) is not None:
            return resp
        m = self.holder.current
        states = [{"version": m.version, "state": "AVAILABLE", "status": {"error_code": "OK"}}] if m else []
        return web.json_response({"model_version_status": states})

    async def metadata(self, request: web.Request) -> web.Response:
        if (resp := self._check_name(request)) is not None:
            return resp
        m = self.holder.current
        if m is None:
            return error(503, "no model loaded yet")
        return web.json_response({"model_spec": {"name": self.cfg.serving.model_name, "version": m.version},
                                  "manifest": m.manifest,
                                  "inputs": {k: t.__name__ for k, t in INSTANCE_FIELDS.items()}})

    async def predict(self, request: web.Request) -> web.Response:
        t0 = time.perf_counter()
        if (resp := self._check_name(request)) is not None:
            return resp
        model = self.holder.current
        if model is None:
            return error(503, "no model loaded yet")
        want = request.match_info.get("version")
        if want is not None and want != model.version:
            return error(404, f"version {want} is not loaded (serving {model.version})")
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError):
            return error(400, "body is not valid JSON")
        try:
            inst = parse_instances(body, self.cfg.serving.max_instances)
        except BadRequest as exc:
            return error(400, str(exc))
        dim = model.embedding_dim
        users, _ = await asyncio.to_thread(self.embeddings.fetch, "user", inst.user_ids, dim)
        items, _ = await asyncio.to_thread(self.embeddings.fetch, "item", inst.item_ids, dim)
        probs = await asyncio.to_thread(model.predict, users, items, inst.positions, inst.hours)
        dt = time.perf_counter() - t0
        LATENCY.observe(dt)
        REQUESTS.labels("200").inc()
        self.served += 1
        self.latency_ms.append(dt * 1000)
        if len(self.latency_ms) > 10000:
            del self.latency_ms[:5000]
        return web.json_response({"predictions": [float(p) for p in probs],
                                  "model_version": model.version})
