"""The feature job's two Python UDFs: thin adapters from Flink rows to ``odl.schemas`` (what a
valid event is) and ``odl.features`` (what a feature is), so neither rule has a SQL twin.

Both run in PyFlink's thread mode (PEMJA, in the TaskManager JVM): one JSON parse per event,
one feature evaluation per impression.
"""
from __future__ import annotations

from odl.features import ItemState, UserState, features_as_of, tile_at

PARSED_FIELDS = (("reason", "STRING"), ("etype", "STRING"), ("event_id", "STRING"),
                 ("request_id", "STRING"), ("user_id", "BIGINT"), ("item_id", "BIGINT"),
                 ("position", "INT"), ("hour", "INT"), ("category", "INT"), ("ts_ms", "BIGINT"))


def parse_row(payload: str | None, record_ts_ms: int | None) -> tuple:
    """``odl.schemas.parse_event`` as a flat row; the job passes the Kafka record timestamp as
    epoch milliseconds (a datetime would cost PyFlink a conversion per event)."""
    from odl.schemas import parse_event
    reason, ev = parse_event(payload, record_ts_ms=record_ts_ms)
    if ev is None:  # PyFlink's thread mode cannot return NULL inside a ROW: zeros instead
        return (reason,) + tuple("" if t == "STRING" else 0 for _, t in PARSED_FIELDS[1:])
    return (None, ev.etype, ev.event_id, ev.request_id, ev.user_id, ev.item_id, ev.position,
            ev.hour, ev.category, ev.ts_ms)


def features_row(as_of_ms, user_t5m, user_t1h, user_clicks, item_t1h) -> tuple:
    """The features of an impression from its entities' state as the job's temporal joins see it
    (each tile part its newest tiles, ``odl.features.tile_at``; the click entries; '' for a part
    with no history yet)."""
    at = int(as_of_ms)
    f = features_as_of(UserState(tile_at(user_t5m or None, at), tile_at(user_t1h or None, at),
                                 user_clicks or None),
                       ItemState(tile_at(item_t1h or None, at)), at)
    u, i = f.user, f.item
    return ((u.imps_5m, u.clicks_5m, u.imps_1h, u.clicks_1h, list(u.last_items),
             list(u.last_categories)), (i.imps_1h, i.clicks_1h, i.ctr_1h))


def register(t_env) -> None:
    """Register ``odl_parse`` and ``odl_features`` on a TableEnvironment."""
    from pyflink.common import Row
    from pyflink.table import DataTypes as T
    from pyflink.table.udf import udf

    sql_types = {"STRING": T.STRING(), "BIGINT": T.BIGINT(), "INT": T.INT()}
    parsed = T.ROW([T.FIELD(n, sql_types[t]) for n, t in PARSED_FIELDS])
    user = T.ROW([T.FIELD("imps_5m", T.INT()), T.FIELD("clicks_5m", T.INT()),
                  T.FIELD("imps_1h", T.INT()), T.FIELD("clicks_1h", T.INT()),
                  T.FIELD("last_items", T.ARRAY(T.BIGINT())),
                  T.FIELD("last_categories", T.ARRAY(T.INT()))])
    item = T.ROW([T.FIELD("imps_1h", T.INT()), T.FIELD("clicks_1h", T.INT()),
                  T.FIELD("ctr_1h", T.DOUBLE())])

    @udf(result_type=parsed)
    def odl_parse(payload, record_ts_ms):
        return Row(*parse_row(payload, record_ts_ms))

    @udf(result_type=T.ROW([T.FIELD("user", user), T.FIELD("item", item)]))
    def odl_features(*args):
        u, i = features_row(*args)
        return Row(Row(*u), Row(*i))

    t_env.create_temporary_function("odl_parse", odl_parse)
    t_env.create_temporary_function("odl_features", odl_features)
