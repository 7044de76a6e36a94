"""The spec feature job's two Python UDFs: thin adapters from Flink rows to the spec's generated
event rules (``odl.spec.events``) and its real-time values (``odl.spec.realtime``), so neither
rule has a SQL twin.  ``pipeline.spec_sql`` writes the SQL around them.

``SpecParser.row`` parses one event into a flat row (``parsed_fields``): the envelope the SQL
routes on (type, time, id, label, join key), the sample's ``fields`` already as JSON, and one
entity key per declared count and sequence.  ``SpecFeatures.fragment`` turns an impression's
tiles and sequence entries into the ``counts`` / ``sequences`` members of its sample record.
"""
from __future__ import annotations

import json
from typing import Any

from odl.spec import EventValidator, FeatureSpec
from odl.spec.realtime import count_parts, count_values, entity_key, sequence_values
from odl.spec.sample import sample_fields

ID_SEP = ":"        # a join spec's sample id: its join key's values, as the default shape's


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def parsed_fields(spec: FeatureSpec) -> list[tuple[str, str]]:
    """(name, SQL type) of the parse UDF's row; ``c<i>`` keys count i, ``q<i>k``/``q<i>v`` are
    sequence i's key and clicked value."""
    out = [("reason", "STRING"), ("etype", "STRING"), ("ts_ms", "BIGINT"), ("eid", "STRING"),
           ("label", "INT"), ("is_imp", "INT"), ("is_click", "INT"), ("jkey", "STRING"),
           ("sid", "STRING"), ("sid_json", "STRING"), ("fields", "STRING")]
    out += [(f"c{i}", "STRING") for i in range(len(spec.realtime.counts))]
    for i in range(len(spec.realtime.sequences)):
        out += [(f"q{i}k", "STRING"), (f"q{i}v", "STRING")]
    return out


class SpecParser:
    def __init__(self, spec: FeatureSpec):
        self.spec = spec
        self.validator = EventValidator(spec.events)
        self.fields = sample_fields(spec)
        self.counts = [c.key for c in spec.realtime.counts.values()]
        self.sequences = [(s.key, s.value) for s in spec.realtime.sequences.values()]
        lab = spec.label
        self.join = lab.join
        self.width = len(parsed_fields(spec))
        self._blank = ("",) + tuple("" if t == "STRING" else 0
                                    for _, t in parsed_fields(spec)[1:])

    def row(self, payload: str | None, record_ts_ms: int | None) -> tuple:
        """One event as the flat row of ``parsed_fields``; a refused one as its reason and
        blanks (PyFlink's thread mode cannot return NULL inside a ROW).  Ages are judged
        against the record's own timestamp, the stream's clock, so a replayed history passes."""
        s = self.spec
        reason, v = self.validator.parse(payload, record_ts_ms, now_ms=record_ts_ms)
        if v is None:
            return (reason,) + self._blank[1:]
        ts_ms = int(v[s.events.time_field])
        eid = "" if s.events.id_field is None else str(v.get(s.events.id_field) or "")
        if self.join is not None:
            etype = v.get(s.events.type_field) or ""
            parts = [v.get(k) for k in self.join.key]
            sid = "" if None in parts else ID_SEP.join(str(p) for p in parts)
            if not sid:
                return (f"bad_{self.join.key[parts.index(None)]}",) + self._blank[1:]
            label, imp, click = 0, int(etype == self.join.impression), int(etype == self.join.click)
            jkey = sid
        else:
            etype = "row"
            label = int(s.label.positive(v.get(s.label.field)))
            imp, click, jkey = 1, label, ""
            sid = eid
        fields = _dumps({f: v.get(f) for f in self.fields})
        out = [None, etype, ts_ms, eid, label, imp, click, jkey, sid,
               _dumps(sid) if sid else "", fields]
        out += [entity_key(v, key) for key in self.counts]
        for key, value in self.sequences:
            val = v.get(value) if click else None
            out += [entity_key(v, [key]), "" if val is None else str(val)]
        return tuple(out)


class SpecFeatures:
    """An impression's real-time members of its sample record, as JSON text to splice in:
    ``,"counts":{...},"sequences":{...}`` (members with nothing to say left out)."""

    def __init__(self, spec: FeatureSpec):
        self.spec = spec
        self.n_tiles = len(count_parts(spec))
        self.sequences = [(n, s.length) for n, s in spec.realtime.sequences.items()]

    def fragment(self, as_of_ms: int, *parts: str | None) -> str:
        counts = count_values(self.spec, parts[:self.n_tiles], int(as_of_ms))
        seqs = {}
        for (name, length), entries in zip(self.sequences, parts[self.n_tiles:]):
            values = sequence_values(entries, int(as_of_ms), length)
            if values:
                seqs[name] = values
        out = ""
        if counts:
            out += ',"counts":' + _dumps(counts)
        if seqs:
            out += ',"sequences":' + _dumps(seqs)
        return out


def register(t_env, spec: FeatureSpec) -> None:
    """Register ``odl_spec_parse`` and ``odl_spec_features`` on a TableEnvironment."""
    from pyflink.common import Row
    from pyflink.table import DataTypes as T
    from pyflink.table.udf import udf

    sql_types = {"STRING": T.STRING(), "BIGINT": T.BIGINT(), "INT": T.INT()}
    parser, features = SpecParser(spec), SpecFeatures(spec)

    @udf(result_type=T.ROW([T.FIELD(n, sql_types[t]) for n, t in parsed_fields(spec)]))
    def odl_spec_parse(payload, record_ts_ms):
        return Row(*parser.row(payload, record_ts_ms))

    @udf(result_type=T.STRING())
    def odl_spec_features(as_of_ms, *parts):
        return features.fragment(as_of_ms, *parts)

    t_env.create_temporary_function("odl_spec_parse", odl_spec_parse)
    t_env.create_temporary_function("odl_spec_features", odl_spec_features)
