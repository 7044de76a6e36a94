"""The serving replica's HTTP API on aiohttp: TensorFlow-Serving-shaped predict, a recommendation
endpoint, status, metadata, OpenAPI, health and Prometheus metrics.

Request path: validate (``serving.api``; a 4xx with a JSON error for anything malformed) -> take
the model served *now* (the request keeps it even if a new version is swapped in meanwhile) ->
queue on the batcher (``serving.batching``) -> an inference worker looks the embeddings up
through the local cache (``serving.embedding_cache``) and the real-time features up in the online
feature store (``serving.features``), and calls the model (``serving.inference``).  Responses carry ``X-ODL-Model-Version``; ``X-ODL-Degraded`` says Redis
was unreachable and cached or default embeddings were used.
"""
from __future__ import annotations

import logging
import time
from typing import Awaitable, Callable

import numpy as np
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import ValidationError

from odl.embedding_store import EmbeddingReader
from odl.config import Config
from odl.names import DEGRADED_HEADER, GENERATION_HEADER, VERSION_HEADER
from odl.spec import is_default, running_spec
from odl.spec.net import PACKED_SIGNATURE
from serving.api import explain, make_api
from serving.batching import Batcher, BatchPolicy
from odl.feature_store import FeatureStore
from serving.embedding_cache import EmbeddingCache
from serving.features import RequestFeatures
from serving.guard import RedisGuard
from serving.inference import Candidates, Inference, Pairs, Scored
from serving.spec_scoring import SpecRequestError, SpecRequests, SpecScorer
from serving.metrics import ServingMetrics
from serving.model import LoadedModel, ModelHolder

log = logging.getLogger("odl.serving.app")


class RequestError(Exception):
    def __init__(self, status: int, message: str, details: list | None = None):
        super().__init__(message)
        self.status, self.message, self.details = status, message, details


def json_response(body: dict, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, headers=headers,
                        content_type="application/json")


def error(status: int, message: str, details: list | None = None) -> web.Response:
    body = {"error": message}
    if details:
        body["details"] = details
    return json_response(body, status)


class ServingApp:
    def __init__(self, cfg: Config, holder: ModelHolder, redis_bytes, instance: str,
                 registry: CollectorRegistry | None = None):
        """``redis_bytes``: a binary-reply client with a short socket timeout (degraded mode
        must not wait long for an absent Redis).  ``registry``: the process's default registry
        for a real replica (``serving.run``); a private one by default (tests, benchmarks)."""
        registry = registry if registry is not None else CollectorRegistry()
        s = cfg.serving
        self.cfg, self.holder, self.r, self.instance = cfg, holder, redis_bytes, instance
        self.metrics = ServingMetrics(registry)
        self.registry = registry
        self.guard = RedisGuard(s.redis_retry_s, on_change=lambda down: self.metrics.degraded.set(int(down)))
        self.cache = EmbeddingCache(EmbeddingReader(redis_bytes), self.guard, s.cache_rows_per_table,
                                    s.cache_ttl_s)
        self.features = RequestFeatures(FeatureStore(redis_bytes, cfg.feature_job.store_ttl_s), self.guard,
                                        s.item_features_ttl_s)
        self.inference = Inference(self.cache, self.features, on_lookup=self.metrics.lookup)
        self.batcher = Batcher(self.inference.run,
                               BatchPolicy(s.batch_max_rows, s.batch_max_wait_ms / 1000,
                                           s.inference_workers, s.batching),
                               on_batch=self.metrics.batch)
        self.api = make_api(s.max_instances, s.max_candidates, s.model_name)
        spec = running_spec(cfg)
        # a declared spec's model takes its own request body (serving.spec_scoring)
        self.spec_requests = None if is_default(spec) else SpecRequests(spec, s.max_instances,
                                                                        s.max_candidates)
        if self.spec_requests is not None:
            self.inference.spec = SpecScorer(spec, self.features.store, self.guard, self.cache,
                                             on_lookup=self.metrics.lookup)

    # --- wiring ----------------------------------------------------------------------------------
    def routes(self) -> list[web.RouteDef]:
        name = "{name:[A-Za-z0-9_.-]+}"
        return [
            web.get("/healthz", self.healthz),
            web.get("/metrics", self.prometheus),
            web.get("/v1/openapi.json", self.openapi),
            web.get(f"/v1/models/{name}", self.status),
            web.get(f"/v1/models/{name}/metadata", self.metadata),
            web.post(f"/v1/models/{name}:predict", self._endpoint("predict", self._predict)),
            web.post(f"/v1/models/{name}/versions/{{version:[0-9]+}}:predict",
                     self._endpoint("predict", self._predict)),
            web.post(f"/v1/models/{name}:recommend", self._endpoint("recommend", self._recommend)),
        ]

    def build(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.serving.max_body_bytes, middlewares=[self._errors])
        app.add_routes(self.routes())
        app.on_startup.append(lambda _app: self.batcher.start())
        app.on_cleanup.append(lambda _app: self.batcher.stop())
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except web.HTTPException as exc:  # 404/405/413 from aiohttp itself, as JSON
            if exc.status >= 400:
                return error(exc.status, exc.reason)
            raise

    def _endpoint(self, endpoint: str, fn: Callable[[web.Request], Awaitable[web.Response]]):
        async def handler(request: web.Request) -> web.Response:
            t0 = time.perf_counter()
            try:
                resp = await fn(request)
            except RequestError as exc:
                resp = error(exc.status, exc.message, exc.details)
            except web.HTTPRequestEntityTooLarge as exc:
                resp = error(413, exc.text or "body too large")
            except Exception as exc:  # noqa: BLE001 - our fault, not the client's: JSON, logged, counted
                log.exception("%s failed", endpoint)
                resp = error(500, f"internal error: {type(exc).__name__}")
            self.metrics.answered(endpoint, resp.status, time.perf_counter() - t0)
            return resp
        return handler

    # --- shared steps ----------------------------------------------------------------------------
    def _model(self, request: web.Request) -> LoadedModel:
        if request.match_info["name"] != self.cfg.serving.model_name:
            raise RequestError(404, f"model {request.match_info['name']!r} not found")
        model = self.holder.current
        if model is None:
            raise RequestError(503, "no model loaded yet")
        want = request.match_info.get("version")
        if want is not None and want != model.version:
            raise RequestError(404, f"version {want} is not loaded (serving {model.version})")
        return model

    async def _parse(self, request: web.Request, schema):
        body = await request.read()
        try:
            return schema.model_validate_json(body)
        except ValidationError as exc:
            message, details = explain(exc)
            raise RequestError(400, message, details) from None

    def _headers(self, model: LoadedModel, scored: Scored) -> dict[str, str]:
        headers = {VERSION_HEADER: model.version}
        if self.cache.generation is not None:
            headers[GENERATION_HEADER] = str(self.cache.generation)
        if scored.degraded:
            headers[DEGRADED_HEADER] = "redis-unavailable"
            self.metrics.degraded_responses.inc()
        return headers

    # --- endpoints -------------------------------------------------------------------------------
    async def _predict(self, request: web.Request) -> web.Response:
        model = self._model(request)
        if self.spec_requests is not None:
            return await self._predict_spec(request, model)
        req = await self._parse(request, self.api.predict)
        pairs = Pairs(*req.columns())
        scored: Scored = await self.batcher.submit((model, "pairs"), pairs.rows, pairs)
        key = "predictions" if req.instances is not None else "outputs"
        return json_response({key: scored.probabilities.tolist(), "model_version": model.version},
                             headers=self._headers(model, scored))

    async def _predict_spec(self, request: web.Request, model: LoadedModel) -> web.Response:
        try:
            rows = self.spec_requests.parse(await request.read())
        except SpecRequestError as exc:
            raise RequestError(400, str(exc), exc.details) from None
        scored: Scored = await self.batcher.submit((model, "spec"), len(rows), rows)
        return json_response({"predictions": scored.probabilities.tolist(),
                              "model_version": model.version}, headers=self._headers(model, scored))

    async def _recommend(self, request: web.Request) -> web.Response:
        model = self._model(request)
        if self.spec_requests is not None:
            return await self._recommend_spec(request, model)
        req = await self._parse(request, self.api.recommend)
        hour = req.context.hour if req.context.hour is not None else time.gmtime().tm_hour
        cands = Candidates(req.user_id, req.candidates, req.context.position, hour)
        scored: Scored = await self.batcher.submit((model, "candidates"), cands.rows, cands)
        probs = scored.probabilities
        order = np.argsort(-probs, kind="stable")[:req.top_k or len(probs)]
        items = [{"item_id": req.candidates[k], "score": float(probs[k])} for k in order.tolist()]
        return json_response({"model_version": model.version, "items": items},
                             headers=self._headers(model, scored))

    async def _recommend_spec(self, request: web.Request, model: LoadedModel) -> web.Response:
        try:
            rows, cands, top_k = self.spec_requests.parse_recommend(await request.read())
        except SpecRequestError as exc:
            status = 404 if not self.spec_requests.candidate_fields else 400
            raise RequestError(status, str(exc), exc.details) from None
        scored: Scored = await self.batcher.submit((model, "spec"), len(rows), rows)
        probs = scored.probabilities
        order = np.argsort(-probs, kind="stable")[:top_k]
        items = [{**cands[k], "score": float(probs[k])} for k in order.tolist()]
        return json_response({"model_version": model.version, "items": items},
                             headers=self._headers(model, scored))

    async def healthz(self, _request: web.Request) -> web.Response:
        m = self.holder.current
        return json_response({"ok": m is not None, "version": m.version if m else None,
                              "degraded": self.guard.degraded}, status=200 if m else 503)

    async def prometheus(self, _request: web.Request) -> web.Response:
        self.refresh_gauges()
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def openapi(self, _request: web.Request) -> web.Response:
        if self.spec_requests is None:
            return json_response(self.api.openapi)
        doc = dict(self.api.openapi)
        schemas = {**doc.get("components", {}).get("schemas", {}),
                   "PredictRequest": self.spec_requests.schema()}
        recommend = self.spec_requests.recommend_schema()
        if recommend is not None:
            schemas["RecommendRequest"], schemas["RecommendResponse"] = recommend
        else:   # no candidates declared: no recommend endpoint to describe
            doc["paths"] = {p: v for p, v in doc["paths"].items() if not p.endswith(":recommend")}
        doc["components"] = {**doc.get("components", {}), "schemas": schemas}
        return json_response(doc)

    async def status(self, request: web.Request) -> web.Response:
        if request.match_info["name"] != self.cfg.serving.model_name:
            return error(404, f"model {request.match_info['name']!r} not found")
        m = self.holder.current
        states = [{"version": m.version, "state": "AVAILABLE",
                   "status": {"error_code": "OK", "error_message": ""}}] if m else []
        return json_response({"model_version_status": states})

    async def metadata(self, request: web.Request) -> web.Response:
        try:
            m = self._model(request)
        except RequestError as exc:
            return error(exc.status, exc.message)
        sigs = {}
        for name in ("serving_default", "score_candidates", PACKED_SIGNATURE):
            fn = m.saved.signatures.get(name) if m.saved is not None else None
            if fn is not None:
                specs = fn.structured_input_signature[1]
                sigs[name] = {"inputs": {k: {"dtype": v.dtype.name, "shape": v.shape.as_list()}
                                         for k, v in specs.items()},
                              "outputs": {k: {"dtype": v.dtype.name, "shape": v.shape.as_list()}
                                          for k, v in fn.structured_outputs.items()}}
        return json_response({"model_spec": {"name": self.cfg.serving.model_name, "version": m.version},
                              "metadata": {"signature_def": sigs}, "manifest": m.manifest,
                              "dense_refresh": m.refresh_seq})

    # --- observed state --------------------------------------------------------------------------
    def refresh_gauges(self) -> None:
        m = self.holder.current
        if m is not None:
            self.metrics.model_version.set(int(m.version) if m.version.isdigit() else 0)
            self.metrics.model_age.set(max(0.0, time.time() - m.created_at))
            self.metrics.dense_refresh.set(m.refresh_seq)
        for table in ("user", "item"):
            self.metrics.cache_rows.labels(table).set(self.cache.rows(table))
        age = self.cache.data_age_s()
        if age is not None:
            self.metrics.data_age.set(age)

    def probe(self) -> tuple[str, str | None, dict]:
        """The heartbeat: state, version and key figures."""
        self.refresh_gauges()
        m = self.holder.current
        state = "serving" if m else "waiting-for-model"
        if m and self.guard.degraded:
            state = "degraded"
        return (state, m.version if m else None,
                {**self.metrics.window.summary(), "load_errors": self.holder.load_errors,
                 "dense_refresh": m.refresh_seq if m else 0,
                 "cache_refreshes": m.cache.refreshes if m and m.cache else 0,
                 "cache_rows": self.cache.rows("user") + self.cache.rows("item"),
                 "degraded": self.guard.degraded, "xla": bool(m and m.xla),
                 "generation": self.cache.current_generation(),
                 "data_age_s": None if self.cache.data_age_s() is None else round(self.cache.data_age_s(), 2),
                 "model_age_s": round(time.time() - m.created_at, 1) if m else None})
