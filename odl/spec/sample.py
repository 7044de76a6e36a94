"""A training sample under a feature spec: the record a feature job writes to the samples topic,
and how a batch of them becomes model inputs.  Written once here; the job's writer, replay and
benchmarks build records with ``sample_record``, the trainer reads them with ``SampleReader``.

A record is one JSON object::

    {"sample_id": "r-17", "ts_ms": 1700000000000, "label": 0, "provisional": false,
     "fields":    {"app": 12, "channel": 3, "i1": 0.5},          # the event's model inputs
     "counts":    {"by_app.impressions_1h": 41, "by_app.ctr_1h": 0.031},
     "sequences": {"last_movies": [318, 296]}}                  # newest first

* ``fields`` holds the event's values that the model reads (``sample_fields``): every sparse
  feature's field or cross parts and every numeric feature's field, typed as the event
  validation left them.  An absent or null field is a missing value (padding / the numeric
  default).
* ``counts`` holds the stream's real-time counts at the impression (``encode.count_names``):
  raw impression and click counts, the CTR already smoothed; absent = 0.
* ``sequences`` holds each declared sequence's last clicked values of its key.
* ``provisional`` (delayed feedback) marks the impression's provisional negative; its
  ``sample_id`` is shared with the final sample that follows (``trainers.samples``).

Keys and transforms are ``odl.spec.encode``'s: the same as ``odl eval --spec`` computes from a
log, so a model trained on the stream and one evaluated offline read identical inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from odl.spec.encode import (columns, count_input, count_inputs, moment_trail, numeric_values,
                             sequence_keys, sparse_keys)
from odl.spec.model import FeatureSpec

def sample_fields(spec: FeatureSpec) -> list[str]:
    """The event fields a sample carries: what the spec's sparse and numeric features read."""
    out: list[str] = []
    for f in spec.sparse.values():
        out += [x for x in f.inputs if x not in out]
    out += [n.field for n in spec.numeric.values() if n.field not in out]
    return out


def sample_record(spec: FeatureSpec, sample_id: str, ts_ms: int, label: int,
                  event: dict[str, Any], counts: dict[str, float] | None = None,
                  sequences: dict[str, list] | None = None, provisional: bool = False) -> dict:
    """The record of one sample (see the module docstring); ``event`` is a validated event's
    typed values, of which the record keeps ``sample_fields``."""
    doc: dict[str, Any] = {"sample_id": sample_id, "ts_ms": int(ts_ms), "label": int(label),
                           "fields": {f: event.get(f) for f in sample_fields(spec)}}
    if provisional:
        doc["provisional"] = True
    if counts:
        doc["counts"] = counts
    if sequences:
        doc["sequences"] = sequences
    return doc


@dataclass
class SampleBatch:
    """Decoded records, columnar: the header of each and its model inputs."""
    sample_ids: list[str]
    ts_ms: np.ndarray                 # int64 [n]
    labels: np.ndarray                # int64 [n], 0 or 1
    provisional: np.ndarray           # bool [n]
    keys: dict[str, np.ndarray]       # model input (``spec_inputs`` order) -> [n, width] int64
    numeric: np.ndarray               # float32 [n, numeric features + count inputs]
    valid: np.ndarray                 # bool [n]: False for a malformed record (zeros elsewhere)
    errors: list[str]                 # one reason per malformed record
    # float64 [n, 3 x standardised features]: the reader's moments (``moment_names`` order)
    # after each record; a malformed record's are those before it.  [n, 0] when frozen.
    moments_after: np.ndarray | None = None


class SampleReader:
    """Records -> ``SampleBatch``.  Keeps what a stream needs from batch to batch: key caches
    per feature and the running moments of ``standardize`` features (``moments``: the trainer
    checkpoints them and versions carry them; a ``frozen`` reader -- serving's -- scores every
    record on the moments it was given and never moves them)."""

    def __init__(self, spec: FeatureSpec, frozen: bool = False):
        self.spec = spec
        self.frozen = frozen
        self.counts = count_inputs(spec)
        self.lists = {f for f in sample_fields(spec) if spec.field(f).type.startswith("list")}
        self._caches: dict[str, dict] = {n: {} for n in [*spec.sparse, *spec.realtime.sequences]}
        # every field a feature reads: taken from the records as columns in one pass
        self._read_fields = [*(x for f in spec.sparse.values() for x in (f.cross or [f.field])),
                             *(f.field for f in spec.numeric.values())]
        self._moments: dict[str, list[float]] = {n: [0.0, 0.0, 0.0] for n, f in spec.numeric.items()
                                                 if f.transform == "standardize"}

    @property
    def moment_names(self) -> list[str]:
        """The ``standardize`` features, in the column order of ``moments_after``."""
        return list(self._moments)

    def moments_at(self, after: np.ndarray) -> dict[str, list[float]]:
        """One row of ``SampleBatch.moments_after`` as ``moments`` says them."""
        return {n: [float(x) for x in after[3 * k:3 * k + 3]] for k, n in enumerate(self._moments)}

    @property
    def moments(self) -> dict[str, list[float]]:
        """Each ``standardize`` feature's [count, sum, sum of squares] so far (a copy)."""
        return {n: list(m) for n, m in self._moments.items()}

    def set_moments(self, moments: dict[str, list[float]] | None) -> None:
        """Take ``moments`` (from a checkpoint or a version); features it lacks start afresh,
        names the spec no longer declares are ignored."""
        for n in self._moments:
            m = (moments or {}).get(n)
            self._moments[n] = [float(x) for x in m] if m is not None and len(m) == 3 \
                else [0.0, 0.0, 0.0]

    def read_docs(self, docs: list[dict]) -> SampleBatch:
        """Records already decoded (serving builds them as dicts): the same checks and encoding
        as ``read``, without a JSON round trip; raises on a malformed one."""
        for d in docs:
            _checked(d, self.lists)
        return self._encode(docs, np.ones(len(docs), bool), [])

    def read(self, values: list[bytes]) -> SampleBatch:
        """Decode ``values``; a malformed record is refused (``valid`` False, a reason in
        ``errors``) and keeps its place.  The common case -- every record sound -- parses all of
        them in one call and encodes column by column; a batch with a bad record is parsed again
        record by record to find it."""
        n = len(values)
        docs: list[dict | None] | None = None
        try:
            docs = orjson.loads(b"[" + b",".join(values) + b"]")
            if len(docs) != n:      # a value that was not exactly one JSON document
                docs = None
            else:
                for d in docs:
                    _checked(d, self.lists)
        except (ValueError, TypeError, KeyError):
            docs = None
        if docs is not None:
            try:
                return self._encode(docs, np.ones(n, bool), [])
            except TypeError:       # a field value of the wrong shape: find its record
                pass
        docs, errors, valid = [], [], np.ones(n, bool)
        for k, v in enumerate(values):
            try:
                d = _checked(orjson.loads(v), self.lists)
                self._encode([d], np.ones(1, bool), [], probe=True)
                docs.append(d)
            except (ValueError, TypeError, KeyError) as exc:
                valid[k] = False
                errors.append(f"record {k}: {exc}")
                docs.append(None)
        return self._encode(docs, valid, errors)

    def _encode(self, docs: list[dict | None], valid: np.ndarray, errors: list[str],
                probe: bool = False) -> SampleBatch | None:
        """The batch of the valid ``docs`` (placed among all); ``probe``: only see whether one
        record encodes (no stream state changes)."""
        spec, n = self.spec, len(docs)
        good = [d for d in docs if d is not None]
        fields = [d["fields"] for d in good]
        by_field = columns(fields, self._read_fields)
        keys = {}
        for name, f in spec.sparse.items():
            cache = {} if probe else self._caches[name]
            keys[name] = _spread(sparse_keys(spec, f, fields, cache, by_field)[0], valid)
        for name, s in spec.realtime.sequences.items():
            lists = [(d.get("sequences") or {}).get(name) for d in good]
            cache = {} if probe else self._caches[name]
            keys[name] = _spread(sequence_keys(s.value, lists, s.length, cache), valid)
        if probe:
            return None
        cols, trails = [], []
        before = np.array([x for m in self._moments.values() for x in m], np.float64)
        for name, f in spec.numeric.items():
            raw = _numbers(list(by_field[f.field]))
            m = self._moments.get(name)
            if m is not None and not self.frozen:
                trails.append(moment_trail(raw, m))
            cols.append(numeric_values(f, raw, m, frozen=self.frozen))
        if self.counts:
            counts = [d.get("counts") or {} for d in good]
            for c, value in self.counts:
                cols.append(count_input(value, _numbers([x.get(c) for x in counts])))
        numeric = (_spread(np.stack(cols, axis=1), valid) if cols
                   else np.zeros((n, 0), np.float32))
        header = np.array([(d["ts_ms"], d["label"], d.get("provisional") is True) for d in good],
                          np.int64).reshape(-1, 3)
        h = _spread(header, valid)
        after = (_carried(np.concatenate(trails, axis=1), valid, before) if trails
                 else np.zeros((n, 0), np.float64))
        return SampleBatch([d["sample_id"] if d else "" for d in docs], h[:, 0], h[:, 1],
                           h[:, 2].astype(bool), keys, numeric.astype(np.float32), valid, errors,
                           after)


def _checked(d: Any, lists: set[str]) -> dict:
    """The record if its header and parts are sound, else an error naming what is wrong (a
    field value of the wrong shape fails its encoding: ``odl.spec.encode``)."""
    if not isinstance(d, dict):
        raise TypeError("a sample record is a JSON object")
    sid, ts, label = d["sample_id"], d["ts_ms"], d["label"]
    if not isinstance(sid, str) or not sid:
        raise TypeError(f"sample_id must be a non-empty string, not {sid!r}")
    if not isinstance(ts, int) or isinstance(ts, bool) or not 0 <= ts < 1 << 62:
        raise ValueError(f"ts_ms must be epoch milliseconds, not {ts!r}")
    if label not in (0, 1) or isinstance(label, float):
        raise ValueError(f"label {label!r} is not 0 or 1")
    prov = d.get("provisional", False)
    if not isinstance(prov, bool):
        raise TypeError(f"provisional must be a boolean, not {prov!r}")
    if prov and label:
        raise ValueError("a provisional sample is a negative: label must be 0")
    for part in ("fields", "counts", "sequences"):
        if part in d and d[part] is not None and not isinstance(d[part], dict):
            raise TypeError(f"{part} must be an object")
    fields = d.get("fields")
    if not isinstance(fields, dict):
        raise KeyError("fields")
    for name in lists:
        v = fields.get(name)
        if v is not None and not isinstance(v, list):
            raise TypeError(f"fields.{name} must be a list of values, not {v!r}")
    return d


def _numbers(col: list[Any]) -> np.ndarray:
    """float64 [n]: None and anything that is not a number -> nan (a missing value)."""
    try:
        a = np.array(col, np.float64)        # None -> nan
        if a.ndim == 1:
            return a
    except (TypeError, ValueError):
        pass
    return np.array([_number(x) for x in col], np.float64)


def _number(x: Any) -> float:
    if isinstance(x, bool):
        return float(x)
    return float(x) if isinstance(x, (int, float)) else np.nan


def _carried(after: np.ndarray, valid: np.ndarray, before: np.ndarray) -> np.ndarray:
    """Per-record moments of the valid records spread over all: a malformed record carries the
    moments of the last valid one before it (``before``, the chunk's start, if none)."""
    if valid.all():
        return after
    last = np.cumsum(valid) - 1                     # index among the valid, -1 before the first
    return np.concatenate([before[None, :], after])[last + 1]


def _spread(a: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Rows of the valid records back to their places among all records (zeros elsewhere)."""
    if valid.all():
        return a
    out = np.zeros((len(valid), *a.shape[1:]), a.dtype)
    out[valid] = a
    return out
