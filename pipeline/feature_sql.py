"""The feature job's Flink SQL, generated from config and the feature definition.

Dataflow (every arrow is Flink SQL; the two Python UDFs only parse events and evaluate features):

    events_raw ─ odl_parse ─┬─ rejects, late events ───────────────────────────────► events.dlq
                            └─ valid ─ dedup by event_id ─┬─ duplicates ─────────────► events.dlq
                                                          └─ events
    events ─ HOP tiles (user 5 min, user 1 h, item 1 h) ─┬───────────────────────────► features
           ─ user's last N clicks (ROWS window) ─────────┤
                                                         └─ versioned views: the user's parts
                                                            merged into one, the item's tiles
    impressions ─ 2 temporal joins AS OF impression time ─ odl_features ─┐
    clicks ─────────────────────────────── interval LEFT JOIN ─────────┴────────────► samples
    clicks ─ interval LEFT JOIN impressions (± window) ─ unattributed ────────────────► events.dlq

Semantics: a click is attributed to the impression of the same request and item when its event
time is after the impression's and at most the attribution window later.  The positive sample
leaves as soon as the click arrives; the negative when the watermark passes the window's end.
With ``trainer.delayed_feedback`` every impression also leaves at once as a provisional negative
(``provisional: true``, same ``sample_id``), for the trainer's fake-negative training.
Clicks without such an impression go to the DLQ as ``click_before_impression`` (an impression of
that request and item exists but is not earlier) or ``click_unattributed`` (none within the window
either side: too late, or never shown).  Events behind the watermark are ``late_event`` and a
repeated ``event_id`` is a ``duplicate_event``: nothing leaves the job without being counted.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from odl import features as F
from odl.config import Config
from pipeline.watermark_ticks import TICK


@dataclass(frozen=True)
class JobTopics:
    events: str
    samples: str
    dlq: str
    features: str


def kafka_opts(cfg: Config, topic: str) -> str:
    return (f"'connector' = 'kafka', 'topic' = '{topic}', "
            f"'properties.bootstrap.servers' = '{cfg.kafka.bootstrap_servers}'")


def interval(ms: int) -> str:
    """A millisecond-exact interval literal (a plain SECOND literal stops at 99 s in Flink)."""
    s, frac = divmod(int(ms), 1000)
    m, s = divmod(s, 60)
    h, m = divmod(m, 60)
    d, h = divmod(h, 24)
    return f"INTERVAL '{d} {h:02}:{m:02}:{s:02}.{frac:03}' DAY TO SECOND(3)"


def epoch_ms(ts: str) -> str:
    """A window bound (TIMESTAMP(3), UTC wall time, whole seconds) as epoch milliseconds."""
    return f"CAST(TIMESTAMPDIFF(SECOND, TIMESTAMP '1970-01-01 00:00:00', {ts}) AS BIGINT) * 1000"


def ltz_epoch_ms(ts: str) -> str:
    """A TIMESTAMP_LTZ(3) as epoch milliseconds (the session time zone is UTC).  Handing the UDF
    a number instead of the timestamp saves PyFlink a datetime per event: the parse stage
    alone ran 13.7k -> 17.6k events/s."""
    return (f"({epoch_ms(f'CAST({ts} AS TIMESTAMP(3))')} "
            f"+ EXTRACT(MILLISECOND FROM {ts}))")


def source_rows() -> str:
    """The source's rows that are events, for a FROM clause: watermark ticks
    (``pipeline.watermark_ticks``) have moved the watermark at the source and go no further."""
    return f"events_raw WHERE payload <> '{TICK}'"


def source_ddl(cfg: Config, topic: str, group_id: str, table: str = "events_raw") -> str:
    """The events source: raw payloads, event time from the Kafka record timestamp."""
    return f"""CREATE TABLE {table} (
              payload STRING,
              `partition` INT METADATA VIRTUAL,
              `offset` BIGINT METADATA VIRTUAL,
              ts TIMESTAMP_LTZ(3) METADATA FROM 'timestamp',
              pt AS PROCTIME(),
              WATERMARK FOR ts AS ts - {interval(cfg.feature_job.watermark_delay_ms)}
            ) WITH ({kafka_opts(cfg, topic)},
              'properties.group.id' = '{group_id}',
              'scan.startup.mode' = 'group-offsets',
              'properties.auto.offset.reset' = 'earliest',
              'format' = 'raw')"""


FEATURES_TYPE = ("ROW<`user` ROW<imps_5m INT, clicks_5m INT, imps_1h INT, clicks_1h INT, "
                 "last_items ARRAY<BIGINT>, last_categories ARRAY<INT>>, "
                 "item ROW<imps_1h INT, clicks_1h INT, ctr_1h DOUBLE>>")


def dlq_sink_ddl(cfg: Config, topics: JobTopics) -> str:
    """The DLQ's record: why, the raw payload and where it came from (every job writes it)."""
    return f"""CREATE TABLE dlq_sink (
              reason STRING, payload STRING, source_partition INT, source_offset BIGINT, ts_ms BIGINT
            ) WITH ({kafka_opts(cfg, topics.dlq)},
              'format' = 'json', 'sink.delivery-guarantee' = 'at-least-once')"""


def features_sink_ddl(cfg: Config, topics: JobTopics, entity_id_type: str) -> str:
    """The online store's updates (``odl.feature_store.FeatureUpdate``), keyed ``kind:id`` so
    one entity's updates stay in order on one partition; ids are BIGINT (users, items) or a
    spec's STRING entity keys."""
    return f"""CREATE TABLE features_sink (
              entity STRING, kind STRING, entity_id {entity_id_type}, part STRING,
              version_ms BIGINT, `value` STRING
            ) WITH ({kafka_opts(cfg, topics.features)},
              'key.format' = 'raw', 'key.fields' = 'entity',
              'value.format' = 'json', 'value.fields-include' = 'ALL',
              'sink.delivery-guarantee' = 'at-least-once')"""


def _sinks(cfg: Config, topics: JobTopics) -> list[str]:
    return [
        f"""CREATE TABLE samples_sink (
              sample_id STRING, request_id STRING, user_id BIGINT, item_id BIGINT,
              `position` INT, `hour` INT, category INT, label INT,
              impression_ts_ms BIGINT, label_ts_ms BIGINT, features {FEATURES_TYPE},
              provisional BOOLEAN
            ) WITH ({kafka_opts(cfg, topics.samples)},
              'key.format' = 'raw', 'key.fields' = 'sample_id',
              'value.format' = 'json', 'value.fields-include' = 'ALL',
              'sink.delivery-guarantee' = 'at-least-once')""",
        dlq_sink_ddl(cfg, topics),
        # one record per state change of an entity; key = kind:id keeps an entity's updates
        # in order on one partition for the writer that materialises them into Redis
        features_sink_ddl(cfg, topics, "BIGINT"),
    ]


def tiles_view(name: str, key: str, window_s: int) -> str:
    return f"""CREATE TEMPORARY VIEW {name} AS
        SELECT {key} AS entity_id, {epoch_ms('window_end')} AS end_ms, window_time,
               CAST(SUM(CASE WHEN etype = 'impression' THEN 1 ELSE 0 END) AS INT) AS imps,
               CAST(SUM(CASE WHEN etype = 'click' THEN 1 ELSE 0 END) AS INT) AS clicks
        FROM TABLE(HOP(TABLE events, DESCRIPTOR(ts), {interval(F.TILE_SLIDE_S * 1000)},
                       {interval(window_s * 1000)}))
        GROUP BY {key}, window_start, window_end, window_time"""


def tile_history_view(name: str, source: str, tile: str) -> str:
    """``source``'s tiles as the job's temporal joins must see them: each version holds the
    entity's newest ``TILE_HISTORY`` tiles (``odl.features.tile_at`` picks the one in force).
    A version's time is its tile's last millisecond, so an impression on that millisecond finds
    the tile that contains it and needs the one before; ``tile``: the tile's encoding in terms
    of ``source``'s columns."""
    return f"""CREATE TEMPORARY VIEW {name} AS
        SELECT entity_id, window_time,
               LISTAGG({tile}, ' ') OVER (PARTITION BY entity_id ORDER BY window_time
                                          ROWS BETWEEN {F.TILE_HISTORY - 1} PRECEDING AND CURRENT ROW)
                 AS tiles
        FROM {source}"""


def latest_view(name: str, source: str, time_col: str) -> str:
    """A versioned view (newest row per entity) for event-time temporal joins."""
    return f"""CREATE TEMPORARY VIEW {name} AS
        SELECT * FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY entity_id ORDER BY {time_col} DESC)
                       AS rn FROM {source}) WHERE rn = 1"""


# (view, entity kind, window, the part name in the feature store); the kind's id column is
# ``<kind>_id``
TILES = (("user_tiles_5m", "user", F.USER_WINDOWS_S[0], "t5m"),
         ("user_tiles_1h", "user", F.USER_WINDOWS_S[1], "t1h"),
         ("item_tiles_1h", "item", F.ITEM_WINDOW_S, "t1h"))
USER_PARTS = ("t5m", "t1h", "clicks")   # a user's state: its two tiles and its last clicks


def carried_state_views(name: str, updates: list[tuple[str, str, str, str]]) -> list[str]:
    """One versioned view ``latest_<name>`` of an entity's whole state, so a temporal join
    fetches every part at once instead of one join per part (each join shuffles every
    impression and keeps its own versions): the parts' update streams are merged, and an
    event-time OVER carries each part's newest value forward.  ``updates``: (part, source view
    with ``entity_id``, its time column, the part's value expression)."""
    parts = [p for p, *_ in updates]
    if len(updates) == 1:
        # one part: each update is the whole state, no value to carry forward (and no event-time
        # OVER, which holds every row until the watermark passes it)
        (part, src, t, value), = updates
        return [f"""CREATE TEMPORARY VIEW {name} AS
                  SELECT entity_id, {t} AS vt, {value} AS {part} FROM {src}""",
                latest_view(f"latest_{name}", name, "vt")]

    def row(name: str, value: str) -> str:
        return ", ".join(value if p == name else "CAST(NULL AS STRING)" for p in parts)
    merged = " UNION ALL ".join(f"SELECT entity_id, {t} AS vt, {row(p, value)} FROM {src}"
                                for p, src, t, value in updates)
    carried = ", ".join(f"LAST_VALUE({p}) OVER w AS {p}" for p in parts)
    return [f"CREATE TEMPORARY VIEW {name}_updates (entity_id, vt, {', '.join(parts)}) AS {merged}",
            # LAST_VALUE skips NULLs: each row holds every part's newest value as of vt
            f"""CREATE TEMPORARY VIEW {name} AS
              SELECT entity_id, vt, {carried} FROM {name}_updates
              WINDOW w AS (PARTITION BY entity_id ORDER BY vt
                           ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)""",
            latest_view(f"latest_{name}", name, "vt")]


def _user_state_views() -> list[str]:
    """A user's state (``USER_PARTS``): its two tiles and its last clicks, the strings the
    feature store holds (``Tile.encode``, the click entries), so the UDF decodes exactly what
    serving reads from Redis."""
    return carried_state_views(
        "user_state",
        [(p, f"{name}_history", "window_time", "tiles") for name, kind, _, p in TILES
         if kind == "user"]
        + [("clicks", "last_clicks", "ts", "entries")])


def statements(cfg: Config, topics: JobTopics) -> tuple[list[str], list[str]]:
    """(DDL, INSERTs) of the job; split out so tests can check the SQL without a cluster."""
    fj = cfg.feature_job
    win = interval(fj.attribution_window_s * 1000)
    ddl = [source_ddl(cfg, topics.events, fj.group_id), *_sinks(cfg, topics),
           f"""CREATE TEMPORARY VIEW checked AS
              SELECT payload, `partition`, `offset`, ts, pt,
                     odl_parse(payload, {ltz_epoch_ms("ts")}) AS e,
                     ts <= CURRENT_WATERMARK(ts) AS late
              FROM {source_rows()}""",
           """CREATE TEMPORARY VIEW valid AS
              SELECT e.etype AS etype, e.event_id AS event_id, e.request_id AS request_id,
                     e.user_id AS user_id, e.item_id AS item_id, e.`position` AS `position`,
                     e.`hour` AS `hour`, e.category AS category, e.ts_ms AS ts_ms,
                     payload, `partition`, `offset`, ts, pt
              FROM checked WHERE e.reason IS NULL AND late IS NOT TRUE""",
           # at-least-once producers repeat events: the first of an event_id to arrive counts, the
           # rest go to the DLQ.  Ordered by processing time, the count is a per-id counter that
           # emits at once; ordered by event time it buffered every row until the watermark and
           # halved the job's throughput (state per id expires with table.exec.state.ttl)
           """CREATE TEMPORARY VIEW numbered AS
              SELECT *, COUNT(*) OVER (PARTITION BY event_id ORDER BY pt
                                       ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS seen
              FROM valid""",
           "CREATE TEMPORARY VIEW events AS SELECT * FROM numbered WHERE seen = 1",
           # impressions go through the temporal and interval joins' state and every shuffle:
           # only what samples need, not the raw payload (clicks keep it for the DLQ)
           """CREATE TEMPORARY VIEW imps AS
              SELECT request_id, user_id, item_id, `position`, `hour`, category, ts_ms, ts
              FROM events WHERE etype = 'impression'""",
           "CREATE TEMPORARY VIEW clicks AS SELECT * FROM events WHERE etype = 'click'",
           *[tiles_view(name, f"{kind}_id", w) for name, kind, w, _ in TILES],
           *[tile_history_view(f"{name}_history", name, F.tile_sql()) for name, *_ in TILES],
           latest_view("latest_item_tiles_1h", "item_tiles_1h_history", "window_time"),
           f"""CREATE TEMPORARY VIEW last_clicks AS
              SELECT user_id AS entity_id, ts, ts_ms,
                     LISTAGG({F.click_entry_sql()}, ' ') OVER (
                       PARTITION BY user_id ORDER BY ts
                       ROWS BETWEEN {F.LAST_N - 1} PRECEDING AND CURRENT ROW) AS entries
              FROM clicks""",
           *_user_state_views(),
           f"""CREATE TEMPORARY VIEW featured AS
              SELECT i.request_id, i.user_id, i.item_id, i.`position`, i.`hour`, i.category,
                     i.ts_ms, i.ts,
                     odl_features(i.ts_ms, {", ".join(f"COALESCE(u.{p}, '')" for p in USER_PARTS)},
                                  COALESCE(it.tiles, ''))
                       AS features
              FROM imps AS i
              LEFT JOIN latest_user_state FOR SYSTEM_TIME AS OF i.ts AS u
                ON i.user_id = u.entity_id
              LEFT JOIN latest_item_tiles_1h FOR SYSTEM_TIME AS OF i.ts AS it
                ON i.item_id = it.entity_id""",
           ]
    dlq_cols = "payload, `partition`, `offset`, UNIX_TIMESTAMP() * 1000"
    inserts = [
        f"""INSERT INTO samples_sink
            SELECT CONCAT(i.request_id, ':', CAST(i.item_id AS STRING)) AS sample_id,
                   i.request_id, i.user_id, i.item_id, i.`position`, i.`hour`, i.category,
                   CASE WHEN c.request_id IS NULL THEN 0 ELSE 1 END AS label,
                   i.ts_ms AS impression_ts_ms,
                   COALESCE(c.ts_ms, i.ts_ms + {fj.attribution_window_s * 1000}) AS label_ts_ms,
                   i.features, FALSE AS provisional
            FROM featured i LEFT JOIN clicks c
              ON i.request_id = c.request_id AND i.item_id = c.item_id
             AND c.ts > i.ts AND c.ts <= i.ts + {win}""",
        f"""INSERT INTO dlq_sink
            SELECT COALESCE(e.reason, 'late_event'), {dlq_cols} FROM checked
            WHERE e.reason IS NOT NULL OR late IS TRUE""",
        f"INSERT INTO dlq_sink SELECT 'duplicate_event', {dlq_cols} FROM numbered WHERE seen > 1",
        f"""INSERT INTO dlq_sink
            SELECT CASE WHEN i.request_id IS NULL THEN 'click_unattributed'
                        ELSE 'click_before_impression' END,
                   c.payload, c.`partition`, c.`offset`, UNIX_TIMESTAMP() * 1000
            FROM clicks c LEFT JOIN imps i
              ON c.request_id = i.request_id AND c.item_id = i.item_id
             AND i.ts BETWEEN c.ts - {win} AND c.ts + {win}
            WHERE i.request_id IS NULL OR i.ts >= c.ts""",
        *[f"""INSERT INTO features_sink
              SELECT CONCAT('{kind}:', CAST(entity_id AS STRING)), '{kind}', entity_id, '{part}',
                     end_ms,
                     {F.tile_sql()}
              FROM {name}""" for name, kind, _, part in TILES],
        """INSERT INTO features_sink
           SELECT CONCAT('user:', CAST(entity_id AS STRING)), 'user', entity_id, 'clicks', ts_ms,
                  entries
           FROM last_clicks""",
    ]
    if cfg.delayed_feedback:
        # delayed feedback: every impression also leaves at once (as soon as its features are
        # joined) as a provisional negative under the same sample_id; its final sample follows
        inserts.append(
            """INSERT INTO samples_sink
               SELECT CONCAT(request_id, ':', CAST(item_id AS STRING)), request_id, user_id,
                      item_id, `position`, `hour`, category, 0, ts_ms, ts_ms, features, TRUE
               FROM featured""")
    return ddl, inserts


_INSERT = re.compile(r"\s*INSERT\s+INTO\s+(\w+)\s+(SELECT\b.*)", re.IGNORECASE | re.DOTALL)


def one_insert_per_sink(inserts: list[str]) -> list[str]:
    """The INSERTs into one sink table merged into one ``INSERT ... SELECT * FROM (... UNION ALL
    ...)``, in first-appearance order: one sink operator, so one Kafka producer, per topic at
    parallelism 1.  Separate INSERTs each get a sink and a producer of their own, and concurrent
    producers on a partition are what tansu 0.6 can reorder (``odl.offset_gaps``)."""
    bodies: dict[str, list[str]] = {}
    for ins in inserts:
        m = _INSERT.match(ins)
        if m is None:
            raise ValueError(f"not an INSERT INTO <table> SELECT ...: {ins[:80]!r}")
        bodies.setdefault(m.group(1), []).append(m.group(2).strip())
    return [f"INSERT INTO {sink} {selects[0]}" if len(selects) == 1 else
            f"INSERT INTO {sink} SELECT * FROM (\n" + "\nUNION ALL\n".join(selects) + "\n)"
            for sink, selects in bodies.items()]
