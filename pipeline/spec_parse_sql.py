"""The spec job's parse stage in SQL: events the JVM can prove valid never reach Python.

``odl.spec.events.EventValidator`` is the one authority on what an event means (serving and log
replay run it too).  This module generates, from the same spec, a *sufficient* test in Flink
SQL: an event passes only if the Python validator would accept it with the same typed values,
and then the SQL computes the row ``pipeline.spec_udfs.parsed_fields`` describes itself.
Everything else -- refused events, which need the validator's reason for the DLQ, and any
event the SQL cannot judge for certain -- goes through the ``odl_spec_parse`` UDF as before::

    events_raw ─ JSON_VALUE per field, once (fenced) ─ proven valid? ─ yes ─ SQL row ──┐
                                                                     └ no ─ Python row ─┴ checked

Why "sufficient" is enough: a proven-valid event gets exactly the UDF's row, so the split only
decides where the work is done, never what comes out (``tests/integration/test_spec_parse_sql``
checks this on fuzzed payloads).  It must never prove an event the validator would refuse; the
traps it avoids, each by sending the event to Python:

* ``JSON_VALUE`` gives the text of any scalar, so ``"7"`` and ``7`` look alike: a regex over the
  payload sends any numeric or bool field written as a string, list or object to Python; a
  string field is proven a string by ``JSON_QUERY ... WITH CONDITIONAL ARRAY WRAPPER``;
* ``CAST('3.0' AS BIGINT)`` is 3 in Flink, but 3.0 is not an int to Python: an int must print
  back to the exact text it came from;
* Jackson reads the first JSON value of ``{..} {..}`` and ignores the rest, Python refuses it:
  the payload must end with ``}`` and hold no ``}{``; a backslash (an escaped key could hide a
  field from the regex) sends it to Python too.

Only what SQL states exactly is generated; ``sql_parse_gap(spec)`` names the first thing it
cannot state (a list field, a hashed string, a nested path, a float or bool used as a key...),
and such a spec parses every event in Python, as ``odl spec check`` reports.

The extracts are *fenced* (``CASE WHEN RAND() < 2 THEN ... END``): a non-deterministic
projection is one the planner neither merges into its consumers nor duplicates, so each
``JSON_VALUE`` runs once per event instead of once per reference (measured: docs/features.md).
"""
from __future__ import annotations

import re

from odl.spec import FeatureSpec
from odl.spec.model import FieldSpec
from odl.spec.realtime import ENTITY_SEP
from odl.spec.sample import sample_fields
from pipeline.feature_sql import source_rows
from pipeline.spec_udfs import ID_SEP, parsed_fields

INT_TYPES = ("id", "int")
SQL_TYPES = (*INT_TYPES, "float", "bool", "string")
KEY_TYPES = (*INT_TYPES, "string")          # str() of these is the SQL CAST's text
_FINITE = "1.7976931348623157E308"
_JSON_LITERAL = re.compile(r"-?\d|true$|false$|null$")


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _fenced(expr: str, name: str) -> str:
    """``expr AS name``, computed once per event however often it is referenced (see above)."""
    return f"CASE WHEN RAND() < 2 THEN {expr} END AS {name}"


def sql_parse_gap(spec: FeatureSpec) -> str | None:
    """Why this spec's events cannot be proven valid in SQL (the first reason), or None."""
    ev, lab = spec.events, spec.label
    for name, f in ev.fields.items():
        if f.type not in SQL_TYPES:
            return f"events.fields.{name} is {f.type}"
        if f.location and f.location != (name,):
            return f"events.fields.{name} has a nested path"
        if f.type == "string" and f.hashed is not None:
            return f"events.fields.{name} is a hashed string"
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            return f"events.fields.{name}: a name the payload regex does not quote"
    if ev.fields[ev.time_field].required is not True:
        return f"events.time_field {ev.time_field} is optional"
    for t in ev.types:
        if _JSON_LITERAL.match(t):
            return f"events.types {t!r} reads as a JSON literal"
    if ev.version_field is not None and ev.version_field in ev.fields:
        return f"events.version_field {ev.version_field} is also a declared field"
    keys = [ev.id_field] if ev.id_field else []
    keys += lab.join.key if lab.join else []
    for c in spec.realtime.counts.values():
        keys += c.key
    for s in spec.realtime.sequences.values():
        keys += [s.key, s.value]
    for k in keys:
        if ev.fields[k].type not in KEY_TYPES:
            return f"{k} keys an id or entity but is {ev.fields[k].type}"
    if lab.field is not None and ev.fields[lab.field].type == "string":
        return f"label.field {lab.field} is a string"
    if lab.field is not None and ev.fields[lab.field].type == "bool" and lab.threshold is not None:
        return f"label.field {lab.field} is a bool with a threshold"
    return None


class _Field:
    """One field's SQL: its fenced extract(s), typed value and 'proven valid' condition."""

    def __init__(self, name: str, f: FieldSpec):
        self.name, self.f = name, f
        self.raw, self.wrapped = f"j_{name}", f"w_{name}"

    def extracts(self) -> list[str]:
        out = [_fenced(f"JSON_VALUE(payload, '$.{self.name}')", self.raw)]
        if self.f.type == "string":
            out.append(_fenced(f"JSON_QUERY(payload, '$.{self.name}' WITH CONDITIONAL ARRAY "
                               "WRAPPER)", self.wrapped))
        return out

    def value(self) -> str:
        """The typed value the validator returns (folded as the spec says); NULL if absent."""
        f, j = self.f, self.raw
        if f.type in INT_TYPES:
            v = f"TRY_CAST({j} AS BIGINT)"
            fold = f.modulo or f.hashed
            return v if fold is None else f"MOD(MOD({v}, {fold}) + {fold}, {fold})"
        if f.type == "float":
            return f"TRY_CAST({j} AS DOUBLE)"
        if f.type == "bool":
            return f"CASE {j} WHEN 'true' THEN TRUE WHEN 'false' THEN FALSE END"
        return j

    def valid(self, required: str) -> str:
        """Proven valid: present and right, or absent where ``required`` is false."""
        f, j = self.f, self.raw
        lo, hi = f.bounds
        if f.type in INT_TYPES:
            t = f"TRY_CAST({j} AS BIGINT)"
            ok = [f"CAST({t} AS STRING) = {j}"]
            ok += [f"{t} >= {lo!r}"] if lo is not None else []
            ok += [f"{t} <= {hi!r}"] if hi is not None else []
        elif f.type == "float":
            # Python keeps an integer literal an int: the double must hold it exactly
            t = f"TRY_CAST({j} AS DOUBLE)"
            ok = [f"{t} >= {lo!r}" if lo is not None else f"{t} > -{_FINITE}",
                  f"{t} <= {hi!r}" if hi is not None else f"{t} < {_FINITE}",
                  f"(REGEXP({j}, '[.eE]') OR ABS({t}) <= {2**53})"]
        elif f.type == "bool":
            ok = [f"{j} IN ('true', 'false')"]
        else:
            ok = [f"{self.wrapped} LIKE '[\"%'"]
            ok += [f"{j} <> ''"] if f.non_empty else []
            ok += [f"CHAR_LENGTH({j}) <= {f.max_len}"] if f.max_len is not None else []
        present = " AND ".join(ok)
        # JSON_VALUE of a list or object is NULL too; JSON_QUERY tells it from an absent field
        absent = f"{self.wrapped} IS NULL" if f.type == "string" else f"{j} IS NULL"
        return f"({j} IS NOT NULL AND {present} OR {absent} AND NOT ({required}))"

    def text(self) -> str:
        """``str(value)`` in Python, for key types only."""
        return self.value() if self.f.type == "string" else f"CAST({self.value()} AS STRING)"


_WS = r"[ \t\n\r]*"                      # JSON's whitespace (Java's \s is wider)
_WHOLE_OBJECT = rf"^{_WS}\{{[\s\S]*\}}{_WS}$"


def _count_closing(col: str) -> str:
    return f"CHAR_LENGTH({col}) - CHAR_LENGTH(REPLACE({col}, '}}', ''))"


def _guard(spec: FeatureSpec) -> str:
    """A regex that sends to Python every payload the SQL cannot read for certain."""
    numeric = [n for n, f in spec.events.fields.items() if f.type in (*INT_TYPES, "float")]
    bools = [n for n, f in spec.events.fields.items() if f.type == "bool"]
    alts = [r"\\"]
    if spec.events.version_field is not None:
        numeric.append(spec.events.version_field)
    if numeric:
        alts.append(rf'"({"|".join(numeric)})"{_WS}:{_WS}["\[{{tf]')
    if bools:
        alts.append(rf'"({"|".join(bools)})"{_WS}:{_WS}["\[{{0-9-]')
    return "|".join(alts)


def checked_views(spec: FeatureSpec, record_ms: str, sql: bool = True) -> list[str]:
    """DDL of ``checked``: one flat row per event, the columns of ``parsed_fields`` plus
    ``payload, partition, offset, ts, pt, late``; ``record_ms`` is the record time in epoch ms.
    ``sql`` false (``feature_job.sql_parse``), or a spec with a ``sql_parse_gap``: every event
    through the Python UDF."""
    cols = [n for n, _ in parsed_fields(spec)]
    meta = "payload, `partition`, `offset`, ts, pt, late"
    python = [f"""CREATE TEMPORARY VIEW py_parsed AS
                  SELECT odl_spec_parse(payload, {record_ms}) AS e, {meta} FROM {{src}}""",
              f"""CREATE TEMPORARY VIEW py_checked AS
                  SELECT {", ".join(f"e.{c} AS {c}" for c in cols)}, {meta} FROM py_parsed"""]
    base = """SELECT payload, `partition`, `offset`, ts, pt,
                     ts <= CURRENT_WATERMARK(ts) AS late{extra}
              FROM """ + source_rows()
    if not sql or sql_parse_gap(spec) is not None:
        return [f"CREATE TEMPORARY VIEW parse_in AS {base.format(extra='')}",
                *(s.format(src="parse_in") for s in python),
                "CREATE TEMPORARY VIEW checked AS SELECT * FROM py_checked"]
    ev, lab = spec.events, spec.label
    fields = {n: _Field(n, f) for n, f in ev.fields.items()}
    extracts = [x for fl in fields.values() for x in fl.extracts()]
    if ev.type_field:
        extracts.append(_fenced(f"JSON_VALUE(payload, '$.{ev.type_field}')", "j_type"))
    if ev.version_field:
        extracts.append(_fenced(f"JSON_VALUE(payload, '$.{ev.version_field}')", "j_version"))
    extracts += [_fenced(f"REGEXP(payload, {_lit(_guard(spec))}) OR NOT REGEXP(payload, "
                         f"{_lit(_WHOLE_OBJECT)})", "guarded"),
                 _fenced("JSON_QUERY(payload, '$')", "j_doc")]
    etype = "j_type" if ev.type_field else "CAST(NULL AS STRING)"

    def required(f: FieldSpec) -> str:
        if isinstance(f.required, bool):
            return "TRUE" if f.required else "FALSE"
        return f"COALESCE({etype} IN ({', '.join(map(_lit, f.required))}), FALSE)" \
            if f.required else "FALSE"

    # Jackson stops after the first value: a payload with more after it (which must end with
    # a brace, see _WHOLE_OBJECT) has more closing braces than the value Jackson read
    proven = ["guarded IS FALSE", "j_doc IS NOT NULL",
              f"{_count_closing('j_doc')} = {_count_closing('payload')}"]
    if ev.type_field:
        proven.append(f"j_type IN ({', '.join(map(_lit, ev.types))})")
    if ev.version_field:
        proven.append(f"j_version = {_lit(str(ev.version))}" if ev.version is not None
                      else "j_version IS NULL")
    proven += [fl.valid(required(fl.f)) for fl in fields.values()]

    def key(names: list[str]) -> str:
        """``odl.spec.realtime.entity_key``: the parts joined, '' if any is absent."""
        absent = " OR ".join(f"{fields[n].raw} IS NULL" for n in names)
        joined = f"CONCAT_WS({_lit(ENTITY_SEP)}, {', '.join(fields[n].text() for n in names)})"
        return f"CASE WHEN {absent} THEN '' ELSE {joined} END"

    if ev.id_field is None:
        eid = "''"
    else:
        idf = fields[ev.id_field]
        falsy = "''" if idf.f.type == "string" else "0"
        eid = f"CASE WHEN {idf.value()} IS NULL OR {idf.value()} = {falsy} THEN '' ELSE {idf.text()} END"
    if lab.join is not None:
        j = lab.join
        proven += [f"{fields[k].raw} IS NOT NULL" for k in j.key]     # else Python's bad_<key>
        sid = f"CONCAT_WS({_lit(ID_SEP)}, {', '.join(fields[k].text() for k in j.key)})"
        label, is_imp = "0", f"CASE WHEN {etype} = {_lit(j.impression)} THEN 1 ELSE 0 END"
        is_click = f"CASE WHEN {etype} = {_lit(j.click)} THEN 1 ELSE 0 END"
        out_etype, jkey = f"COALESCE({etype}, '')", sid
    else:
        lv = fields[lab.field]
        if lv.f.type == "bool":
            pos = f"{lv.value()} IS TRUE"
        elif lab.threshold is not None:
            pos = f"{lv.value()} >= {lab.threshold!r}"
        else:
            pos = f"{lv.value()} > 0"
        label = f"CASE WHEN {pos} THEN 1 ELSE 0 END"
        is_imp, is_click, out_etype, jkey, sid = "1", label, "'row'", "''", eid
    names = sample_fields(spec)
    record = ("JSON_OBJECT(" + ", ".join(f"KEY {_lit(n)} VALUE {fields[n].value()}" for n in names)
              + ")") if names else "'{}'"
    row = {"reason": "CAST(NULL AS STRING)", "etype": out_etype, "ts_ms": f"CAST({fields[ev.time_field].value()} AS BIGINT)",
           "eid": eid, "label": label, "is_imp": is_imp, "is_click": is_click, "jkey": jkey,
           "sid": sid, "sid_json": f"CASE WHEN {sid} = '' THEN '' ELSE JSON_STRING({sid}) END",
           "fields": record}
    for i, c in enumerate(spec.realtime.counts.values()):
        row[f"c{i}"] = key(c.key)
    for i, s in enumerate(spec.realtime.sequences.values()):
        row[f"q{i}k"] = key([s.key])
        val = fields[s.value]
        row[f"q{i}v"] = f"CASE WHEN {is_click} = 1 AND {val.raw} IS NOT NULL THEN {val.text()} ELSE '' END"
    assert list(row) == cols, (list(row), cols)
    sql_row = ", ".join(f"CAST({expr} AS {t}) AS {c}"
                        for (c, t), expr in zip(parsed_fields(spec), row.values()))
    return [f"CREATE TEMPORARY VIEW parse_in AS {base.format(extra=', ' + ', '.join(extracts))}",
            f"CREATE TEMPORARY VIEW parse_judged AS SELECT *, ({' AND '.join(proven)}) IS TRUE AS proven "
            "FROM parse_in",
            f"CREATE TEMPORARY VIEW sql_checked AS SELECT {sql_row}, {meta} FROM parse_judged WHERE proven",
            "CREATE TEMPORARY VIEW parse_unproven AS SELECT * FROM parse_judged WHERE NOT proven",
            *(s.format(src="parse_unproven") for s in python),
            "CREATE TEMPORARY VIEW checked AS SELECT * FROM sql_checked UNION ALL "
            "SELECT * FROM py_checked"]
