"""Event and sample contracts (topics ``events`` and ``samples``).

Events are JSON, one per record, key = user id, record timestamp = event time.  The feature job
validates them in Flink; ``validate_event`` is the single definition of what "valid" means and is
what the Flink UDF calls, so the rules cannot drift between the job and the tests.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 1
MAX_ID = 2**53 - 1                # ids must survive a JSON/double round trip
MAX_REQUEST_ID_LEN = 128
MAX_POSITION = 1000
MAX_CONTEXT_BYTES = 2048
MAX_FUTURE_SKEW_MS = 5 * 60 * 1000
MAX_AGE_MS = 7 * 24 * 3600 * 1000
EVENT_TYPES = ("impression", "click")


class _Event:
    """JSON encoding shared by the event types; ``event_id`` lets consumers drop duplicates."""
    type: str
    request_id: str
    item_id: int

    @property
    def event_id(self) -> str:
        return f"{self.type[0]}:{self.request_id}:{self.item_id}"

    def to_json(self) -> bytes:
        return json.dumps({**asdict(self), "event_id": self.event_id}, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Impression(_Event):
    request_id: str
    user_id: int
    item_id: int
    position: int
    ts_ms: int
    context: dict[str, Any] = field(default_factory=dict)
    type: str = "impression"
    schema_version: int = SCHEMA_VERSION


@dataclass(frozen=True)
class Click(_Event):
    request_id: str
    user_id: int
    item_id: int
    ts_ms: int
    type: str = "click"
    schema_version: int = SCHEMA_VERSION


@dataclass(frozen=True)
class Sample:
    """One labelled impression as the feature job emits it (topic ``samples``)."""
    sample_id: str
    request_id: str
    user_id: int
    item_id: int
    position: int
    hour: int
    label: int
    impression_ts_ms: int

    @classmethod
    def from_json(cls, raw: bytes | str) -> "Sample":
        d = json.loads(raw)
        return cls(sample_id=str(d["sample_id"]), request_id=str(d["request_id"]),
                   user_id=int(d["user_id"]), item_id=int(d["item_id"]),
                   position=int(d["position"]), hour=int(d.get("hour") or 0),
                   label=int(d["label"]), impression_ts_ms=int(d["impression_ts_ms"]))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_event(raw: str | bytes | None, record_ts_ms: int | None = None,
                   now_ms: int | None = None) -> str | None:
    """Return None for a valid event, else a short machine-readable reason."""
    if raw is None:
        return "empty"
    try:
        ev = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return "invalid_json"
    if not isinstance(ev, dict):
        return "not_an_object"
    if ev.get("schema_version") != SCHEMA_VERSION:
        return "bad_schema_version"
    etype = ev.get("type")
    if etype not in EVENT_TYPES:
        return "bad_type"
    rid = ev.get("request_id")
    if not isinstance(rid, str) or not rid or len(rid) > MAX_REQUEST_ID_LEN:
        return "bad_request_id"
    for name in ("user_id", "item_id"):
        v = ev.get(name)
        if not _is_int(v):
            return f"bad_{name}"
        if not 0 <= v <= MAX_ID:
            return f"{name}_out_of_range"
    ts = ev.get("ts_ms")
    if not _is_int(ts):
        return "bad_ts_ms"
    if etype == "impression":
        pos = ev.get("position")
        if not _is_int(pos) or not 0 <= pos <= MAX_POSITION:
            return "bad_position"
        ctx = ev.get("context", {})
        if not isinstance(ctx, dict) or len(json.dumps(ctx)) > MAX_CONTEXT_BYTES:
            return "bad_context"
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    event_ts = record_ts_ms if record_ts_ms is not None else ts
    if event_ts > now_ms + MAX_FUTURE_SKEW_MS:
        return "event_time_in_future"
    if event_ts < now_ms - MAX_AGE_MS:
        return "event_time_too_old"
    return None
