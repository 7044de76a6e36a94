"""The online feature store: the feature job's entity state, materialised in Redis.

The feature job publishes every change of an entity's state (a new tile, a new last-clicks list)
to the ``features`` topic; ``pipeline.feature_store_writer`` applies them here, and serving reads
them back and evaluates ``odl.features.features_as_of`` on them -- the function the job used for
the samples.  So a request scored at time ``t`` sees exactly what a sample at ``t`` was built from,
up to the pipeline's freshness lag.

Layout: one string key per (entity, part), ``{odl:fs:<kind>}:<id>:<part>``, value
``<version_ms>#<payload>``.  Writes go through a Lua script that keeps the newer version, so
replays after a restart (at-least-once) and out-of-order partitions cannot move state back.
Keys expire ``store_ttl_s`` after their last update: an entity silent for longer than the longest
window has no state that a feature could still use.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import redis

from odl import names
from odl.features import Features, ItemState, Tile, UserState, features_as_of

PARTS = {"user": ("t5m", "t1h", "clicks"), "item": ("t1h",)}

_PUT_NEWER = """
local written = 0
for i = 1, #KEYS do
  local version = tonumber(ARGV[2 * i])
  local cur = redis.call('GET', KEYS[i])
  local cur_version = cur and tonumber(string.match(cur, '^(%-?%d+)#')) or nil
  if (not cur_version) or cur_version < version then
    redis.call('SET', KEYS[i], ARGV[2 * i] .. '#' .. ARGV[2 * i + 1], 'EX', ARGV[1])
    written = written + 1
  end
end
return written
"""


class FeatureUpdateError(ValueError):
    """A feature update that cannot be applied (unknown kind or part, bad field)."""


@dataclass(frozen=True)
class FeatureUpdate:
    """One record of the ``features`` topic (see ``pipeline.feature_sql``)."""
    kind: str
    entity_id: int | str       # a spec's count keys are strings (``odl.spec.realtime``)
    part: str
    version_ms: int
    value: str

    @classmethod
    def from_dict(cls, d: dict, parts: dict[str, tuple[str, ...]] | None = None) -> "FeatureUpdate":
        """``parts``: the kinds and parts the running job writes (default: ``PARTS``, the
        default shape's; a spec's: ``odl.spec.realtime.store_parts``)."""
        parts = PARTS if parts is None else parts
        try:
            kind = str(d["kind"])
            entity = int(d["entity_id"]) if kind in PARTS else str(d["entity_id"])
            u = cls(kind, entity, str(d["part"]), int(d["version_ms"]), str(d["value"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise FeatureUpdateError(f"malformed feature update {d!r}: {exc}") from None
        if u.part not in parts.get(u.kind, ()):
            raise FeatureUpdateError(f"unknown feature part {u.kind}/{u.part}")
        return u

    @property
    def key(self) -> str:
        return part_key(self.kind, self.entity_id, self.part)


def part_key(kind: str, entity_id: int | str, part: str) -> str:
    return f"{names.fs_key(kind, entity_id)}:{part}"


def _payload(raw: bytes | str | None) -> str | None:
    if raw is None:
        return None
    text = raw.decode() if isinstance(raw, bytes) else raw
    return text.partition("#")[2]


class FeatureStore:
    def __init__(self, client: redis.Redis, ttl_s: int = 7200):
        self.r = client
        self.ttl_s = ttl_s
        self._put = client.register_script(_PUT_NEWER)

    def write(self, updates: Iterable[FeatureUpdate], chunk: int = 500) -> int:
        """Apply updates, newest version per key wins; returns the keys changed."""
        newest: dict[str, FeatureUpdate] = {}
        for u in updates:
            cur = newest.get(u.key)
            if cur is None or cur.version_ms < u.version_ms:
                newest[u.key] = u
        written = 0
        for kind in sorted({u.kind for u in newest.values()}):  # one script call, one slot
            batch = [u for u in newest.values() if u.kind == kind]
            for i in range(0, len(batch), chunk):
                part = batch[i:i + chunk]
                args: list = [self.ttl_s]
                for u in part:
                    args += [u.version_ms, u.value]
                written += int(self._put(keys=[u.key for u in part], args=args))
        return written

    def parts(self, kind: str, entity_ids: list[int | str],
              parts: tuple[str, ...]) -> list[list[str | None]]:
        """Each entity's ``parts`` payloads (None where absent), one MGET."""
        if not entity_ids:
            return []
        vals = [_payload(v) for v in self.r.mget([part_key(kind, e, p) for e in entity_ids
                                                   for p in parts])]
        n = len(parts)
        return [vals[k * n:(k + 1) * n] for k in range(len(entity_ids))]

    def users(self, ids: list[int]) -> list[UserState]:
        if not ids:
            return []
        keys = [part_key("user", i, p) for i in ids for p in PARTS["user"]]
        vals = [_payload(v) for v in self.r.mget(keys)]
        return [UserState(Tile.decode(vals[3 * k]), Tile.decode(vals[3 * k + 1]), vals[3 * k + 2])
                for k in range(len(ids))]

    def items(self, ids: list[int]) -> list[ItemState]:
        if not ids:
            return []
        vals = self.r.mget([part_key("item", i, "t1h") for i in ids])
        return [ItemState(Tile.decode(_payload(v))) for v in vals]

    def features(self, user_id: int, item_ids: list[int], as_of_ms: int) -> list[Features]:
        """The features of scoring ``item_ids`` for ``user_id`` at ``as_of_ms``."""
        user = self.users([user_id])[0]
        return [features_as_of(user, item, as_of_ms) for item in self.items(item_ids)]
