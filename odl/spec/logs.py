"""Logs in: a CSV or Parquet log read through a spec, row by row, bad rows named.

A log's columns are the spec's field names (``columns`` maps other names onto them).  Each row
becomes an event shaped as the spec locates its fields (``path``), is checked by the spec's
generated rules (``odl.spec.events``) against the log's own clock -- ages are judged against
the newest event time seen so far, not the wall clock, so history replays -- and comes out as a
``LogRow``: its 1-based row number, the typed values, or the reason it was refused.

A log need not carry the events' ``version_field`` (it versions the wire format, not history):
an absent one reads as the spec's version; a different one is refused.

CSV cells are text: they are converted by field type (ints, floats, ``true``/``false``/``1``/``0``,
lists split on ``list_separator``); an empty cell is an absent field; a cell that does not
convert is kept as text so that the rules refuse it with the field's own reason.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from odl.spec.events import EventValidator
from odl.spec.model import FeatureSpec, FieldSpec

_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


@dataclass(frozen=True)
class LogRow:
    number: int                       # 1-based data row (the CSV header is not counted)
    values: dict[str, Any] | None     # typed field values of a valid row
    reason: str | None                # why a row was refused
    raw: dict[str, Any] | None = None  # a refused row as read (columns renamed, cells converted)


def _scalar(kind: str, cell: str) -> Any:
    try:
        if kind in ("id", "int"):
            return int(cell)
        if kind == "float":
            return float(cell)
    except ValueError:
        return cell
    if kind == "bool":
        low = cell.strip().lower()
        return True if low in _TRUE else False if low in _FALSE else cell
    return cell


def convert_cell(f: FieldSpec, cell: str | None, list_separator: str = "|") -> Any:
    """A CSV cell as the field's JSON value would be (None for an empty cell)."""
    if cell is None or cell == "":
        return None
    if f.type.startswith("list["):
        return [_scalar(f.type[5:-1], c) for c in cell.split(list_separator) if c != ""]
    if f.type == "object":
        return cell        # refused as bad_<field>: objects do not travel in CSV cells
    return _scalar(f.type, cell)


def event_of(spec: FeatureSpec, raw: dict[str, Any]) -> dict[str, Any]:
    """Field values placed where the spec's rules look for them (nested ``path``s)."""
    ev: dict[str, Any] = {}
    for name, value in raw.items():
        f = spec.events.fields.get(name)
        loc = (f.location if f is not None else ()) or (name,)
        node = ev
        for part in loc[:-1]:
            node = node.setdefault(part, {})
        node[loc[-1]] = value
    return ev


def _records(path: Path, columns: dict[str, str]) -> Iterator[tuple[dict[str, Any], bool]]:
    """(record, is_text) per row, columns renamed to field names."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="") as fh:
            for rec in csv.DictReader(fh):
                yield {columns.get(k, k): v for k, v in rec.items()}, True
    elif suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq
        for batch in pq.ParquetFile(path).iter_batches():
            for rec in batch.to_pylist():
                yield {columns.get(k, k): v for k, v in rec.items()}, False
    else:
        raise ValueError(f"{path}: a log is .csv or .parquet, not {suffix or 'no suffix'!r}")


def log_columns(path: str | Path, columns: dict[str, str] | None = None) -> list[str]:
    """The log's column names after renaming (a CSV's header, a Parquet file's schema)."""
    path, columns = Path(path), columns or {}
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as fh:
            header = next(csv.reader(fh), [])
    else:
        import pyarrow.parquet as pq
        header = pq.ParquetFile(path).schema_arrow.names
    return [columns.get(c, c) for c in header]


def read_log(spec: FeatureSpec, path: str | Path, columns: dict[str, str] | None = None,
             list_separator: str = "|") -> Iterator[LogRow]:
    """Every row of the log, in file order, checked against the spec; columns the spec does not
    declare are left out (``log_columns`` names them)."""
    path, columns = Path(path), columns or {}
    if not path.is_file():
        raise FileNotFoundError(f"log not found: {path}")
    fields = spec.events.fields
    validator = EventValidator(spec.events)
    clock: int | None = None
    time_field = spec.events.time_field
    ev = spec.events
    envelope = {f for f in (ev.type_field, ev.version_field) if f is not None and f not in fields}
    for n, (rec, text) in enumerate(_records(path, columns), start=1):
        # other columns are left out (log_columns names them)
        rec = {k: v for k, v in rec.items() if k in fields or k in envelope}
        if text:
            rec = {k: convert_cell(fields[k], v, list_separator) if k in fields
                   else _scalar("int" if k == ev.version_field else "string", v) if v != "" else None
                   for k, v in rec.items()}
        if ev.version_field is not None and rec.get(ev.version_field) is None:
            rec[ev.version_field] = ev.version          # a log need not carry the wire version
        ts = rec.get(time_field)
        if isinstance(ts, int) and not isinstance(ts, bool):
            clock = ts if clock is None else max(clock, ts)
        reason, values = validator.check(event_of(spec, rec), now_ms=clock if clock is not None else 0)
        yield LogRow(n, values, reason, rec if reason is not None else None)


def to_cell(value: Any, list_separator: str = "|") -> str:
    """A field value as ``convert_cell`` reads it back (None -> an empty cell)."""
    if value is None:
        return ""
    if isinstance(value, list):
        return list_separator.join(str(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def write_log(spec: FeatureSpec, rows: Iterable[dict[str, Any]], path: str | Path,
              list_separator: str = "|") -> int:
    """Rows of flat field values as a CSV log ``read_log`` reads under ``spec`` (one column per
    declared field without a nested ``path``); returns the rows written."""
    cols = [n for n, f in spec.events.fields.items() if not f.path and f.type != "object"]
    n = 0
    with Path(path).open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for row in rows:
            w.writerow([to_cell(row.get(c), list_separator) for c in cols])
            n += 1
    return n
