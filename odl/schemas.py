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

from odl.features import Features, category_of

SCHEMA_VERSION = 1
MAX_ID = 2**53 - 1                # ids must survive a JSON/double round trip
MAX_REQUEST_ID_LEN = 128
MAX_EVENT_ID_LEN = 256
MAX_POSITION = 1000
MAX_CONTEXT_BYTES = 2048
MAX_FUTURE_SKEW_MS = 5 * 60 * 1000
MAX_AGE_MS = 7 * 24 * 3600 * 1000
EVENT_TYPES = ("impression", "click")


def default_event_id(etype: str, request_id: str, item_id: int) -> str:
    """The id of an event that does not carry one: one impression / click per request and item."""
    return f"{etype[0]}:{request_id}:{item_id}"


class _Event:
    """JSON encoding shared by the event types; ``event_id`` lets consumers drop duplicates."""
    type: str
    request_id: str
    item_id: int

    @property
    def event_id(self) -> str:
        return default_event_id(self.type, self.request_id, self.item_id)

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
    context: dict[str, Any] = field(default_factory=dict)
    type: str = "click"
    schema_version: int = SCHEMA_VERSION


@dataclass(frozen=True)
class Sample:
    """One labelled impression as the feature job emits it (topic ``samples``), with its
    features as of the impression's event time (``odl.features``)."""
    sample_id: str
    request_id: str
    user_id: int
    item_id: int
    position: int
    hour: int
    label: int
    impression_ts_ms: int
    category: int = 0
    features: Features = Features()
    # a provisional negative: emitted at the impression, before its label is known
    # (``trainer.delayed_feedback``); the final sample of the impression follows with its label
    provisional: bool = False

    @classmethod
    def from_json(cls, raw: bytes | str) -> "Sample":
        d = json.loads(raw)
        return cls(sample_id=str(d["sample_id"]), request_id=str(d["request_id"]),
                   user_id=int(d["user_id"]), item_id=int(d["item_id"]),
                   position=int(d["position"]), hour=int(d.get("hour") or 0),
                   label=int(d["label"]), impression_ts_ms=int(d["impression_ts_ms"]),
                   category=int(d.get("category") or 0),
                   features=Features.from_json(d.get("features")),
                   provisional=bool(d.get("provisional") or False))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class ParsedEvent:
    """A valid event reduced to what the feature job uses (one JSON parse per event)."""
    etype: str
    event_id: str
    request_id: str
    user_id: int
    item_id: int
    position: int
    hour: int
    category: int
    ts_ms: int


def validate_event(raw: str | bytes | None, record_ts_ms: int | None = None,
                   now_ms: int | None = None) -> str | None:
    """Return None for a valid event, else a short machine-readable reason."""
    return parse_event(raw, record_ts_ms, now_ms)[0]


def parse_event(raw: str | bytes | None, record_ts_ms: int | None = None,
                now_ms: int | None = None) -> tuple[str | None, ParsedEvent | None]:
    """(None, event) for a valid event, else (reason, None); ``record_ts_ms`` is the Kafka
    record timestamp, the event time by contract (the payload's ``ts_ms`` when absent)."""
    if raw is None:
        return "empty", None
    try:
        ev = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return "invalid_json", None
    if not isinstance(ev, dict):
        return "not_an_object", None
    reason = _check(ev, record_ts_ms, now_ms)
    if reason is not None:
        return reason, None
    ctx = ev.get("context") or {}
    hour = ctx.get("hour")
    eid = ev.get("event_id") or default_event_id(ev["type"], ev["request_id"], ev["item_id"])
    return None, ParsedEvent(
        etype=ev["type"], event_id=eid, request_id=ev["request_id"], user_id=ev["user_id"],
        item_id=ev["item_id"], position=ev.get("position") or 0,
        hour=hour % 24 if _is_int(hour) else 0, category=category_of(ctx.get("category")),
        ts_ms=record_ts_ms if record_ts_ms is not None else ev["ts_ms"])


def _check(ev: dict, record_ts_ms: int | None, now_ms: int | None) -> str | None:
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
    eid = ev.get("event_id")
    if eid is not None and (not isinstance(eid, str) or not eid or len(eid) > MAX_EVENT_ID_LEN):
        return "bad_event_id"
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
