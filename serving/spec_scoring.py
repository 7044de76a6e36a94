"""Serving a declared feature spec's model: its request body, its online features, its graph.

A predict request under a spec is ``{"instances": [{<serving.request fields>}, ...]}``.  Each
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
from odl.spec.sample import SampleReader
from serving.guard import RedisGuard, Unavailable

_JSON_TYPES = {"id": "integer", "int": "integer", "float": "number", "string": "string",
               "bool": "boolean", "object": "object"}


class SpecRequestError(ValueError):
    def __init__(self, message: str, details: list[dict] | None = None):
        super().__init__(message)
        self.details = details


class SpecRequests:
    """The predict body of a spec: parsed and checked by the spec's field rules."""

    def __init__(self, spec: FeatureSpec, max_instances: int):
        self.spec, self.max_instances = spec, max_instances
        self.fields = list(spec.serving.request)
        self.checks = {f: compile_field(f, spec.field(f)) for f in self.fields}
        self.required = {f for f in self.fields if spec.field(f).required is True}
        self.lenient = {f for f in self.fields if spec.field(f).on_invalid == "default"}

    def parse(self, body: bytes) -> list[dict[str, Any]]:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise SpecRequestError("body is not JSON") from None
        rows = doc.get("instances") if isinstance(doc, dict) else None
        if not isinstance(rows, list) or not 1 <= len(rows) <= self.max_instances:
            raise SpecRequestError(f"body must be {{\"instances\": [1 to {self.max_instances} "
                                   f"objects of {self.fields}]}}")
        problems, out = [], []
        for k, row in enumerate(rows):
            if not isinstance(row, dict):
                problems.append({"loc": f"instances[{k}]", "msg": "not an object"})
                continue
            typed: dict[str, Any] = {}
            for name in sorted(set(row) - set(self.checks)):
                problems.append({"loc": f"instances[{k}].{name}",
                                 "msg": f"unknown field (the spec's request fields: {self.fields})"})
            for name, check in self.checks.items():
                v = row.get(name)
                if v is None:
                    if name in self.required:
                        problems.append({"loc": f"instances[{k}].{name}", "msg": "required"})
                    typed[name] = None
                    continue
                reason, value = check(v)
                if reason is not None and name not in self.lenient:
                    problems.append({"loc": f"instances[{k}].{name}", "msg": reason})
                typed[name] = value if reason is None else None
            out.append(typed)
        if problems:
            first = problems[0]
            raise SpecRequestError(f"{first['loc']}: {first['msg']}", problems)
        return out

    def schema(self) -> dict[str, Any]:
        """The body's JSON schema (for the OpenAPI document), from the same field specs."""
        props = {}
        for name in self.fields:
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
        row = {"type": "object", "properties": props, "additionalProperties": False,
               "required": sorted(self.required)}
        return {"type": "object", "required": ["instances"], "additionalProperties": False,
                "properties": {"instances": {"type": "array", "items": row, "minItems": 1,
                                             "maxItems": self.max_instances}}}


class SpecScorer:
    """``run(model, [rows, ...])`` -> probabilities per request, and whether degraded."""

    def __init__(self, spec: FeatureSpec, store: FeatureStore, guard: RedisGuard, cache,
                 on_lookup=lambda table, lookup: None):
        from trainers.spec_model import SpecNet
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
            out[f"{i.name}_emb"] = found.vectors.reshape(len(rows), i.width, dim)
            masks.append((keys != 0).astype(np.float32))
        out["mask"] = np.concatenate(masks, axis=1)
        out["numeric"] = batch.numeric
        return out, degraded

    def run(self, model, batch: list[list[dict]]) -> list[tuple[np.ndarray, bool]]:
        rows = [r for req in batch for r in req]
        inputs, degraded = self.inputs(rows, int(time.time() * 1000), model)
        probs = model.predict_inputs(inputs)
        out, start = [], 0
        for req in batch:
            out.append((probs[start:start + len(req)], degraded))
            start += len(req)
        return out
