"""A spec's real-time features as of a moment, from the state the stream job keeps per entity.

The stream job (``pipeline.spec_sql``) keeps, for every declared count, one window tile per
window of the count's key (``odl.features.Tile``: impressions and clicks of the window ending
at ``end_ms``, exclusive), and for every sequence the key's last clicks as ``<ts>:<value>``
entries.  The functions here turn that state into the values a sample record carries
(``odl.spec.sample``), with the same point-in-time rule as ``odl eval --spec``
(``trainers.evaluation.spec_log``): the window in force ends at the newest ``tile_s`` boundary
at or before the impression, and a sequence holds only clicks strictly before it.

Key strings: a count's entity is its key fields' values joined by ``|`` (``entity_key``), the
same string whichever stage asks, so the job's state and a later online-store lookup meet.
"""
from __future__ import annotations

from typing import Any, Sequence

from odl.features import Tile, smoothed_ctr, tile_at
from odl.spec.model import FeatureSpec

ENTITY_SEP = "|"


def entity_key(values: dict[str, Any], key: Sequence[str]) -> str:
    """The entity a count is kept for: its key fields' values joined; '' when a part is absent
    (the event then counts for no entity, as in ``odl eval --spec``)."""
    parts = []
    for f in key:
        v = values.get(f)
        if v is None:
            return ""
        parts.append(str(v))
    return ENTITY_SEP.join(parts)


def count_kind(count: str) -> str:
    """The online store's entity kind of a count's key (its parts: the count's windows)."""
    return f"count.{count}"


def sequence_kind(sequence: str) -> str:
    """The online store's entity kind of a sequence's key (one part, ``SEQUENCE_PART``)."""
    return f"seq.{sequence}"


SEQUENCE_PART = "clicks"


def store_parts(spec: FeatureSpec) -> dict[str, tuple[str, ...]]:
    """Every entity kind the spec's job writes to the online store, and its parts."""
    out = {count_kind(c): tuple(wf.windows) for c, wf in spec.realtime.counts.items()}
    out.update({sequence_kind(s): (SEQUENCE_PART,) for s in spec.realtime.sequences})
    return out


def count_parts(spec: FeatureSpec) -> list[tuple[str, str]]:
    """(count, window) of every tile the job keeps, in the order the features UDF takes them."""
    return [(cname, w) for cname, c in spec.realtime.counts.items() for w in c.windows]


def tile_in_force(tile: Tile | None, as_of_ms: int, tile_ms: int,
                  in_flight: bool = False) -> tuple[int, int]:
    """(impressions, clicks) of the window ending at the newest boundary at or before
    ``as_of_ms``.  The job's temporal join sees every tile up to the watermark, so a tile that
    ends anywhere else means the entity had no events in that window.  Serving reads the
    online store a little behind the stream (the newest tile closes when the watermark passes
    its end): ``in_flight`` accepts the tile one step older too, as ``odl.features`` does."""
    boundary = as_of_ms - as_of_ms % tile_ms
    if tile is None or tile.end_ms > boundary or \
            tile.end_ms < boundary - (tile_ms if in_flight else 0):
        return 0, 0
    return tile.imps, tile.clicks


def count_values(spec: FeatureSpec, tiles: Sequence[str | None], as_of_ms: int,
                 in_flight: bool = False) -> dict[str, float]:
    """The record's ``counts`` (``odl.spec.encode.count_names``; zeros left out, absent = 0)
    from the encoded tiles of ``count_parts(spec)`` (each the online store's one tile or the
    job's newest tiles, ``odl.features.tile_at``)."""
    rt = spec.realtime
    tile_ms = rt.tile_s * 1000
    out: dict[str, float] = {}
    for (cname, w), raw in zip(count_parts(spec), tiles):
        imps, clicks = tile_in_force(tile_at(raw or None, as_of_ms), as_of_ms, tile_ms, in_flight)
        for v in rt.counts[cname].values:
            x = smoothed_ctr(imps, clicks) if v == "ctr" else (imps if v == "impressions" else clicks)
            if x:
                out[f"{cname}.{v}_{w}"] = x
    return out


def sequence_entry(ts_ms: int, value: Any) -> str:
    return f"{ts_ms}:{value}"


def sequence_values(entries: str | None, as_of_ms: int, length: int) -> list[int]:
    """The key's last ``length`` clicked values strictly before ``as_of_ms``, newest first, from
    space-separated entries (oldest first, as the job's ``LISTAGG`` writes them)."""
    out: list[int] = []
    for tok in (entries or "").split():
        ts, _, value = tok.partition(":")
        try:
            if int(ts) < as_of_ms:
                out.append(int(value))
        except ValueError:
            continue
    return out[::-1][:length]
