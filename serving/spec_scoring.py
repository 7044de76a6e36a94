"""Serving a declared feature spec's model: its request body, its online features, its graph.

A predict request under a spec is ``{"instances": [{<serving.request fields>}, ...]}``; a
recommend request, where the spec declares ``serving.candidates``, is ``{"context": {<the other
request fields>}, "candidates": [{<serving.candidates fields>}, ...], "top_k": k}``, scored as
one instance per candidate.  Each
instance is checked by the spec's own generated event rules (``odl.spec.events.compile_field``:
types, limits, folding), so what serving accepts is what training accepted; an unknown or bad
field is a 400 naming ``instances[k].<field>`` and the rule's reason.

Scoring follows the trainer's encoding exactly: each instance becomes the sample record a
training row would have been (``odl.spec.sample``) -- its fields, plus the counts and sequences
of its keys read from the online store (``odl.spec.realtime``: the same point-in-time rule, one
tile step of lag allowed) -- and ``SampleReader`` turns the records into keys and numeric
inputs; the keys' vectors come from the embedding cache, and the version's graph
(``exporters.spec_savedmodel``) scores them.  With Redis away the counts and vectors are the
defaults of an entity without history and the answer is marked degraded.

A ``standardize`` numeric feature is scaled by the moments the version carries (the trainer's
running ones when it was cut, ``Manifest.numeric_moments``), frozen: requests never move them.
"""
from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import orjson

from odl.feature_store import FeatureStore
from odl.spec import FeatureSpec
from odl.spec.events import compile_field
from odl.spec.realtime import (SEQUENCE_PART, count_kind, count_values, entity_key,
                               sequence_kind, sequence_values)
from odl.spec.net import MASK, NUMERIC, SpecNet, emb_name, pack_request
from odl.spec.sample import SampleReader
from serving.guard import RedisGuard, Unavailable

_JSON_TYPES = {"id": "integer", "int": "integer", "float": "number", "string": "string",
               "bool": "boolean", "object": "object"}


class SpecRequestError(ValueError):
    def __init__(self, message: str, details: list[dict] | None = None):
        super().__init__(message)
        self.details = details


class SpecRequests:
    """The request bodies of a spec, parsed and checked by the spec's field rules: predict's
    ``{"instances": [...]}`` and, where ``serving.candidates`` is declared, recommend's
    ``{"context": {...}, "candidates": [{...}, ...], "top_k": k}``."""

    def __init__(self, spec: FeatureSpec, max_instances: int, max_candidates: int | None = None):
        self.spec, self.max_instances = spec, max_instances
        self.max_candidates = max_candidates or max_instances
        self.fields = list(spec.serving.request)
        self.candidate_fields = list(spec.serving.candidates)
        self.context_fields = [f for f in self.fields if f not in self.candidate_fields]
        self.checks = {f: compile_field(f, spec.field(f)) for f in self.fields}
        self.required = {f for f in self.fields if spec.field(f).required is True}
        self.lenient = {f for f in self.fields if spec.field(f).on_invalid == "default"}

    @staticmethod
    def _json(body: bytes):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            raise SpecRequestError("body is not JSON") from None

    def _check(self, row, fields: list[str], loc: str, problems: list[dict]) -> dict[str, Any]:
        """``row``'s values of ``fields``, typed; each problem appended with its location."""
        if not isinstance(row, dict):
            problems.append({"loc": loc, "msg": "not an object"})
            return {}
        typed: dict[str, Any] = {}
        for name in sorted(set(row) - set(fields)):
            problems.append({"loc": f"{loc}.{name}", "msg": f"unknown field (allowed here: {fields})"})
        for name in fields:
            v = row.get(name)
            if v is None:
                if name in self.required:
                    problems.append({"loc": f"{loc}.{name}", "msg": "required"})
                typed[name] = None
                continue
            reason, value = self.checks[name](v)
            if reason is not None and name not in self.lenient:
                problems.append({"loc": f"{loc}.{name}", "msg": reason})
            typed[name] = value if reason is None else None
        return typed

    @staticmethod
    def _raise(problems: list[dict]) -> None:
        if problems:
            first = problems[0]
            raise SpecRequestError(f"{first['loc']}: {first['msg']}", problems[:20])

    def parse(self, body: bytes) -> list[dict[str, Any]]:
        doc = self._json(body)
        rows = doc.get("instances") if isinstance(doc, dict) else None
        if not isinstance(rows, list) or not 1 <= len(rows) <= self.max_instances:
            raise SpecRequestError(f"body must be {{\"instances\": [1 to {self.max_instances} "
                                   f"objects of {self.fields}]}}")
        problems: list[dict] = []
        out = [self._check(row, self.fields, f"instances[{k}]", problems)
               for k, row in enumerate(rows)]
        self._raise(problems)
        return out

    def parse_recommend(self, body: bytes) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
        """(one instance per candidate: its fields over the context's, the candidates as given
        in their typed form with absent fields left out, top_k).  A candidate may be a bare value where the spec declares
        one candidate field."""
        if not self.candidate_fields:
            raise SpecRequestError("this spec declares no serving.candidates: its model "
                                   "answers :predict with its instances")
        doc = self._json(body)
        shape = (f"body must be {{\"context\"?: {{{', '.join(self.context_fields)}}}, "
                 f"\"candidates\": [1 to {self.max_candidates} objects of "
                 f"{self.candidate_fields}], \"top_k\"?: n}}")
        if not isinstance(doc, dict) or set(doc) - {"context", "candidates", "top_k"}:
            raise SpecRequestError(shape)
        cands, top_k = doc.get("candidates"), doc.get("top_k")
        if not isinstance(cands, list) or not 1 <= len(cands) <= self.max_candidates:
            raise SpecRequestError(shape)
        if top_k is not None and (type(top_k) is not int or not 1 <= top_k <= self.max_candidates):
            raise SpecRequestError(f"top_k: an integer from 1 to {self.max_candidates}")
        if len(self.candidate_fields) == 1:
            cands = [c if isinstance(c, dict) else {self.candidate_fields[0]: c} for c in cands]
        problems: list[dict] = []
        context = self._check(doc.get("context", {}), self.context_fields, "context", problems)
        typed = [self._check(c, self.candidate_fields, f"candidates[{k}]", problems)
                 for k, c in enumerate(cands)]
        self._raise(problems)
        answered = [{f: v for f, v in c.items() if v is not None} for c in typed]
        return [{**context, **c} for c in typed], answered, top_k or len(typed)

    def _row_schema(self, fields: list[str], required: bool = True) -> dict[str, Any]:
        props = {}
        for name in fields:
            f = self.spec.field(name)
            if f.type.startswith("list["):
                item = {"type": _JSON_TYPES[f.type[5:-1]]}
                p: dict[str, Any] = {"type": "array", "items": item}
                if f.max_len:
                    p["maxItems"] = f.max_len
            else:
                p = {"type": _JSON_TYPES[f.type]}
                lo, hi = f.bounds
                if lo is not None:
                    p["minimum"] = lo
                if hi is not None:
                    p["maximum"] = hi
                if f.type == "string" and f.max_len:
                    p["maxLength"] = f.max_len
            props[name] = p
        return {"type": "object", "properties": props, "additionalProperties": False,
                "required": sorted(self.required & set(fields))}

    def schema(self) -> dict[str, Any]:
        """The predict body's JSON schema (for the OpenAPI document), from the same field specs."""
        return {"type": "object", "required": ["instances"], "additionalProperties": False,
                "properties": {"instances": {"type": "array", "items": self._row_schema(self.fields),
                                             "minItems": 1, "maxItems": self.max_instances}}}

    def recommend_schema(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The recommend request's and answer's JSON schemas; None where the spec declares no
        candidates.  An answered item is its candidate, as checked, and its score."""
        if not self.candidate_fields:
            return None
        cand = self._row_schema(self.candidate_fields)
        if len(self.candidate_fields) == 1:
            cand = {"oneOf": [cand, cand["properties"][self.candidate_fields[0]]]}
        request = {"type": "object", "required": ["candidates"], "additionalProperties": False,
                   "properties": {
                       "context": self._row_schema(self.context_fields),
                       "candidates": {"type": "array", "items": cand, "minItems": 1,
                                      "maxItems": self.max_candidates},
                       "top_k": {"type": "integer", "minimum": 1, "maximum": self.max_candidates}}}
        item = self._row_schema(self.candidate_fields)
        item["properties"]["score"] = {"type": "number"}
        item["required"] = [*item["required"], "score"]
        answer = {"type": "object", "required": ["model_version", "items"],
                  "properties": {"model_version": {"type": "string"},
                                 "items": {"type": "array", "items": item,
                                           "description": "best first, top_k of them"}}}
        return request, answer


class SpecScorer:
    """``run(model, [rows, ...])`` -> probabilities per request, and whether degraded."""

    def __init__(self, spec: FeatureSpec, store: FeatureStore, guard: RedisGuard, cache,
                 on_lookup=lambda table, lookup: None):
        self.spec, self.store, self.guard, self.cache = spec, store, guard, cache
        self.on_lookup = on_lookup
        self.net = SpecNet.of(spec)
        self.reader = SampleReader(spec, frozen=True)
        self._moments_of: str | None = None   # the version whose moments the reader holds
        self._lock = threading.Lock()     # the reader's caches and moments

    def online(self, rows: list[dict], now_ms: int) -> tuple[list[dict], list[dict], bool]:
        """Each row's counts and sequences from the online store, as of ``now_ms``."""
        rt = self.spec.realtime
        n = len(rows)
        tiles: list[list[str | None]] = [[] for _ in range(n)]
        seqs: list[dict] = [{} for _ in range(n)]
        try:
            for cname, c in rt.counts.items():
                for k, parts in zip(range(n), self._read(count_kind(cname), rows, c.key,
                                                         tuple(c.windows))):
                    tiles[k] += parts
            for sname, s in rt.sequences.items():
                for k, (entries,) in zip(range(n), self._read(sequence_kind(sname), rows, [s.key],
                                                              (SEQUENCE_PART,))):
                    values = sequence_values(entries, now_ms, s.length)
                    if values:
                        seqs[k][sname] = values
        except Unavailable:
            return [{} for _ in rows], [{} for _ in rows], True
        counts = [count_values(self.spec, t, now_ms, in_flight=True) for t in tiles]
        return counts, seqs, False

    def _read(self, kind: str, rows: list[dict], key: list[str],
              parts: tuple[str, ...]) -> list[list[str | None]]:
        ents = [entity_key(r, key) for r in rows]
        uniq = sorted({e for e in ents if e})
        got = dict(zip(uniq, self.guard.call(self.store.parts, kind, uniq, parts))) if uniq else {}
        return [got.get(e) or [None] * len(parts) for e in ents]

    def inputs(self, rows: list[dict], now_ms: int,
               model=None) -> tuple[dict[str, np.ndarray], bool]:
        """The graph's inputs for ``rows`` (``exporters.spec_savedmodel.request_specs``), with
        the numeric moments of ``model``'s version (a ``serving.model.LoadedModel``)."""
        counts, seqs, degraded = self.online(rows, now_ms)
        records = [{"sample_id": "request", "ts_ms": now_ms, "label": 0,
                    "fields": r, "counts": c, "sequences": s}
                   for r, c, s in zip(rows, counts, seqs)]
        with self._lock:
            if model is not None and model.version != self._moments_of:
                self.reader.set_moments(model.manifest.get("numeric_moments"))
                self._moments_of = model.version
            try:
                batch = self.reader.read_docs(records)
            except (ValueError, TypeError, KeyError) as exc:   # the request rules passed it
                raise ValueError(f"request rows did not encode: {exc}") from exc
        out, masks = {}, []
        for i, dim in zip(self.net.inputs, self.net.dims):
            keys = batch.keys[i.name]
            found = self.cache.lookup(i.table, keys.ravel().tolist(), dim)
            self.on_lookup(i.table, found)
            degraded = degraded or found.degraded
            out[emb_name(i)] = found.vectors.reshape(len(rows), i.width, dim)
            masks.append((keys != 0).astype(np.float32))
        out[MASK] = np.concatenate(masks, axis=1)
        out[NUMERIC] = batch.numeric
        return out, degraded

    def run(self, model, batch: list[list[dict]]) -> list[tuple[np.ndarray, bool]]:
        rows = [r for req in batch for r in req]
        inputs, degraded = self.inputs(rows, int(time.time() * 1000), model)
        packed = model.packed_fn is not None
        probs = model.predict_inputs(pack_request(self.net, inputs) if packed else inputs, packed)
        out, start = [], 0
        for req in batch:
            out.append((probs[start:start + len(req)], degraded))
            start += len(req)
        return out
