"""A bounded local cache of embedding rows in front of Redis, kept fresh by the exporter's deltas.

Why: a recommendation request reads one user and ~100 items; popular items repeat across
requests, and a process-local hit costs a dict lookup instead of a round trip.  Why it stays
correct:

- It caches rows of one generation (the exporter's ``{odl:emb}:current`` pointer).  When the
  pointer moves (a resync, a rollback restore) the whole cache is dropped.
- The exporter announces every in-place change of the visible generation on the
  ``{odl:emb}:changes`` stream (``HotEmbeddings._announce``); ``follow`` reads it and re-reads the
  rows this replica holds (or marks deleted ones as defaults), so a hot row is as fresh here as
  in Redis, one stream read later.
- Unknown ids are cached as "default" too (serving never admits ids; training will announce the
  row when it creates it), so a long tail of unknown ids does not hit Redis on every request.
- Entries also expire after ``ttl_s``: a safety net if the stream is lost (Redis restarted) or
  trimmed past this reader.
- With Redis unavailable (``RedisGuard``), lookups answer from whatever is cached, expired or
  not, and the zero default for the rest, and say so (``Lookup.degraded``).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import redis

from odl.embedding_store import EmbeddingReader, Pointer
from odl import names
from serving.guard import RedisGuard, Unavailable

log = logging.getLogger("odl.serving.cache")


@dataclass
class Lookup:
    vectors: np.ndarray   # [n, dim] float32
    # every looked-up id is exactly one of: hits, fetched, unavailable
    hits: int = 0         # answered by the cache (a row, or known to have none)
    fetched: int = 0      # read from Redis (found or not)
    unavailable: int = 0  # neither cached nor readable (Redis down): the default
    defaults: int = 0     # of all of them, those answered with the zero default
    degraded: bool = False


@dataclass
class _Entry:
    vector: np.ndarray | None   # None: Redis holds no row for the id (the default)
    at: float                   # monotonic time it was read; 0 = stale


class EmbeddingCache:
    def __init__(self, reader: EmbeddingReader, guard: RedisGuard, max_rows: int = 100_000,
                 ttl_s: float = 30.0):
        self.reader, self.guard, self.max_rows, self.ttl_s = reader, guard, max_rows, ttl_s
        self.generation: int | None = None
        self._set: tuple[int, float] | None = None   # (generation, activated_at) of the cached rows
        self._tables: dict[str, OrderedDict[int, _Entry]] = {}
        self._lock = threading.Lock()
        self._changes = 0          # change-stream entries applied (see ``_store``)
        self._last_id: bytes | None = None
        self.applied = 0           # rows refreshed or dropped from the change stream
        # the event time of the newest sample behind the rows this replica serves: the largest
        # ``c`` of the change entries of its generation applied so far (``data_age_s``)
        self.data_clock_ms = 0
        self.resets = 0

    def rows(self, table: str) -> int:
        return len(self._tables.get(table, ()))

    # --- lookups (inference worker threads) ------------------------------------------------------
    def _pointer(self) -> Pointer | None:
        """The current pointer; a new generation drops the cache.  Raises Unavailable."""
        p = self.guard.call(self.reader.pointer)
        # generation numbers restart if Redis restarted empty: activated_at tells the sets apart
        if p is not None and (p.generation, p.activated_at) != self._set:
            with self._lock:
                if self._set is not None:
                    log.info("embedding generation %s -> %d: cache dropped", self.generation, p.generation)
                    self.resets += 1
                self._tables.clear()
                if self._set is not None:   # a resync: the new set's clock comes with its deltas
                    self.data_clock_ms = 0
                self.generation, self._set = p.generation, (p.generation, p.activated_at)
        return p

    def current_generation(self) -> int | None:
        """The embedding generation this replica reads now (following the pointer, which drops
        the cache when it moved); the last one known while Redis is away."""
        try:
            self._pointer()
        except Unavailable:
            pass
        return self.generation

    def lookup(self, table: str, ids: list[int], dim: int) -> Lookup:
        out = Lookup(np.zeros((len(ids), dim), np.float32))
        try:
            pointer = self._pointer()
        except Unavailable:
            pointer, out.degraded = None, True
        now = time.monotonic()
        missing: dict[int, list[int]] = {}   # id -> positions in ``ids``
        with self._lock:
            cache = self._tables.setdefault(table, OrderedDict())
            changes_before = self._changes
            for k, i in enumerate(ids):
                e = cache.get(i)
                if e is not None and (out.degraded or now - e.at < self.ttl_s):
                    cache.move_to_end(i)
                    out.hits += 1
                    if e.vector is not None and len(e.vector) == dim:
                        out.vectors[k] = e.vector
                    else:                     # known to have no row: the default, no round trip
                        out.defaults += 1
                else:
                    missing.setdefault(i, []).append(k)
        if not missing:
            return out
        want = list(missing)
        if pointer is not None and not out.degraded:
            try:
                vecs, found = self.guard.call(self.reader.fetch, table, want, dim, pointer)
            except Unavailable:
                out.degraded = True
            else:
                self._store(table, pointer.generation, want, vecs, found, changes_before)
                for j, i in enumerate(want):
                    out.vectors[missing[i]] = vecs[j]
                    out.fetched += len(missing[i])
                    out.defaults += 0 if found[j] else len(missing[i])
                return out
        if pointer is None and not out.degraded:
            if self.generation is None:   # nothing published yet: every row is the default
                n = sum(len(v) for v in missing.values())
                out.fetched += n
                out.defaults += n
                return out
            out.degraded = True   # the pointer vanished (Redis restarted empty): keep what we had
        with self._lock:   # degraded: expired entries are better than nothing
            for i in want:
                e = cache.get(i)
                if e is not None and e.vector is not None and len(e.vector) == dim:
                    out.vectors[missing[i]] = e.vector
                    out.hits += len(missing[i])
                else:
                    out.unavailable += len(missing[i])
                    out.defaults += len(missing[i])
        return out

    def _store(self, table: str, generation: int, ids: list[int], vecs: np.ndarray,
               found: np.ndarray, changes_before: int) -> None:
        with self._lock:
            if generation != self.generation:
                return
            # a change announced while we read may be older or newer than what we read: keep the
            # rows, but stale, so the next lookup reads them again
            at = time.monotonic() if self._changes == changes_before else 0.0
            cache = self._tables.setdefault(table, OrderedDict())
            for j, i in enumerate(ids):
                cache[i] = _Entry(vecs[j].copy() if found[j] else None, at)
                cache.move_to_end(i)
            while len(cache) > self.max_rows:
                cache.popitem(last=False)

    # --- freshness (one follower thread) ---------------------------------------------------------
    def follow(self, r: redis.Redis, block_ms: int = 500, count: int = 100) -> int:
        """Apply the next entries of the change stream; returns rows refreshed or dropped.
        ``r`` is a binary client whose socket timeout exceeds ``block_ms``."""
        if self._last_id is None:   # (re)start at the stream's tail
            tail = self.guard.call(r.xrevrange, names.EMB_CHANGES, count=1)
            self._last_id = tail[0][0] if tail else b"0-0"
        reply = self.guard.call(r.xread, {names.EMB_CHANGES: self._last_id}, block=block_ms, count=count)
        n = 0
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                self._last_id = entry_id
                n += self._apply(fields)
        return n

    def lost_stream(self) -> None:
        """After an outage the stream may be gone or trimmed: every row held is stale (still
        served while Redis is down), and following restarts at the tail."""
        with self._lock:
            for cache in self._tables.values():
                for e in cache.values():
                    e.at = 0.0
            self._changes += 1
        self._last_id = None

    def _apply(self, fields: dict[bytes, bytes]) -> int:
        try:
            gen, table = int(fields[b"g"]), fields[b"t"].decode()
            op, ids = fields[b"op"], np.frombuffer(fields[b"ids"], "<i8")
            clock_ms = int(fields.get(b"c", 0))
        except (KeyError, ValueError, UnicodeDecodeError):
            log.warning("malformed change-stream entry ignored: %r", list(fields))
            return 0
        n = self._apply_rows(gen, table, op, ids)
        if clock_ms and self.generation in (None, gen):   # Redis holds these rows now
            self.data_clock_ms = max(self.data_clock_ms, clock_ms)
        return n

    def data_age_s(self, now_ms: float | None = None) -> float | None:
        """Seconds between now and the event time of the newest sample behind the served rows
        (None before the first announcement): freshness as event -> served embeddings."""
        if not self.data_clock_ms:
            return None
        now_ms = time.time() * 1000 if now_ms is None else now_ms
        return max(0.0, (now_ms - self.data_clock_ms) / 1000)

    def _apply_rows(self, gen: int, table: str, op: bytes, ids: np.ndarray) -> int:
        pointer = self.guard.call(self.reader.pointer)
        with self._lock:
            self._changes += 1
            cache = self._tables.get(table)
            if gen != self.generation or not cache:
                return 0
            held = [i for i in ids.tolist() if i in cache]
            if op == b"del":
                for i in held:
                    cache[i] = _Entry(None, time.monotonic())
                self.applied += len(held)
                return len(held)
        if not held or pointer is None or pointer.generation != gen:
            return 0
        vecs, found = self.guard.call(self.reader.fetch, table, held, pointer.dim, pointer)
        with self._lock:
            if gen != self.generation:
                return 0
            now = time.monotonic()
            for j, i in enumerate(held):
                if i in cache:
                    cache[i] = _Entry(vecs[j].copy() if found[j] else None, now)
        self.applied += len(held)
        return len(held)
