"""The request and response shapes of the serving API, and its OpenAPI document.

One pydantic definition per body does both jobs: it validates requests strictly (unknown fields,
wrong types, out-of-range values and oversized lists are refused with a 400 that names the
field) and it generates the OpenAPI schema served at ``/v1/openapi.json``, so the document and
the validator cannot disagree.  Limits come from config (``serving.max_instances``,
``serving.max_candidates``), hence the factory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.json_schema import models_json_schema

from odl.spec import running_spec
from odl.spec.model import MAX_ID

# request limits are the feature spec's event limits (specs/default.yaml): what the model may be
# asked about is what it may have been trained on
_SPEC = running_spec()
_POSITION_MIN, _POSITION_MAX = _SPEC.field("position").bounds
Id = Annotated[int, Field(ge=0, le=MAX_ID)]
Position = Annotated[int, Field(ge=int(_POSITION_MIN), le=int(_POSITION_MAX),
                                description="slot the item is shown in")]
Hour = Annotated[int, Field(ge=0, le=_SPEC.field("hour").modulo - 1,
                            description="hour of day (0-23) of the request")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Instance(_Strict):
    """One (user, item) pair to score."""
    user_id: Id
    item_id: Id
    position: Position = 0
    hour: Hour = 0


class Context(_Strict):
    hour: Hour | None = Field(None, description="default: the replica's UTC clock")
    position: Position = 0


class ItemScore(_Strict):
    item_id: int
    score: float


class RecommendResponse(_Strict):
    model_version: str
    items: list[ItemScore]


class PredictResponse(_Strict):
    model_version: str
    predictions: list[float] | None = None   # row format ("instances")
    outputs: list[float] | None = None       # columnar format ("inputs")


class Error(_Strict):
    error: str
    details: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class Api:
    predict: type[BaseModel]
    recommend: type[BaseModel]
    openapi: dict[str, Any]


def make_api(max_instances: int, max_candidates: int, model_name: str = "ctr") -> Api:
    class Inputs(_Strict):
        """Columnar inputs: equal-length lists."""
        user_id: list[Id] = Field(min_length=1, max_length=max_instances)
        item_id: list[Id] = Field(min_length=1, max_length=max_instances)
        position: list[Position] | None = Field(None, max_length=max_instances)
        hour: list[Hour] | None = Field(None, max_length=max_instances)

        @model_validator(mode="after")
        def _same_length(self):
            n = len(self.user_id)
            for name in ("item_id", "position", "hour"):
                v = getattr(self, name)
                if v is not None and len(v) != n:
                    raise ValueError(f"inputs.{name} has {len(v)} values, inputs.user_id {n}")
            return self

    class PredictRequest(_Strict):
        """TensorFlow Serving's predict body: ``instances`` (rows) or ``inputs`` (columns)."""
        signature_name: Literal["serving_default"] = "serving_default"
        instances: list[Instance] | None = Field(None, min_length=1, max_length=max_instances)
        inputs: Inputs | None = None

        @model_validator(mode="after")
        def _one_format(self):
            if (self.instances is None) == (self.inputs is None):
                raise ValueError("give exactly one of 'instances' and 'inputs'")
            return self

        def columns(self) -> tuple[list[int], list[int], list[int], list[int]]:
            if self.instances is not None:
                rows = self.instances
                return ([r.user_id for r in rows], [r.item_id for r in rows],
                        [r.position for r in rows], [r.hour for r in rows])
            c = self.inputs
            n = len(c.user_id)
            return c.user_id, c.item_id, c.position or [0] * n, c.hour or [0] * n

    class RecommendRequest(_Strict):
        """Score candidate items for one user; answers them best first."""
        user_id: Id
        candidates: list[Id] = Field(min_length=1, max_length=max_candidates)
        context: Context = Context()
        top_k: int | None = Field(None, ge=1, le=max_candidates, description="default: all")

    return Api(PredictRequest, RecommendRequest,
               _openapi([PredictRequest, RecommendRequest, PredictResponse, RecommendResponse, Error],
                        model_name))


def _openapi(models: list[type[BaseModel]], model_name: str) -> dict[str, Any]:
    _, top = models_json_schema([(m, "validation") for m in models],
                                ref_template="#/components/schemas/{model}")
    schemas = top.get("$defs", {})

    def body(name: str) -> dict:
        return {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}

    def answers(ok: str | None, *codes: int) -> dict:
        out: dict[str, Any] = {}
        if ok:
            out["200"] = {"description": "OK", "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{ok}"}}}}
        for c in codes:
            out[str(c)] = {"description": {400: "invalid request", 404: "unknown model or version",
                                           413: "body too large", 503: "no model loaded yet"}[c],
                           "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        return out

    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "enum": [model_name]}}
    version = {"name": "version", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^[0-9]+$"}}
    predict = {"requestBody": body("PredictRequest"), "responses": answers("PredictResponse", 400, 404, 413, 503)}
    return {
        "openapi": "3.1.0",
        "info": {"title": "ODL serving", "version": "1",
                 "description": "TensorFlow-Serving-shaped predict API and a recommendation endpoint. "
                                "Responses carry X-ODL-Model-Version; X-ODL-Degraded is set when "
                                "Redis was unreachable and cached or default embeddings were used."},
        "paths": {
            "/v1/models/{name}:predict": {"post": {**predict, "parameters": [name], "operationId": "predict"}},
            "/v1/models/{name}/versions/{version}:predict": {"post": {
                **predict, "parameters": [name, version], "operationId": "predictVersion"}},
            "/v1/models/{name}:recommend": {"post": {
                "parameters": [name], "operationId": "recommend", "requestBody": body("RecommendRequest"),
                "responses": answers("RecommendResponse", 400, 404, 413, 503)}},
            "/v1/models/{name}": {"get": {"parameters": [name], "operationId": "status",
                                          "responses": {"200": {"description": "version status"}, **answers(None, 404)}}},
            "/v1/models/{name}/metadata": {"get": {"parameters": [name], "operationId": "metadata",
                                                   "responses": {"200": {"description": "signatures and manifest"},
                                                                 **answers(None, 404, 503)}}},
            "/healthz": {"get": {"operationId": "health", "responses": {
                "200": {"description": "a model is loaded"}, "503": {"description": "no model yet"}}}},
            "/metrics": {"get": {"operationId": "metrics", "responses": {"200": {"description": "Prometheus text"}}}},
        },
        "components": {"schemas": schemas},
    }


def explain(exc: ValidationError) -> tuple[str, list[dict[str, Any]]]:
    """A one-line message and the per-field details of a validation error (JSON-safe)."""
    details = [{"loc": [str(p) for p in e["loc"]], "msg": e["msg"], "type": e["type"]}
               for e in exc.errors(include_url=False, include_input=False, include_context=False)]
    first = details[0] if details else {"loc": [], "msg": "invalid"}
    where = ".".join(first["loc"]) or "body"
    more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
    return f"{where}: {first['msg']}{more}", details[:20]
