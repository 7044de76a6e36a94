"""Event validation generated from a spec's ``events`` section -- the only place the rules live.

``EventValidator(spec.events).parse(raw, record_ts_ms, now_ms)`` returns ``(None, values)`` for
a valid event (``values``: field name -> typed value, folded where the spec says so, ``None`` for
an absent optional field) or ``(reason, None)``.  Reasons are short and machine-readable, the
DLQ's vocabulary:

* ``empty``, ``invalid_json``, ``not_an_object`` -- the payload is not a JSON object;
* ``bad_schema_version``, ``bad_type`` -- the envelope;
* ``bad_<field>`` -- missing when required, the wrong type, empty or too long;
* ``<field>_out_of_range`` -- a number outside the field's ``min``/``max``;
* ``event_time_in_future``, ``event_time_too_old`` -- against the stream's clock (``now_ms``).

Checks are compiled once into one closure per field, because the feature job calls ``parse`` for
every event (its parse stage is the job's ceiling: docs/features.md).
"""
from __future__ import annotations

import json
import time
import zlib
from typing import Any, Callable

from odl.spec.model import EventsSpec, FieldSpec

Check = Callable[[Any], tuple[str | None, Any]]   # value -> (reason, typed value)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def stable_bucket(value: Any, buckets: int) -> int:
    """A categorical value's bucket, the same in every process (Python's ``hash`` is salted)."""
    if _is_int(value):
        return value % buckets
    return zlib.crc32(str(value).encode()) % buckets


def _scalar_ok(kind: str, v: Any) -> bool:
    if kind in ("id", "int"):
        return _is_int(v)
    if kind == "float":
        return (_is_int(v) or isinstance(v, float)) and v == v and v not in (float("inf"), float("-inf"))
    if kind == "string":
        return isinstance(v, str)
    if kind == "bool":
        return isinstance(v, bool)
    return False


def compile_field(name: str, f: FieldSpec) -> Check:
    """One field's check: wrong type, length or emptiness -> ``bad_<name>``, range ->
    ``<name>_out_of_range``; then the folding the spec asks for.  Specialised per type: this
    runs for every field of every event."""
    bad, out = f"bad_{name}", f"{name}_out_of_range"
    (lo, hi), max_len = f.bounds, f.max_len
    lo = float("-inf") if lo is None else lo
    hi = float("inf") if hi is None else hi
    kind = f.type
    if kind == "object":
        def check(v):
            if type(v) is not dict or (max_len is not None and len(json.dumps(v)) > max_len):
                return bad, None
            return None, v
    elif kind.startswith("list["):
        item = kind[5:-1]

        def check(v):
            if type(v) is not list or (max_len is not None and len(v) > max_len) or \
                    (f.non_empty and not v):
                return bad, None
            for x in v:
                if not _scalar_ok(item, x):
                    return bad, None
                if item != "string" and not lo <= x <= hi:
                    return out, None
            return None, v
    elif kind == "string":
        non_empty, limit = f.non_empty, max_len if max_len is not None else float("inf")
        hashed = f.hashed

        def check(v):
            if type(v) is not str or (non_empty and not v) or len(v) > limit:
                return bad, None
            return None, (v if hashed is None else stable_bucket(v, hashed))
    elif kind in ("id", "int"):
        fold = f.modulo or f.hashed

        def check(v):
            if type(v) is not int:
                return bad, None
            if not lo <= v <= hi:
                return out, None
            return None, (v if fold is None else v % fold)
    else:
        def check(v):
            if not _scalar_ok(kind, v):
                return bad, None
            if kind != "bool" and not lo <= v <= hi:
                return out, None
            return None, v
    return check


class EventValidator:
    """The compiled rules of one ``events`` section."""

    def __init__(self, spec: EventsSpec):
        self.spec = spec
        # (name, top-level key, deeper path, required by every type, types requiring it, check)
        self._fields = []
        for name, f in spec.fields.items():
            loc = f.location or (name,)
            req = f.required if isinstance(f.required, bool) else False
            req_types = frozenset(f.required) if isinstance(f.required, list) else frozenset()
            self._fields.append((name, loc[0], loc[1:], req, req_types, f.on_invalid == "default",
                                 compile_field(name, f)))
        self._types = set(spec.types)

    def parse(self, raw: str | bytes | None, record_ts_ms: int | None = None,
              now_ms: int | None = None) -> tuple[str | None, dict[str, Any] | None]:
        if raw is None:
            return "empty", None
        try:
            ev = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return "invalid_json", None
        if not isinstance(ev, dict):
            return "not_an_object", None
        return self.check(ev, record_ts_ms, now_ms)

    def check(self, ev: dict, record_ts_ms: int | None = None,
              now_ms: int | None = None) -> tuple[str | None, dict[str, Any] | None]:
        """Validate an already decoded event (a log row mapped through the spec, say)."""
        s = self.spec
        if s.version_field is not None and ev.get(s.version_field) != s.version:
            return "bad_schema_version", None
        etype = None
        if s.type_field is not None:
            etype = ev.get(s.type_field)
            if type(etype) is not str or etype not in self._types:   # a list is unhashable
                return "bad_type", None
        values: dict[str, Any] = {}
        if etype is not None:
            values[s.type_field] = etype
        for name, key, deeper, req, req_types, lenient, check in self._fields:
            v = ev.get(key)
            for part in deeper:
                v = v.get(part) if type(v) is dict else None
            if v is None:
                if req or (etype in req_types):
                    return f"bad_{name}", None
                values[name] = None
                continue
            reason, typed = check(v)
            if reason is not None:
                if lenient:
                    values[name] = None
                    continue
                return reason, None
            values[name] = typed
        event_ts = record_ts_ms if record_ts_ms is not None else values.get(s.time_field)
        if event_ts is not None:
            now_ms = int(time.time() * 1000) if now_ms is None else now_ms
            if s.max_future_skew_s is not None and event_ts > now_ms + s.max_future_skew_s * 1000:
                return "event_time_in_future", None
            if s.max_age_s is not None and event_ts < now_ms - s.max_age_s * 1000:
                return "event_time_too_old", None
        return None, values

