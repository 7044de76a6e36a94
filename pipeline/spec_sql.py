"""The feature job of any feature spec: Flink SQL generated from the spec, writing its sample
records (``odl.spec.sample``) to the samples topic.

Dataflow (Python only in the two UDFs of ``pipeline.spec_udfs``; with ``feature_job.sql_parse``
events that SQL proves valid skip the parse UDF, ``pipeline.spec_parse_sql``)::

    events_raw ─ parse, check ───┬─ refused, late ──────────────────────────────────► events.dlq
                                 └─ valid ─ [dedup by events.id_field] ─┬─ duplicates ► events.dlq
                                                                        └─ events
    events ─ HOP tiles per (count, window), keyed by the count's key, ┐
             each version the newest two tiles                      │
           ─ each sequence key's last clicks (ROWS window) ───────────┴─ one versioned view
                                                                        per count / sequence
    impressions ─ a temporal join per count and sequence AS OF impression time
                ─ odl_spec_features ─ featured ─┬─ label field: the row's own label ─► samples
                                                └─ join: interval LEFT JOIN clicks ──► samples
    clicks ─ interval LEFT JOIN impressions (± window) ─ unattributed ─────────────► events.dlq

Semantics are ``odl eval --spec``'s (``trainers.evaluation.spec_log``), so a model trained on
the stream reads the inputs it was evaluated on: a count's window ends at the newest ``tile_s``
boundary at or before the impression (``odl.spec.realtime``); an impression counts at its time,
a click at its own (a labelled row is both, at its time); a sequence holds clicks strictly
before the impression.  A join spec's label is its default-shape twin's (``pipeline.feature_sql``):
a click of the same join key after the impression and within the attribution window.  Every
event leaves counted: a sample, or the DLQ with its reason.

A sample's id is the join key's values (``a:b``) for a join spec, else the event's
``id_field``, else its source ``<partition>-<offset>`` (a replayed log row: stable per record).

Every new tile and click list of an entity also goes to the ``features`` topic, which
``pipeline.feature_store_writer`` materialises into the online store for serving
(``odl.spec.realtime.store_parts``: kinds ``count.<name>`` and ``seq.<name>``).
"""
from __future__ import annotations

from odl.config import Config
from odl.spec import FeatureSpec
from odl.spec.realtime import SEQUENCE_PART, count_kind, count_parts, sequence_kind
from pipeline.feature_sql import (JobTopics, carried_state_views, dlq_sink_ddl, epoch_ms,
                                  features_sink_ddl, interval, kafka_opts, latest_view,
                                  ltz_epoch_ms, source_ddl, tile_history_view)
from pipeline.spec_parse_sql import checked_views
from pipeline.spec_udfs import parsed_fields

# HOP windows of size/slide tiles: each event touches one slice, but every window of an active
# key is emitted; past this many tiles per window the job's output dwarfs its input
MAX_TILES_PER_WINDOW = 1440


class SpecJobError(ValueError):
    """A spec the stream job cannot run as declared; the message names the entry."""


def check_streamable(spec: FeatureSpec) -> None:
    rt = spec.realtime
    for name, seconds in rt.windows.items():
        if seconds // rt.tile_s > MAX_TILES_PER_WINDOW:
            raise SpecJobError(
                f"spec {spec.name}: realtime.windows.{name} is {seconds // rt.tile_s} tiles of "
                f"{rt.tile_s} s; the stream job keeps at most {MAX_TILES_PER_WINDOW} a window "
                f"(raise realtime.tile_s to at least {-(-seconds // MAX_TILES_PER_WINDOW)})")


def _sinks(cfg: Config, topics: JobTopics) -> list[str]:
    return [
        # the record is the whole value, written as the spec's JSON text; the key is the
        # sample id (the trainer's duplicate window and ledger key on it)
        f"""CREATE TABLE samples_sink (sample_id STRING, record STRING)
            WITH ({kafka_opts(cfg, topics.samples)},
              'key.format' = 'raw', 'key.fields' = 'sample_id',
              'value.format' = 'raw', 'value.fields-include' = 'EXCEPT_KEY',
              'sink.delivery-guarantee' = 'at-least-once')""",
        # the online store's updates (pipeline.feature_store_writer): one per new tile or click
        # list of an entity
        features_sink_ddl(cfg, topics, "STRING"),
        dlq_sink_ddl(cfg, topics),
    ]


def _record(i: str, label: str, provisional: bool) -> str:
    """The sample record's JSON text (``odl.spec.sample``) from a ``featured`` row ``i``."""
    prov = ',"provisional":true' if provisional else ""
    return (f"""CONCAT('{{"sample_id":', {i}.sid_json, ',"ts_ms":', CAST({i}.ts_ms AS STRING),
                       ',"label":', CAST({label} AS STRING), '{prov}', ',"fields":', {i}.fields,
                       {i}.feats, '}}')""")


def _store_update(kind: str, part: str, view: str, version: str, value: str) -> str:
    return f"""INSERT INTO features_sink
               SELECT CONCAT('{kind}:', entity_id), '{kind}', entity_id, '{part}', {version},
                      {value}
               FROM {view}"""


def spec_statements(cfg: Config, spec: FeatureSpec,
                    topics: JobTopics) -> tuple[list[str], list[str]]:
    """(DDL, INSERTs) of the spec's job; split out so tests can check the SQL without a cluster."""
    check_streamable(spec)
    fj, rt = cfg.feature_job, spec.realtime
    cols = [n for n, _ in parsed_fields(spec) if n != "reason"]
    counts, seqs = list(rt.counts.values()), list(rt.sequences.values())
    ddl = [source_ddl(cfg, topics.events, fj.group_id), *_sinks(cfg, topics),
           *checked_views(spec, ltz_epoch_ms("ts"), sql=fj.sql_parse),
           f"""CREATE TEMPORARY VIEW valid AS
              SELECT {", ".join(cols)}, payload, `partition`, `offset`, ts, pt
              FROM checked WHERE reason IS NULL AND late IS NOT TRUE"""]
    if spec.events.id_field is not None:
        # the first of an event id to arrive counts (processing-time order: pipeline.feature_sql)
        ddl += ["""CREATE TEMPORARY VIEW numbered AS
                   SELECT *, COUNT(*) OVER (PARTITION BY eid ORDER BY pt
                                            ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS seen
                   FROM valid""",
                "CREATE TEMPORARY VIEW events AS SELECT * FROM numbered WHERE seen = 1"]
    else:
        ddl.append("CREATE TEMPORARY VIEW events AS SELECT * FROM valid")
    # a row without an id of its own is known by its source record
    own = "CONCAT(CAST(`partition` AS STRING), '-', CAST(`offset` AS STRING))"
    ddl += [f"""CREATE TEMPORARY VIEW imps AS
               SELECT ts_ms, ts, label, jkey, CASE WHEN sid = '' THEN {own} ELSE sid END AS sid,
                      CASE WHEN sid = '' THEN CONCAT('"', {own}, '"') ELSE sid_json END AS sid_json,
                      fields,
                      {", ".join([f"c{i}" for i in range(len(counts))]
                                 + [f"q{i}k" for i in range(len(seqs))]) or "1 AS unused"}
               FROM events WHERE is_imp = 1""",
            "CREATE TEMPORARY VIEW clicks AS SELECT * FROM events WHERE is_click = 1"]
    # counts: one HOP tile stream per (count, window), one carried state per count
    tile_ms = rt.tile_s * 1000
    parts = count_parts(spec)
    for i, (cname, c) in enumerate(rt.counts.items()):
        updates = []
        for w in c.windows:
            view = f"tiles_c{i}_{w}"
            ddl.append(f"""CREATE TEMPORARY VIEW {view} AS
                SELECT c{i} AS entity_id, window_time, {epoch_ms('window_end')} AS end_ms,
                       CONCAT(CAST({epoch_ms('window_end')} AS STRING), '|',
                              CAST(SUM(is_imp) AS STRING), '|', CAST(SUM(is_click) AS STRING))
                         AS tile
                FROM TABLE(HOP(TABLE events, DESCRIPTOR(ts), {interval(tile_ms)},
                               {interval(rt.windows[w] * 1000)}))
                WHERE c{i} <> ''
                GROUP BY c{i}, window_start, window_end, window_time""")
            ddl.append(tile_history_view(f"{view}_history", view, "tile"))
            updates.append((f"w_{w}", f"{view}_history", "window_time", "tiles"))
        ddl += carried_state_views(f"count{i}", updates)
    # sequences: a key's last clicks, one more than kept (the impression's own click, a
    # labelled row's, is left out by its time)
    for i, s in enumerate(seqs):
        ddl.append(f"""CREATE TEMPORARY VIEW seq{i} AS
            SELECT q{i}k AS entity_id, ts, ts_ms,
                   LISTAGG(CONCAT(CAST(ts_ms AS STRING), ':', q{i}v), ' ') OVER (
                     PARTITION BY q{i}k ORDER BY ts ROWS BETWEEN {s.length} PRECEDING AND CURRENT ROW)
                     AS entries
            FROM clicks WHERE q{i}k <> '' AND q{i}v <> ''""")
        ddl.append(latest_view(f"latest_seq{i}", f"seq{i}", "ts"))
    args = [f"COALESCE(s{i}.w_{w}, '')" for i, (cname, c) in enumerate(rt.counts.items())
            for w in c.windows]
    assert len(args) == len(parts)
    args += [f"COALESCE(q{i}.entries, '')" for i in range(len(seqs))]
    joins = [f"""LEFT JOIN latest_count{i} FOR SYSTEM_TIME AS OF i.ts AS s{i}
                   ON i.c{i} = s{i}.entity_id""" for i in range(len(counts))]
    joins += [f"""LEFT JOIN latest_seq{i} FOR SYSTEM_TIME AS OF i.ts AS q{i}
                    ON i.q{i}k = q{i}.entity_id""" for i in range(len(seqs))]
    feats = f"odl_spec_features(i.ts_ms, {', '.join(args)})" if args else "''"
    ddl.append(f"""CREATE TEMPORARY VIEW featured AS
        SELECT i.ts_ms, i.ts, i.label, i.jkey, i.sid, i.sid_json, i.fields, {feats} AS feats
        FROM imps AS i {" ".join(joins)}""")

    dlq_cols = "payload, `partition`, `offset`, UNIX_TIMESTAMP() * 1000"
    inserts = [_store_update(count_kind(cname), w, f"tiles_c{i}_{w}", "end_ms", "tile")
               for i, (cname, c) in enumerate(rt.counts.items()) for w in c.windows]
    inserts += [_store_update(sequence_kind(sname), SEQUENCE_PART, f"seq{i}", "ts_ms", "entries")
                for i, sname in enumerate(rt.sequences)]
    inserts += [f"""INSERT INTO dlq_sink
                   SELECT COALESCE(reason, 'late_event'), {dlq_cols} FROM checked
                   WHERE reason IS NOT NULL OR late IS TRUE"""]
    if spec.events.id_field is not None:
        inserts.append(f"INSERT INTO dlq_sink SELECT 'duplicate_event', {dlq_cols} "
                       "FROM numbered WHERE seen > 1")
    key = "i.sid"
    if spec.label.join is None:
        inserts.append(f"INSERT INTO samples_sink SELECT {key}, {_record('i', 'i.label', False)} "
                       "FROM featured i")
        return ddl, inserts
    win = interval(spec.label.join.attribution_window_s * 1000)
    inserts += [
        f"""INSERT INTO samples_sink
            SELECT {key}, {_record('i', "CASE WHEN c.jkey IS NULL THEN 0 ELSE 1 END", False)}
            FROM featured i LEFT JOIN clicks c
              ON i.jkey = c.jkey AND c.ts > i.ts AND c.ts <= i.ts + {win}""",
        f"""INSERT INTO dlq_sink
            SELECT CASE WHEN i.jkey IS NULL THEN 'click_unattributed'
                        ELSE 'click_before_impression' END,
                   c.payload, c.`partition`, c.`offset`, UNIX_TIMESTAMP() * 1000
            FROM clicks c LEFT JOIN imps i
              ON c.jkey = i.jkey AND i.ts BETWEEN c.ts - {win} AND c.ts + {win}
            WHERE i.jkey IS NULL OR i.ts >= c.ts"""]
    if cfg.delayed_feedback:
        inserts.append(f"INSERT INTO samples_sink SELECT {key}, {_record('i', '0', True)} "
                       "FROM featured i")
    return ddl, inserts

