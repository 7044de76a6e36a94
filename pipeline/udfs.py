"""The feature job's two Python UDFs: thin adapters from Flink rows to ``odl.schemas`` (what a
valid event is) and ``odl.features`` (what a feature is), so neither rule has a SQL twin.

Both run in PyFlink's thread mode (PEMJA, in the TaskManager JVM): one JSON parse per event,
one feature evaluation per impression.
"""
from __future__ import annotations

from datetime import datetime

from odl.features import ItemState, Tile, UserState, features_as_of

PARSED_FIELDS = (("reason", "STRING"), ("etype", "STRING"), ("event_id", "STRING"),
                 ("request_id", "STRING"), ("user_id", "BIGINT"), ("item_id", "BIGINT"),
                 ("position", "INT"), ("hour", "INT"), ("category", "INT"), ("ts_ms", "BIGINT"))


def epoch_ms(ts: datetime | int | None) -> int | None:
    """Flink hands TIMESTAMP_LTZ to Python as a datetime (naive local or aware): both convert."""
    if ts is None:
        return None
    return ts if isinstance(ts, int) else round(ts.timestamp() * 1000)


def parse_row(payload: str | None, ts) -> tuple:
    from odl.schemas import parse_event
    reason, ev = parse_event(payload, record_ts_ms=epoch_ms(ts))
    if ev is None:  # PyFlink's thread mode cannot return NULL inside a ROW: zeros instead
        return (reason,) + tuple("" if t == "STRING" else 0 for _, t in PARSED_FIELDS[1:])
    return (None, ev.etype, ev.event_id, ev.request_id, ev.user_id, ev.item_id, ev.position,
            ev.hour, ev.category, ev.ts_ms)


def _tile(end_ms, imps, clicks) -> Tile | None:
    if end_ms is None or end_ms < 0:
        return None
    return Tile(int(end_ms), int(imps or 0), int(clicks or 0))


def features_row(as_of_ms, u5_end, u5_imps, u5_clicks, u1_end, u1_imps, u1_clicks, last_clicks,
                 it_end, it_imps, it_clicks) -> tuple:
    f = features_as_of(UserState(_tile(u5_end, u5_imps, u5_clicks),
                                 _tile(u1_end, u1_imps, u1_clicks), last_clicks),
                       ItemState(_tile(it_end, it_imps, it_clicks)), int(as_of_ms))
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
    def odl_parse(payload, ts):
        return Row(*parse_row(payload, ts))

    @udf(result_type=T.ROW([T.FIELD("user", user), T.FIELD("item", item)]))
    def odl_features(*args):
        u, i = features_row(*args)
        return Row(Row(*u), Row(*i))

    t_env.create_temporary_function("odl_parse", odl_parse)
    t_env.create_temporary_function("odl_features", odl_features)
