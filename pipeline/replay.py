"""A log replayed as the live event stream (``source.kind: log``): bootstrap from history, then go
live (Monolith's batch-then-online), through the same feature job as live events.

The log (CSV or Parquet, ``odl.spec.logs``) is read through a feature spec -- columns mapped by
``source.log_columns``, every row checked by the spec's rules against the log's own clock -- and
replayed in event-time order (a stable sort: rows of one millisecond keep their file order).
Time is compressed onto now: a row ``t`` after the log's first is due ``t / log_speedup`` after
the replay starts, and its event time (the spec's time field, and the Kafka record timestamp,
which the feature job judges) is that due time, so windows, joins and ages behave as live.  A
row strictly later than the one before stays at least 1 ms later (compression would otherwise
put a click on its impression's millisecond, which the join refuses), so where the log holds
more than 1,000 distinct times per replayed second the replay runs slower than ``log_speedup``.
The job's windows (attribution, counts) are in replayed time: ``log_speedup`` scales them in
the log's.

A refused row is not dropped: it goes to the DLQ topic with its reason, as the feature job's
refusals do (``source_partition`` -1: not a Kafka record; ``source_offset``: its 1-based row
number in the log; ``payload``: the row's values as read).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from odl.spec import load_spec
from odl.spec.logs import event_of, read_log
from pipeline.generator import Record

REFUSED = "refused"     # the kind of a record bound for the DLQ


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), default=str).encode()


class LogReplay:
    def __init__(self, spec_path: Path, log_path: Path, columns: dict[str, str], start_ms: int,
                 speedup: float, max_events: int | None = None):
        self.spec = load_spec(spec_path)
        self.path, self.columns = Path(log_path), dict(columns)
        self.start_ms, self.speedup, self.max_events = start_ms, speedup, max_events

    @property
    def time_field(self) -> str:
        return self.spec.events.time_field

    def records(self) -> Iterator[Record]:
        """Refused rows first (due at once, to the DLQ), then the valid ones in time order."""
        ev = self.spec.events
        rows, refused = [], []
        for row in read_log(self.spec, self.path, self.columns):
            (refused if row.reason is not None else rows).append(row)
        for row in refused:
            yield Record(self.start_ms, b"", _json({
                "reason": row.reason, "payload": _json(row.raw).decode(), "source_partition": -1,
                "source_offset": row.number, "ts_ms": self.start_ms}), self.start_ms, REFUSED)
        rows.sort(key=lambda r: r.values[ev.time_field])
        if self.max_events is not None:
            rows = rows[:self.max_events]
        if not rows:
            return
        t0 = rows[0].values[ev.time_field]
        key_field = self.spec.serving.entities[0] if self.spec.serving.entities else None
        last_t, last_due = t0, self.start_ms
        for row in rows:
            values = dict(row.values)
            t = values[ev.time_field]
            due = self.start_ms + int((t - t0) / self.speedup)
            if t > last_t:      # strictly later stays strictly later: a click never lands on
                due = max(due, last_due + 1)    # its impression's millisecond
            last_t, last_due = t, max(due, last_due)
            due = last_due
            values[ev.time_field] = due
            if ev.version_field is not None and values.get(ev.version_field) is None:
                values[ev.version_field] = ev.version
            kind = values.get(ev.type_field) if ev.type_field else "event"
            key = str(values.get(key_field)).encode() if key_field else b""
            event = event_of(self.spec, {k: v for k, v in values.items() if v is not None})
            yield Record(due, key, _json(event), due, str(kind))
