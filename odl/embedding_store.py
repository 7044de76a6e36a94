"""Hot embedding rows in Redis: binary vectors in generations, a bounded hot set, chunked writes.

Layout (``odl.names``): row ``{odl:emb:g<G>:<table>}:<id>`` holds the vector's bytes (float32, or
float16 if configured); one hash tag per (generation, table), so a chunked MSET/MGET is one slot
on Redis Cluster.  ``{odl:emb}:current`` is a JSON pointer ``{generation, dim, dtype, dims}``:
``dims`` names the tables whose width is not ``dim`` (a feature spec's tables differ).

Consistency model
- Sparse deltas go into the *active* generation in place.  Each row is written whole (a chunk is
  one MSET, atomic on the server), so a reader sees every row either before or after a delta;
  rows of one request may straddle a delta, exactly as they straddle a training step.
- Anything that replaces the whole set (exporter start, a resync after the trainer restarted, a
  rollback to an older version's snapshot) is written into a *new* generation, which readers
  cannot see until ``activate`` flips the pointer in one SET.  The old generation is unlinked
  ``retire_after_s`` later, well after every reader's cached pointer has expired.
- Hot set bound: at most ``max_rows`` rows per table.  Above it, the rows least recently
  updated by training leave Redis first (``HotIndex``); a reader's miss is the default (zero)
  row, the same default training uses for an id it has not seen.
"""
from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import redis

from odl import names
from odl.redis_conn import node_client, used_memory

log = logging.getLogger("odl.exporter.embeddings")
CHUNK = 5000                 # rows per MGET (serving) and the most rows per MSET
CHUNK_BYTES = 256 * 1024     # an MSET carries about this much: big enough to amortise a round
#                              trip, small enough that the next chunk fits in the socket buffers
#                              while Redis executes this one (measured: dim 64 at 5000 rows a
#                              chunk pushed 0.7M rows/s, at ~900 rows 1.3M)


def chunk_rows(row_bytes: int) -> int:
    return max(200, min(CHUNK, CHUNK_BYTES // (row_bytes + 40)))   # ~40 bytes of key and framing
DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class Codec:
    """Rows as raw little-endian vectors of ``dtype``; reading always gives float32."""
    dtype: str = "float32"
    dim: int = 16

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"embedding dtype must be one of {DTYPES}, not {self.dtype!r}")

    @property
    def row_bytes(self) -> int:
        return self.dim * np.dtype(self.dtype).itemsize

    def encode(self, vectors: np.ndarray) -> list[bytes]:
        """One bytes object per row, without a Python loop over rows (a void view)."""
        arr = np.ascontiguousarray(vectors, dtype=np.dtype(self.dtype).newbyteorder("<"))
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ValueError(f"vectors must be [n, {self.dim}], got {list(arr.shape)}")
        return arr.view(np.dtype((np.void, self.row_bytes))).ravel().tolist()

    def decode_into(self, raw: list[bytes | None], out: np.ndarray, found: np.ndarray) -> None:
        dt = np.dtype(self.dtype).newbyteorder("<")
        if None not in raw:   # the common case: every row found, one buffer for all of them
            joined = b"".join(raw)
            if len(joined) == len(raw) * self.row_bytes:
                out[:] = np.frombuffer(joined, dtype=dt).reshape(len(raw), self.dim)
                found[:] = True
                return
        for k, b in enumerate(raw):
            if b is not None and len(b) == self.row_bytes:
                out[k] = np.frombuffer(b, dtype=dt)
                found[k] = True


class HotIndex:
    """Which ids of one table are in Redis and when training last updated them (a push tick).
    ``over(max_rows)`` names the coldest ids beyond the bound; evicting a little more than the
    excess (``slack``) keeps the O(n) selection off the per-push path."""

    def __init__(self):
        self._tick: dict[int, int] = {}
        self._now = 0

    def __len__(self) -> int:
        return len(self._tick)

    def touch(self, ids: list[int]) -> None:
        self._now += 1
        self._tick.update(dict.fromkeys(ids, self._now))

    def forget(self, ids: Iterable[int]) -> None:
        for i in ids:
            self._tick.pop(i, None)

    def sample(self, k: int) -> list[int]:
        return list(itertools.islice(self._tick, k))

    def over(self, max_rows: int, slack: float = 0.05) -> np.ndarray:
        if len(self._tick) <= max_rows:
            return np.empty(0, np.int64)
        target = int(max_rows * (1 - slack))
        ids = np.fromiter(self._tick.keys(), np.int64, len(self._tick))
        ticks = np.fromiter(self._tick.values(), np.int64, len(self._tick))
        n = len(ids) - target
        coldest = np.argpartition(ticks, n - 1)[:n]
        return ids[coldest]


@dataclass
class Pointer:
    generation: int
    dim: int
    dtype: str
    activated_at: float = field(default_factory=time.time)
    source: str = "stream"
    dims: dict[str, int] | None = None      # tables whose width is not ``dim``

    def dim_of(self, table: str) -> int:
        return (self.dims or {}).get(table, self.dim)

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @staticmethod
    def read(r: redis.Redis) -> "Pointer | None":
        raw = r.get(names.EMB_CURRENT)
        return Pointer(**json.loads(raw)) if raw else None


class HotEmbeddings:
    """The exporter's writer.  One instance owns the generations it creates."""

    def __init__(self, r: redis.Redis, dim: int, dtype: str = "float32", max_rows: int = 1_000_000,
                 retire_after_s: float = 10.0, chunk: int | None = None,
                 dims: dict[str, int] | None = None):
        """``dim``: every table's width, except those ``dims`` names (a feature spec's)."""
        self.r, self.codec, self.max_rows = r, Codec(dtype, dim), max_rows
        self.dims = {t: d for t, d in (dims or {}).items() if d != dim} or None
        self.codecs = {t: Codec(dtype, d) for t, d in (self.dims or {}).items()}
        self._chunk = chunk
        self.chunk = chunk or chunk_rows(self.codec.row_bytes)
        self.retire_after_s = retire_after_s
        self.index: dict[str, HotIndex] = {}
        self.active: int | None = None     # the generation deltas go into
        self.building: int | None = None   # a generation being filled, not yet visible
        self._retiring: list[tuple[int, float]] = []
        self.evicted = 0

    # --- generations ---------------------------------------------------------------------------
    def begin(self) -> int:
        """Start an invisible generation; ``push``/``delete`` write into it until ``activate``."""
        self.building = int(self.r.incr(names.EMB_NEXT_GENERATION))
        self._staged_index: dict[str, HotIndex] = {}
        return self.building

    def activate(self, source: str = "stream") -> int:
        """Flip readers to the generation being built (one SET), retire the previous one."""
        if self.building is None:
            raise RuntimeError("no generation is being built")
        gen, old = self.building, self.active
        if old is None:   # a restarted exporter: retire what its predecessor left current
            before = Pointer.read(self.r)
            old = before.generation if before else None
        self.r.set(names.EMB_CURRENT, Pointer(gen, self.codec.dim, self.codec.dtype,
                                              source=source, dims=self.dims).to_json())
        self.active, self.building, self.index = gen, None, self._staged_index
        if old is not None and old != gen:
            self._retiring.append((old, time.monotonic() + self.retire_after_s))
        log.info("embedding generation %d active (%s)", gen, source)
        return gen

    def _target(self) -> tuple[int, dict[str, HotIndex]]:
        if self.building is not None:
            return self.building, self._staged_index
        if self.active is None:
            raise RuntimeError("no active generation: begin() and activate() first")
        return self.active, self.index

    def collect(self, force: bool = False) -> int:
        """Unlink retired generations whose grace period is over; returns keys unlinked."""
        now, n, keep = time.monotonic(), 0, []
        for gen, due in self._retiring:
            if force or now >= due:
                n += drop_generation(self.r, gen)
            else:
                keep.append((gen, due))
        self._retiring = keep
        return n

    def drop_orphans(self) -> list[int]:
        """Generations nobody reads or builds (left by a crashed exporter): retire them."""
        current = Pointer.read(self.r)
        live = {current.generation if current else None, self.active, self.building,
                *(g for g, _ in self._retiring)}
        orphans = sorted({names.emb_generation_of(m) for m in
                          self.r.scan_iter(match=names.EMB_META_PATTERN, count=1000)} - live)
        self._retiring += [(g, time.monotonic() + self.retire_after_s) for g in orphans]
        return orphans

    # --- rows ----------------------------------------------------------------------------------
    def push(self, table: str, ids: np.ndarray, vectors: np.ndarray,
             clock_ms: int | None = None) -> int:
        """Write rows in chunked MSETs; returns rows written.  ``clock_ms``: the event time of
        the newest sample the rows learned from, announced with them (serving's data age)."""
        gen, index = self._target()
        prefix = names.emb_prefix(table, gen)
        id_list = np.asarray(ids, dtype=np.int64).tolist()
        codec = self.codecs.get(table, self.codec)
        chunk = self._chunk or chunk_rows(codec.row_bytes)
        values = codec.encode(vectors)
        if len(values) != len(id_list):
            raise ValueError(f"{len(id_list)} ids but {len(values)} vectors")
        meta = names.emb_meta(table, gen)   # first, so that a crash mid-push leaves a findable set
        self.r.hset(meta, mapping={"dim": codec.dim, "dtype": codec.dtype})
        with _Pipelined(node_client(self.r, prefix)) as conn:   # one slot: the table's tag
            for start in range(0, len(id_list), chunk):
                part = id_list[start:start + chunk]
                args: list = [None] * (2 * len(part))
                args[::2] = [prefix + str(i) for i in part]
                args[1::2] = values[start:start + chunk]
                conn.send("MSET", args)
            index.setdefault(table, HotIndex()).touch(id_list)   # while the last chunk runs
        self.r.hset(meta, "rows", len(index[table]))
        self._announce(gen, table, "put", id_list, clock_ms)
        return len(id_list)

    def delete(self, table: str, ids: Iterable[int]) -> int:
        gen, index = self._target()
        id_list = [int(i) for i in ids]
        n = 0
        for start in range(0, len(id_list), self.chunk):
            part = id_list[start:start + self.chunk]
            n += int(self.r.unlink(*[names.emb_key(table, gen, i) for i in part]))
        if table in index:
            index[table].forget(id_list)
        self._announce(gen, table, "del", id_list)
        return n

    def _announce(self, gen: int, table: str, op: str, ids: list[int],
                  clock_ms: int | None = None) -> None:
        """Tell readers' caches which rows of the *visible* generation changed (a generation
        being built is invisible: its activation makes readers drop their caches anyway), and
        as of which event time (``c``)."""
        if gen != self.active or self.building is not None or not ids:
            return
        entry = {"g": gen, "t": table, "op": op, "ids": np.asarray(ids, "<i8").tobytes()}
        if clock_ms:
            entry["c"] = int(clock_ms)
        self.r.xadd(names.EMB_CHANGES, entry, maxlen=names.EMB_CHANGES_MAXLEN, approximate=True)

    def enforce_bound(self) -> int:
        """Evict the coldest rows of every table above ``max_rows``; returns rows evicted."""
        _, index = self._target()
        n = 0
        for table, idx in index.items():
            cold = idx.over(self.max_rows)
            if len(cold):
                n += self.delete(table, cold.tolist())
        self.evicted += n
        return n

    def restore(self, tables: dict[str, tuple[np.ndarray, np.ndarray]], source: str) -> int:
        """A whole set (a version's snapshot) into a new generation, then made visible."""
        self.begin()
        for table, (ids, vectors) in tables.items():
            self.push(table, ids, vectors)
        self.enforce_bound()
        return self.activate(source)

    # --- reporting -----------------------------------------------------------------------------
    def memory(self) -> dict:
        """Redis memory and what the hot set holds: server ``used_memory`` and, per table, rows
        and their estimated bytes (``MEMORY USAGE`` of a few sampled rows times the row count)."""
        out = {"redis_used_memory_bytes": used_memory(self.r),
               "generation": self.active, "dtype": self.codec.dtype, "tables": {}}
        for table, idx in self.index.items():
            rows = len(idx)
            sample = idx.sample(8)
            sizes = [self.r.memory_usage(names.emb_key(table, self.active, i)) or 0 for i in sample]
            per_row = float(np.mean(sizes)) if sizes else 0.0
            out["tables"][table] = {"rows": rows, "bytes_estimate": int(per_row * rows),
                                    "bytes_per_row": round(per_row, 1)}
        return out


class _Pipelined:
    """Chunks sent on one connection with up to ``in_flight`` replies outstanding: Redis
    executes chunk k while this process builds the next (a synchronous MSET per chunk leaves both sides idle half the
    time).  Any error drops the connection, whose state is then unknown."""

    def __init__(self, r: redis.Redis, in_flight: int = 3):
        self.pool, self.in_flight, self.pending = r.connection_pool, in_flight, 0

    def __enter__(self) -> "_Pipelined":
        self.conn = self.pool.get_connection("MSET")
        return self

    def send(self, command: str, args: list) -> None:
        self.conn.send_command(command, *args)
        self.pending += 1
        if self.pending >= self.in_flight:
            self._reply()

    def _reply(self) -> None:
        self.pending -= 1
        reply = self.conn.read_response()
        if isinstance(reply, Exception):
            raise reply

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                while self.pending:
                    self._reply()
        except BaseException:
            self.conn.disconnect()
            raise
        else:
            if exc_type is not None:
                self.conn.disconnect()
        finally:
            self.pool.release(self.conn)


def drop_generation(r: redis.Redis, generation: int) -> int:
    """Unlink every key of one generation (SCAN per table pattern; UNLINK frees in background)."""
    n = 0
    batch: list[bytes] = []
    for key in r.scan_iter(match=names.emb_generation_pattern(generation), count=5000):
        batch.append(key)
        if len(batch) >= CHUNK:
            n += int(r.unlink(*batch))
            batch = []
    if batch:
        n += int(r.unlink(*batch))
    return n


class EmbeddingReader:
    """Serving's side: follows the current pointer (cached ``pointer_ttl_s``; the exporter keeps
    a retired generation for longer than that) and reads rows in chunked MGETs."""

    def __init__(self, r: redis.Redis, pointer_ttl_s: float = 0.5):
        self.r, self.ttl = r, pointer_ttl_s
        self._pointer: Pointer | None = None
        self._read_at = -1e9

    def pointer(self) -> Pointer | None:
        if time.monotonic() - self._read_at >= self.ttl:
            self._pointer, self._read_at = Pointer.read(self.r), time.monotonic()
        return self._pointer

    def fetch(self, table: str, ids: list[int], dim: int,
              pointer: Pointer | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(vectors [n, dim] float32, found [n]); a miss, or a set of another dim, is zeros.
        ``pointer`` pins the generation read (a cache filling rows of the generation it holds)."""
        out = np.zeros((len(ids), dim), dtype=np.float32)
        found = np.zeros(len(ids), dtype=bool)
        p = pointer or self.pointer()
        if p is None or p.dim_of(table) != dim or not ids:
            return out, found
        codec, prefix = Codec(p.dtype, dim), names.emb_prefix(table, p.generation)
        for start in range(0, len(ids), CHUNK):
            part = ids[start:start + CHUNK]
            raw = self.r.mget([prefix + str(int(i)) for i in part])
            codec.decode_into(raw, out[start:start + len(part)], found[start:start + len(part)])
        return out, found

    def count(self, table: str) -> int:
        """Rows of ``table`` in the current generation (SCAN: for tests and the demo report)."""
        p = self.pointer()
        if p is None:
            return 0
        return sum(1 for k in self.r.scan_iter(match=names.emb_prefix(table, p.generation) + "*",
                                               count=10000) if not k.endswith(b":meta"))
