"""Event and sample contracts (topics ``events`` and ``samples``).

Events are JSON, one per record, key = user id, record timestamp = event time.  The feature job
validates them in Flink through ``parse_event``, whose rules are generated from the default
feature spec (``specs/default.yaml``, ``odl.spec.events``): one definition of "valid" for the
job, the tests and the DLQ's reasons.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

from odl.features import Features
from odl.spec import DEFAULT_SPEC_PATH, EventValidator, default_spec

SCHEMA_VERSION = 1
# the rules themselves (types, limits, clocks) are the default spec's ``events`` section
# (specs/default.yaml), compiled by ``odl.spec.events``


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
    reason, v = _validator().parse(raw, record_ts_ms, now_ms)
    if v is None:
        return reason, None
    eid = v["event_id"] or default_event_id(v["type"], v["request_id"], v["item_id"])
    return None, ParsedEvent(
        etype=v["type"], event_id=eid, request_id=v["request_id"], user_id=v["user_id"],
        item_id=v["item_id"], position=v["position"] or 0, hour=v["hour"] or 0,
        category=v["category"] or 0,
        ts_ms=record_ts_ms if record_ts_ms is not None else v["ts_ms"])


@lru_cache(maxsize=1)
def _validator() -> EventValidator:
    spec = default_spec()
    if spec.events.version != SCHEMA_VERSION:
        raise RuntimeError(f"{DEFAULT_SPEC_PATH}: events.version {spec.events.version} but the "
                           f"event classes write schema_version {SCHEMA_VERSION}")
    return EventValidator(spec.events)
