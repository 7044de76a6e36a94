"""Real-time features: the one definition that both the feature job and serving evaluate.

Why one Python definition: the label join and the windows run in Flink SQL, but the *value* of
a feature as of a moment is computed by the functions below, called by the Flink job as a
Python UDF when it builds a sample and by serving on what the online feature store (Redis)
holds.  So training and serving cannot drift: same code, same inputs, same time.

Point in time: the features of an impression at event time ``t`` use only events with event
time strictly before ``t``.  Events at ``t`` itself are left out: they include the other items
of the same request, which serving cannot know when it scores the request.

State that Flink maintains and Redis stores, per entity:

* **tiles** -- impressions and clicks of a window in 1-minute steps: a Flink SQL ``HOP`` window
  per entity (users: 5 min and 1 h; items: 1 h), attached to each impression by an event-time
  temporal join (the newest tile that ended at or before ``t``), so only events before the tile's
  end count.  Window counts therefore have one-minute resolution.
* **last clicks** -- the user's last N clicks as entries ``<ts>:<item>:<category>``, a Flink SQL
  ``LISTAGG`` over a ``ROWS`` window of the user's clicks; entries carry their time so that a click
  at the impression's own millisecond is left out.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

# --- the definition ------------------------------------------------------------------------
TILE_SLIDE_S = 60                   # window counts advance in 1-minute steps
USER_WINDOWS_S = (300, 3600)        # user impressions / clicks over 5 min and 1 h
ITEM_WINDOW_S = 3600                # item impressions / clicks / smoothed CTR over 1 h
LAST_N = 5                          # the user's last N clicked items and their categories
CTR_PRIOR = 0.05                    # smoothed CTR = (clicks + PRIOR*STRENGTH) / (imps + STRENGTH)
CTR_PRIOR_STRENGTH = 20.0
NUM_CATEGORIES = 1000               # category ids are folded into [0, NUM_CATEGORIES)


@dataclass(frozen=True)
class UserFeatures:
    imps_5m: int = 0
    clicks_5m: int = 0
    imps_1h: int = 0
    clicks_1h: int = 0
    last_items: tuple[int, ...] = (0,) * LAST_N      # newest first, 0-padded
    last_categories: tuple[int, ...] = (0,) * LAST_N


@dataclass(frozen=True)
class ItemFeatures:
    imps_1h: int = 0
    clicks_1h: int = 0
    ctr_1h: float = CTR_PRIOR


@dataclass(frozen=True)
class Features:
    """Everything the model sees about one impression besides its ids."""
    user: UserFeatures = UserFeatures()
    item: ItemFeatures = ItemFeatures()

    def to_json(self) -> dict:
        return {"user": {**asdict(self.user), "last_items": list(self.user.last_items),
                         "last_categories": list(self.user.last_categories)},
                "item": asdict(self.item)}

    @classmethod
    def from_json(cls, d: dict | None) -> "Features":
        """Tolerant of missing parts (samples of an older job): missing means no history."""
        if not d:
            return cls()
        u, i = d.get("user") or {}, d.get("item") or {}
        user = UserFeatures(**{f.name: (tuple(int(x) for x in u[f.name])
                                        if f.name.startswith("last_") else int(u[f.name]))
                               for f in fields(UserFeatures) if u.get(f.name) is not None})
        item = ItemFeatures(**{f.name: (float(i[f.name]) if f.name == "ctr_1h" else int(i[f.name]))
                               for f in fields(ItemFeatures) if i.get(f.name) is not None})
        return cls(user, item)

    def dense(self) -> list[float]:
        """The numeric inputs of the model, scaled; the one place their order is defined."""
        u, i = self.user, self.item
        return dense_values(u.imps_5m, u.clicks_5m, u.imps_1h, u.clicks_1h, i.imps_1h, i.clicks_1h,
                            i.ctr_1h)


def dense_values(u_imps_5m, u_clicks_5m, u_imps_1h, u_clicks_1h, i_imps_1h, i_clicks_1h,
                 i_ctr_1h) -> list[float]:
    """``Features.dense`` from the raw numbers (the trainer decodes samples without building
    the dataclasses)."""
    return [math.log1p(u_imps_5m), math.log1p(u_clicks_5m), math.log1p(u_imps_1h),
            math.log1p(u_clicks_1h), math.log1p(i_imps_1h), math.log1p(i_clicks_1h),
            i_ctr_1h / CTR_PRIOR]


def dense_of_json(d: dict | None) -> list[float]:
    """``Features.from_json(d).dense()`` without the dataclasses: the trainer's hot path.
    Missing parts mean no history, as in ``Features.from_json``."""
    u, i = (d.get("user") or {}, d.get("item") or {}) if d else ({}, {})
    return dense_values(u.get("imps_5m") or 0, u.get("clicks_5m") or 0, u.get("imps_1h") or 0,
                        u.get("clicks_1h") or 0, i.get("imps_1h") or 0, i.get("clicks_1h") or 0,
                        CTR_PRIOR if i.get("ctr_1h") is None else float(i["ctr_1h"]))




# --- entity state -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tile:
    """Counts of one entity over one window ending (exclusive) at ``end_ms``."""
    end_ms: int
    imps: int
    clicks: int

    def encode(self) -> str:
        return f"{self.end_ms}|{self.imps}|{self.clicks}"

    @classmethod
    def decode(cls, raw: str | bytes | None) -> "Tile | None":
        if raw is None:
            return None
        try:
            end, imps, clicks = (raw.decode() if isinstance(raw, bytes) else raw).split("|")
            return cls(int(end), int(imps), int(clicks))
        except ValueError:
            return None


@dataclass(frozen=True)
class UserState:
    tile_5m: Tile | None = None
    tile_1h: Tile | None = None
    last_clicks: str | None = None     # space-separated ``<ts>:<item>:<category>``, oldest first


@dataclass(frozen=True)
class ItemState:
    tile_1h: Tile | None = None


def category_of(raw: object) -> int:
    """Category ids as the job stores them: non-negative ints folded into the vocabulary."""
    return int(raw) % NUM_CATEGORIES if isinstance(raw, int) and not isinstance(raw, bool) else 0


def click_entry_sql(ts_ms: str = "ts_ms", item: str = "item_id", category: str = "category") -> str:
    """The Flink SQL expression of one last-clicks entry (``parse_clicks`` reads it)."""
    return (f"CONCAT(CAST({ts_ms} AS STRING), ':', CAST({item} AS STRING), ':', "
            f"CAST({category} AS STRING))")


def parse_clicks(raw: str | None) -> list[tuple[int, int, int]]:
    """(ts, item, category) of each readable entry, in stored order."""
    out = []
    for tok in (raw or "").split():
        try:
            ts, item, cat = tok.split(":")
            out.append((int(ts), int(item), int(cat)))
        except ValueError:
            continue
    return out


TILE_HISTORY = 2   # tiles the job's versioned state of a part holds (pipeline.feature_sql)


def tile_at(raw: str | bytes | None, as_of_ms: int) -> Tile | None:
    """The newest tile ending at or before ``as_of_ms`` of a part's encoded value.

    The online store holds one tile (``Tile.encode``).  The job's temporal join reads its own
    versioned state, which holds the newest ``TILE_HISTORY`` tiles space-separated: a tile's
    version time is its window's last millisecond, so an impression on exactly that millisecond
    (one in ``tile_ms`` of them) finds the tile that contains it, which ends after it, and
    needs the one before."""
    if raw is None:
        return None
    text = raw.decode() if isinstance(raw, bytes) else raw
    best = None
    for tok in text.split():
        t = Tile.decode(tok)
        if t is not None and t.end_ms <= as_of_ms and (best is None or t.end_ms > best.end_ms):
            best = t
    return best


def tile_counts(tile: Tile | None, as_of_ms: int) -> tuple[int, int]:
    """(impressions, clicks) of the window ending at the latest slide boundary <= ``as_of_ms``.

    The job emits a tile when the watermark passes its end, so at serving time the current tile
    may still be in flight: a tile one slide older is accepted too.  Anything older means the
    entity had no events in the window, and one ending after ``as_of_ms`` is not yet known.
    """
    slide = TILE_SLIDE_S * 1000
    boundary = as_of_ms - as_of_ms % slide
    if tile is None or tile.end_ms > as_of_ms or tile.end_ms < boundary - slide:
        return 0, 0
    return tile.imps, tile.clicks


def features_as_of(user: UserState, item: ItemState, as_of_ms: int) -> Features:
    """The features of an impression (or a request being scored) at ``as_of_ms``."""
    i5, c5 = tile_counts(user.tile_5m, as_of_ms)
    i1, c1 = tile_counts(user.tile_1h, as_of_ms)
    clicks = [(it, cat) for ts, it, cat in parse_clicks(user.last_clicks) if ts < as_of_ms]
    last = clicks[::-1][:LAST_N] + [(0, 0)] * max(0, LAST_N - len(clicks))
    ii, ic = tile_counts(item.tile_1h, as_of_ms)
    return Features(
        UserFeatures(i5, c5, i1, c1, tuple(x for x, _ in last), tuple(c for _, c in last)),
        ItemFeatures(ii, ic, smoothed_ctr(ii, ic)))


def smoothed_ctr(imps: int, clicks: int) -> float:
    return (clicks + CTR_PRIOR * CTR_PRIOR_STRENGTH) / (imps + CTR_PRIOR_STRENGTH)


def tile_sql(end_ms: str = "end_ms", imps: str = "imps", clicks: str = "clicks") -> str:
    """``Tile.encode`` in Flink SQL: how the job writes a tile into the feature-update stream."""
    return (f"CONCAT(CAST({end_ms} AS STRING), '|', CAST({imps} AS STRING), '|', "
            f"CAST({clicks} AS STRING))")


NUM_DENSE = len(Features().dense())        # the model's real-time feature inputs
DEFAULT_DENSE = Features().dense()         # an entity without history
USER_DENSE = 4   # Features.dense() lists the user's values first, then the item's: each part
#                  depends on its own entity only, so serving computes it once per entity


def user_dense_as_of(user: UserState, as_of_ms: int) -> list[float]:
    """The user's part of ``Features.dense`` (the first ``USER_DENSE`` values)."""
    return features_as_of(user, ItemState(), as_of_ms).dense()[:USER_DENSE]


def item_dense_as_of(item: ItemState, as_of_ms: int) -> list[float]:
    """The item's part of ``Features.dense``.  Depends on ``as_of_ms`` only through its minute
    (tiles end on slide boundaries), so a caller may reuse it within that minute."""
    return features_as_of(UserState(), item, as_of_ms).dense()[USER_DENSE:]

