"""The feature spec: one typed declaration of a log's events and the features learned from them.

Why one declaration: the stream job, the online store, the trainer, the exported graph and the
serving API each need the same facts (which fields exist, which become embeddings, which windows
are counted, what a label is).  Spelled once here, they cannot disagree.  A spec is YAML
(``specs/*.yaml``), validated like the config: unknown keys, bad values and references to things
that are not declared are errors naming the offending entry.

Sections:

* ``events``   -- the event fields, their types, which are required (per event type) and their
  limits; event validation is generated from it (``odl.spec.events``), nowhere else;
* ``tables``   -- embedding tables (dim, capacity, admission, TTL, optimiser); several features
  may share one;
* ``sparse``   -- features that become embeddings: one field, a list field (multi-hot, pooled)
  or a cross of fields;
* ``numeric``  -- numbers with their transform;
* ``realtime`` -- counts the stream job keeps over named windows, keyed by a field or a cross,
  and sequences (a key's last N clicked values);
* ``label``    -- an impression-click join, or a field the events already carry;
* ``serving``  -- what a request brings and which entities' real-time features serving looks up.
"""
from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_ID = 2**53 - 1                  # ids survive a JSON/double round trip
INT64 = (-2**63, 2**63 - 1)         # an int is what a BIGINT column and an int64 tensor hold

FieldType = Literal["id", "int", "float", "string", "bool", "object",
                    "list[id]", "list[int]", "list[string]"]
NUMBER_TYPES = ("int", "float")
CROSSABLE = ("id", "int", "string", "bool")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FieldSpec(_Strict):
    """One event field.  ``path`` locates it in the JSON event (dotted, default: its name)."""
    type: FieldType
    path: str | None = None
    required: bool | list[str] = Field(False, description="true, or the event types requiring it")
    min: float | None = None
    max: float | None = None
    max_len: int | None = Field(None, ge=1, description="characters of a string, items of a "
                                "list, JSON bytes of an object")
    non_empty: bool = False
    modulo: int | None = Field(None, ge=1, description="fold an int into [0, modulo), e.g. hours")
    hashed: int | None = Field(None, ge=1, description="a categorical value (string or int) "
                               "folded into [0, hashed) buckets")
    on_invalid: Literal["reject", "default"] = Field(
        "reject", description="an optional field of the wrong type or range: refuse the event, "
        "or treat the field as absent (free-form context)")

    @property
    def bounds(self) -> tuple[float | None, float | None]:
        """(min, max); ids default to [0, MAX_ID], ints to the int64 range."""
        if self.type in ("id", "list[id]"):
            return (0 if self.min is None else self.min, MAX_ID if self.max is None else self.max)
        if self.type in ("int", "list[int]"):
            return (INT64[0] if self.min is None else self.min,
                    INT64[1] if self.max is None else self.max)
        return self.min, self.max

    @property
    def location(self) -> tuple[str, ...]:
        return tuple((self.path or "").split(".")) if self.path else ()

    def required_for(self, event_type: str | None) -> bool:
        if isinstance(self.required, bool):
            return self.required
        return event_type in self.required

    @model_validator(mode="after")
    def _limits(self) -> "FieldSpec":
        if (self.min is not None or self.max is not None) and \
                self.type not in ("id", "list[id]", "list[int]", *NUMBER_TYPES):
            raise ValueError(f"min/max apply to numbers and ids, not {self.type}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} > max {self.max}")
        if self.modulo is not None and self.type != "int":
            raise ValueError("modulo applies to int fields")
        if self.hashed is not None and self.type not in ("string", "int", "id"):
            raise ValueError("hashed applies to string, int or id fields")
        return self


class EventsSpec(_Strict):
    type_field: str | None = Field("type", description="the field naming the event type; none "
                                   "for logs of one kind of row")
    types: list[str] = Field(default_factory=list)
    time_field: str = Field("ts_ms", description="event time, epoch milliseconds")
    version_field: str | None = "schema_version"
    version: int | None = 1
    id_field: str | None = Field(None, description="an event's own id (for deduplication)")
    max_future_skew_s: float | None = Field(300, gt=0, description="events further ahead of the "
                                            "stream's clock are refused")
    max_age_s: float | None = Field(7 * 86400, gt=0, description="events older than this "
                                    "behind the stream's clock are refused")
    fields: dict[str, FieldSpec]

    @model_validator(mode="after")
    def _known(self) -> "EventsSpec":
        if self.time_field not in self.fields:
            raise ValueError(f"time_field {self.time_field!r} is not declared in fields")
        if self.id_field is not None and self.id_field not in self.fields:
            raise ValueError(f"id_field {self.id_field!r} is not declared in fields")
        if self.type_field is None and self.types:
            raise ValueError("types need a type_field")
        for name, f in self.fields.items():
            if isinstance(f.required, list):
                odd = sorted(set(f.required) - set(self.types))
                if odd:
                    raise ValueError(f"fields.{name}.required names undeclared event types {odd}")
        return self


class TableSpec(_Strict):
    """One embedding table; the trainer's dynamic table, the Redis table, the serving input."""
    dim: int = Field(16, ge=1)
    capacity: int = Field(1 << 20, ge=2)
    admit_min_count: int = Field(1, ge=1)
    admit_probability: float = Field(1.0, gt=0, le=1)
    ttl_s: float | None = Field(None, gt=0)
    optimizer: Literal["adagrad", "adam", "ftrl"] | None = Field(
        None, description="None: the trainer's sparse_optimizer")
    learning_rate: float | None = Field(
        None, gt=0, description="the sparse optimiser's step size for this table; None: the "
                                "trainer's sparse_learning_rate")


class SparseFeature(_Strict):
    """An embedding input: one field's value, a list field's values pooled, or a cross."""
    table: str
    field: str | None = None
    cross: list[str] | None = Field(None, min_length=2)
    pooling: Literal["sum", "mean"] = "sum"

    @model_validator(mode="after")
    def _one_source(self) -> "SparseFeature":
        if (self.field is None) == (self.cross is None):
            raise ValueError("give exactly one of field or cross")
        return self

    @property
    def inputs(self) -> list[str]:
        return [self.field] if self.field is not None else list(self.cross or ())


class NumericFeature(_Strict):
    field: str
    transform: Literal["none", "log1p", "clip", "standardize"] = "none"
    clip: tuple[float, float] | None = None
    default: float = 0.0

    @model_validator(mode="after")
    def _clip(self) -> "NumericFeature":
        if (self.transform == "clip") != (self.clip is not None):
            raise ValueError("transform clip needs clip: [lo, hi], and clip needs transform clip")
        if self.clip is not None and self.clip[0] >= self.clip[1]:
            raise ValueError(f"clip {list(self.clip)}: lo must be below hi")
        return self


class WindowFeature(_Strict):
    """Impressions / clicks / smoothed CTR of a key (a field or a cross) over named windows."""
    key: list[str] = Field(min_length=1)
    windows: list[str] = Field(min_length=1)
    values: list[Literal["impressions", "clicks", "ctr"]] = Field(
        default_factory=lambda: ["impressions", "clicks"], min_length=1)


class SequenceFeature(_Strict):
    """The key's last ``length`` clicked values of ``value``, as a pooled embedding."""
    key: str
    value: str
    length: int = Field(5, ge=1, le=200)
    table: str
    pooling: Literal["mean", "attention"] = "mean"


class RealtimeSpec(_Strict):
    tile_s: int = Field(60, ge=1, description="window counts advance in steps of this")
    windows: dict[str, int] = Field(default_factory=dict, description="name -> seconds")
    counts: dict[str, WindowFeature] = Field(default_factory=dict)
    sequences: dict[str, SequenceFeature] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _windows(self) -> "RealtimeSpec":
        for name, seconds in self.windows.items():
            if seconds <= 0 or seconds % self.tile_s:
                raise ValueError(f"windows.{name}: {seconds} s is not a positive multiple of "
                                 f"tile_s ({self.tile_s} s)")
        used = {w for c in self.counts.values() for w in c.windows}
        for cname, c in self.counts.items():
            missing = [w for w in c.windows if w not in self.windows]
            if missing:
                raise ValueError(f"counts.{cname}.windows: {missing} not declared in windows")
        unused = sorted(set(self.windows) - used)
        if unused:
            raise ValueError(f"windows {unused}: no count uses them")
        return self


class JoinSpec(_Strict):
    """Label = a click of the same key within the attribution window after the impression."""
    impression: str = "impression"
    click: str = "click"
    key: list[str] = Field(default_factory=lambda: ["request_id", "item_id"], min_length=1)
    attribution_window_s: int = Field(10, ge=1)


class LabelSpec(_Strict):
    join: JoinSpec | None = None
    field: str | None = Field(None, description="events that already carry their label")
    threshold: float | None = Field(None, description="with field: a click when the field is "
                                    "at least this (a rating >= 4, say); default: above 0")

    @model_validator(mode="after")
    def _one(self) -> "LabelSpec":
        if (self.join is None) == (self.field is None):
            raise ValueError("give exactly one of join or field")
        if self.threshold is not None and self.field is None:
            raise ValueError("threshold applies to a label field")
        return self

    def positive(self, value) -> bool:
        """Whether a label field's value is a click: at least ``threshold``, else above 0."""
        if value is None:
            return False
        return value >= self.threshold if self.threshold is not None else value > 0


class ServingSpec(_Strict):
    request: list[str] = Field(default_factory=list, description="fields each request carries")
    entities: list[str] = Field(default_factory=list, description="key fields whose real-time "
                                "features serving looks up in the online store")
    candidates: list[str] = Field(default_factory=list, description="the request fields that "
                                  "describe one candidate of a `:recommend` call (an item, an "
                                  "ad); the other request fields are its shared context")


class FeatureSpec(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_-]*$")
    description: str = ""
    events: EventsSpec
    tables: dict[str, TableSpec]
    sparse: dict[str, SparseFeature] = Field(default_factory=dict)
    numeric: dict[str, NumericFeature] = Field(default_factory=dict)
    realtime: RealtimeSpec = RealtimeSpec()
    label: LabelSpec
    serving: ServingSpec = ServingSpec()

    @model_validator(mode="after")
    def _references(self) -> "FeatureSpec":
        problems = list(_reference_problems(self))
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def hash(self) -> str:
        """Identity of what a model trained under this spec expects: recorded in checkpoints and
        manifests, so a stack refuses to mix state of two specs.  ``description`` is left out."""
        # serving.candidates shapes the recommend body, not what the model expects; a table's
        # learning rate is how it trains, not what its state is (as trainer.sparse_learning_rate)
        body = self.model_dump(mode="json", exclude={
            "description": True, "serving": {"candidates": True},
            "tables": {name: {"learning_rate"} for name in self.tables}})
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]

    def field(self, name: str) -> FieldSpec:
        return self.events.fields[name]


# each recommended item is answered as its candidate fields plus these
_RECOMMEND_RESERVED = frozenset({"score", "rank"})


def _reference_problems(spec: FeatureSpec):
    """Every cross-reference that does not resolve, each naming its entry."""
    fields, tables = spec.events.fields, spec.tables

    def field_of(where: str, name: str, kinds: tuple[str, ...] | None = None):
        f = fields.get(name)
        if f is None:
            return f"{where}: field {name!r} is not declared in events.fields"
        if kinds is not None and f.type not in kinds:
            return f"{where}: field {name!r} is {f.type}, needs one of {list(kinds)}"
        return None

    used_tables: set[str] = set()
    for name, sf in spec.sparse.items():
        where = f"sparse.{name}"
        if sf.table not in tables:
            yield f"{where}: table {sf.table!r} is not declared in tables"
        used_tables.add(sf.table)
        if sf.cross is not None:
            for f in sf.cross:
                p = field_of(f"{where}.cross", f, CROSSABLE)
                if p:
                    yield p + (" (a cross of a list field is not defined)"
                               if f in fields and fields[f].type.startswith("list") else "")
        elif sf.field is not None:
            p = field_of(where, sf.field, ("id", "int", "string", "bool", "list[id]",
                                           "list[int]", "list[string]"))
            if p:
                yield p
    for name, nf in spec.numeric.items():
        p = field_of(f"numeric.{name}", nf.field, ("int", "float", "bool"))
        if p:
            yield p
    for name, c in spec.realtime.counts.items():
        for k in c.key:
            p = field_of(f"realtime.counts.{name}.key", k, ("id", "int", "string"))
            if p:
                yield p
    for name, s in spec.realtime.sequences.items():
        where = f"realtime.sequences.{name}"
        for p in (field_of(f"{where}.key", s.key, ("id", "int", "string")),
                  field_of(f"{where}.value", s.value, ("id", "int"))):
            if p:
                yield p
        if s.table not in tables:
            yield f"{where}: table {s.table!r} is not declared in tables"
        used_tables.add(s.table)
    unused = sorted(set(tables) - used_tables)
    if unused:
        yield f"tables {unused}: no sparse feature or sequence uses them"
    if spec.label.field is not None:
        p = field_of("label.field", spec.label.field, ("int", "bool", "float"))
        if p:
            yield p
    if spec.label.join is not None:
        j = spec.label.join
        for t in (j.impression, j.click):
            if t not in spec.events.types:
                yield f"label.join: event type {t!r} is not in events.types {spec.events.types}"
        for k in j.key:
            p = field_of("label.join.key", k)
            if p:
                yield p
    for f in spec.serving.request:
        p = field_of("serving.request", f)
        if p:
            yield p
    for f in spec.serving.candidates:
        if f not in spec.serving.request:
            yield f"serving.candidates: {f!r} is not in serving.request {spec.serving.request}"
        elif f in _RECOMMEND_RESERVED:
            yield f"serving.candidates: {f!r} is a name the recommend answer uses itself"
    keys = {k for c in spec.realtime.counts.values() for k in c.key} | \
           {s.key for s in spec.realtime.sequences.values()}
    for e in spec.serving.entities:
        p = field_of("serving.entities", e)
        if p:
            yield p
        elif e not in keys:
            yield f"serving.entities: {e!r} keys no real-time count or sequence"
