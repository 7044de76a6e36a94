"""Dynamic, collisionless embedding tables (the Monolith / DeepRec idea, in plain TensorFlow).

An id reaches its row through a hash map (a Python dict), never through a modulo, so no two ids
ever share a trainable row.  The table's storage is a ``tf.Variable`` of shape ``[None, dim]``
that doubles when it fills, up to ``capacity + 1`` rows; the optimiser's slot variables grow with
it.  Row 0 is the shared default: zeros, never trained, used by ids not (yet) admitted, and by
serving for ids it does not know.

Lifecycle of an id (``EmbeddingTableConfig``):

* **admission** -- it gets a row once seen ``admit_min_count`` times, then at each sighting with
  probability ``admit_probability`` (decided by a hash of id and sighting, so a replay decides
  the same).  Until then its sightings are counted in a bounded filter.
* **training** -- every batch that contains it updates its row and its slots (sparse optimiser),
  its frequency and last-seen event time.
* **eviction** -- rows not seen for ``ttl_s`` of event time (``expire``), and, when all
  ``capacity`` rows are taken, the least frequently used 1/64 of them.  A freed row is
  re-initialised before reuse; the eviction is logged so exporters can delete the id downstream.

Every row carries the step that last changed it, so "what changed since mark M" is one vectorised
comparison (the exporter's deltas and incremental checkpoints both ask it).
"""
from __future__ import annotations

import threading
from collections import deque
from itertools import repeat
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from odl.config import EmbeddingTableConfig
from trainers.sparse_optim import SparseOptimizer

EVICT_FRACTION = 64          # a full table frees capacity / 64 rows at once (amortised LFU)
REMOVAL_LOG_STEPS = 200_000  # evictions are remembered this many steps for delta readers
EXPIRE_EVERY_STEPS = 200     # training steps between TTL sweeps
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A fast, well-mixed 64-bit hash (vectorised); the basis of every deterministic choice here."""
    with np.errstate(over="ignore"):
        z = (x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)) & _M64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        return z ^ (z >> np.uint64(31))


def _unit(h: np.ndarray) -> np.ndarray:
    """uint64 hashes -> uniform floats in (0, 1)."""
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def initial_vectors(ids: np.ndarray, dim: int, seed: int, stddev: float) -> np.ndarray:
    """Normal(0, stddev) vectors that depend only on (seed, id): a replay, a restore or another
    shard initialises an id identically."""
    ids = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        base = splitmix64(ids ^ splitmix64(np.full(len(ids), seed, np.uint64)))
        j = np.arange(2 * ((dim + 1) // 2), dtype=np.uint64)
        h = splitmix64((base[:, None] + j[None, :] * np.uint64(0x632BE59BD9B4E019)) & _M64)
    u = _unit(h)
    u1, u2 = u[:, 0::2], u[:, 1::2]
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)], axis=1)[:, :dim]
    return (stddev * z).astype(np.float32)


@dataclass
class TableStats:
    admitted: int = 0
    evicted_ttl: int = 0
    evicted_lfu: int = 0
    default_lookups: int = 0   # sightings served by the default row (not admitted)
    grown: int = 0


class DynamicEmbedding:
    def __init__(self, name: str, cfg: EmbeddingTableConfig, optimizer: SparseOptimizer, seed: int):
        self.name, self.cfg, self.opt, self.seed = name, cfg, optimizer, seed
        self.dim = cfg.dim
        n = max(2, min(cfg.initial_rows, cfg.capacity + 1))
        spec = tf.TensorShape([None, self.dim])
        self.var = tf.Variable(tf.zeros([n, self.dim]), shape=spec, name=f"{name}_emb")
        self.slots = {s: tf.Variable(tf.fill([n, self.dim], optimizer.slot_init(s)), shape=spec,
                                     name=f"{name}_{s}") for s in optimizer.slot_names}
        self._rows: dict[int, int] = {}
        self.row_id = np.full(n, -1, np.int64)        # id of each row, -1 = free (row 0: default)
        self.freq = np.zeros(n, np.int64)
        self.last_seen = np.zeros(n, np.int64)        # event time, ms
        self.version = np.zeros(n, np.int64)          # step of the last change
        self._free: list[int] = []
        self._next = 1                                # first never-used row
        self._pending: dict[int, list[int]] = {}      # id -> [sightings, last seen ms]
        self._removed: deque[tuple[int, np.ndarray]] = deque()  # (step, evicted ids)
        self._log_horizon = 0                         # evictions up to this step are forgotten
        self.stats = TableStats()
        self.lock = threading.RLock()

    # --- sizes ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._rows)

    @property
    def allocated(self) -> int:
        return len(self.row_id)

    def occupancy(self) -> dict[str, int]:
        s = self.stats
        return {"rows": len(self._rows), "allocated": self.allocated, "capacity": self.cfg.capacity,
                "pending": len(self._pending), "admitted": s.admitted, "evicted_ttl": s.evicted_ttl,
                "evicted_lfu": s.evicted_lfu, "default_lookups": s.default_lookups}

    # --- lookups ----------------------------------------------------------------------------
    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Rows for scoring or serving: never admits; unknown ids get the default row 0."""
        ids = np.asarray(ids).tolist()
        with self.lock:   # one dict lookup per id at C speed (map), not a generator's frame
            return np.fromiter(map(self._rows.get, ids, repeat(0, len(ids))), np.int64, len(ids))

    def lookup_train(self, ids: np.ndarray, clock_ms: int, step: int, with_known: bool = False):
        """Rows for a training batch at event time ``clock_ms``; admits, counts, marks the rows
        as changed at ``step`` (the caller updates them in that step).  ``with_known`` also
        returns, per id, whether it had a row before this call (scoring as before the update).

        The ids that have rows are looked up at once; only the others (admission, allocation)
        take a Python step each.  An allocation that must evict never takes a row this batch
        uses."""
        with self.lock:
            uniq, inverse, counts = np.unique(np.asarray(ids, np.int64), return_inverse=True,
                                              return_counts=True)
            ul = uniq.tolist()
            urows = np.fromiter(map(self._rows.get, ul, repeat(0, len(ul))), np.int64, len(ul))
            known = urows > 0
            missing = np.flatnonzero(~known).tolist()
            if missing:
                fresh: list[tuple[int, int]] = []
                protect = set(urows[known].tolist())
                for k in missing:
                    i, n = ul[k], int(counts[k])
                    if self._admit(i, n, clock_ms):
                        r = self._allocate(i, protect, step)
                        fresh.append((r, i))
                        urows[k] = r
                        protect.add(r)
                    else:
                        self.stats.default_lookups += n
                if fresh:
                    self._initialise(fresh)
            hit = urows > 0
            rows = urows[hit]
            self.freq[rows] += counts[hit]
            self.last_seen[rows] = np.maximum(self.last_seen[rows], clock_ms)
            self.version[rows] = step
            return (urows[inverse], known[inverse]) if with_known else urows[inverse]

    # --- admission --------------------------------------------------------------------------
    def _admit(self, i: int, n: int, clock_ms: int) -> bool:
        cfg = self.cfg
        if cfg.admit_min_count <= 1 and cfg.admit_probability >= 1.0:
            self.stats.admitted += 1
            return True
        seen, _ = self._pending.get(i, (0, 0))
        now = seen + n
        ok = now >= cfg.admit_min_count
        if ok and cfg.admit_probability < 1.0:
            first = max(seen + 1, cfg.admit_min_count)
            sightings = np.arange(first, now + 1, dtype=np.uint64)
            h = splitmix64(splitmix64(np.full(len(sightings), i & 0xFFFFFFFFFFFFFFFF, np.uint64)
                                        ^ np.uint64(self.seed)) + sightings)
            ok = bool((_unit(h) < cfg.admit_probability).any())
        if ok:
            self._pending.pop(i, None)
            self.stats.admitted += 1
            return True
        self._pending[i] = [now, clock_ms]
        if len(self._pending) > cfg.filter_capacity:
            self._trim_filter()
        return False

    def _trim_filter(self) -> None:
        """Forget the stalest quarter of the waiting ids (by last sighting)."""
        items = sorted(self._pending.items(), key=lambda kv: kv[1][1])
        for i, _ in items[: max(1, len(items) // 4)]:
            del self._pending[i]

    # --- rows -------------------------------------------------------------------------------
    def _allocate(self, i: int, protect: set[int], step: int) -> int:
        if not self._free:
            if self._next < self.allocated:
                self._free.append(self._next)
                self._next += 1
            elif self.allocated - 1 < self.cfg.capacity:
                self._grow()
                return self._allocate(i, protect, step)
            else:
                self._evict_lfu(protect, step)
        r = self._free.pop()
        self._rows[i] = r
        self.row_id[r] = i
        self.freq[r] = 0
        self.last_seen[r] = 0
        return r

    def _grow(self) -> None:
        old = self.allocated
        new = min(self.cfg.capacity + 1, 2 * old)
        extra = new - old
        self.var.assign(tf.concat([self.var, tf.zeros([extra, self.dim])], axis=0))
        for s, v in self.slots.items():
            v.assign(tf.concat([v, tf.fill([extra, self.dim], self.opt.slot_init(s))], axis=0))
        self.row_id = np.concatenate([self.row_id, np.full(extra, -1, np.int64)])
        for a in ("freq", "last_seen", "version"):
            setattr(self, a, np.concatenate([getattr(self, a), np.zeros(extra, np.int64)]))
        self.stats.grown += 1

    def _initialise(self, fresh: list[tuple[int, int]]) -> None:
        rows = np.array([r for r, _ in fresh], np.int64)
        ids = np.array([i for _, i in fresh], np.int64)
        self._write_rows(rows, initial_vectors(ids, self.dim, self.seed, self.cfg.init_stddev),
                         {s: np.full((len(rows), self.dim), self.opt.slot_init(s), np.float32)
                          for s in self.slots})

    def _write_rows(self, rows: np.ndarray, vectors: np.ndarray, slots: dict[str, np.ndarray]) -> None:
        idx = tf.constant(rows[:, None])
        self.var.scatter_nd_update(idx, tf.constant(vectors, tf.float32))
        for s, v in self.slots.items():
            v.scatter_nd_update(idx, tf.constant(slots[s], tf.float32))

    def _evict_rows(self, rows: np.ndarray, step: int) -> None:
        if not len(rows):
            return
        ids = self.row_id[rows].copy()
        for i in ids.tolist():
            del self._rows[i]
        self.row_id[rows] = -1
        self.freq[rows] = 0
        self._free.extend(rows.tolist())
        self._removed.append((step, ids))
        while self._removed and self._removed[0][0] < step - REMOVAL_LOG_STEPS:
            self._log_horizon = self._removed.popleft()[0]

    def _evict_lfu(self, protect: set[int], step: int) -> None:
        used = np.nonzero(self.row_id >= 0)[0]
        if protect:
            used = used[~np.isin(used, np.fromiter(protect, np.int64, len(protect)))]
        k = min(len(used), max(1, self.cfg.capacity // EVICT_FRACTION))
        if k == 0:
            raise RuntimeError(f"table {self.name}: capacity {self.cfg.capacity} is smaller than "
                               "the distinct ids of one batch")
        # least frequent first, then least recently seen, then by id: a choice made on ids, not
        # on row numbers, so a restored table (rows placed differently) evicts the same ids
        order = np.lexsort((self.row_id[used], self.last_seen[used], self.freq[used]))
        victims = used[order[:k]]
        self._evict_rows(victims, step)
        self.stats.evicted_lfu += k

    def expire(self, clock_ms: int, step: int) -> int:
        """Evict rows (and forget waiting ids) not seen for ``ttl_s`` of event time."""
        if self.cfg.ttl_s is None:
            return 0
        limit = clock_ms - int(self.cfg.ttl_s * 1000)
        with self.lock:
            stale = np.nonzero((self.row_id >= 0) & (self.last_seen < limit))[0]
            self._evict_rows(stale, step)
            self.stats.evicted_ttl += len(stale)
            for i in [i for i, (_, seen) in self._pending.items() if seen < limit]:
                del self._pending[i]
            return len(stale)

    # --- deltas -----------------------------------------------------------------------------
    def changed_since(self, mark: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
        """(ids, rows changed after step ``mark``, ids evicted after it, complete).  ``complete``
        is False when evictions that old are no longer remembered: the reader must resync."""
        with self.lock:
            rows = np.nonzero((self.row_id >= 0) & (self.version > mark))[0]
            removed = [ids for s, ids in self._removed if s > mark]
            complete = mark >= self._log_horizon
            gone = np.concatenate(removed) if removed else np.zeros(0, np.int64)
            # an id evicted and re-admitted after the mark is an upsert, not a removal
            gone = gone[~np.isin(gone, self.row_id[rows])] if len(rows) else gone
            return self.row_id[rows].copy(), rows, np.unique(gone), complete

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        if not len(rows):
            return np.zeros((0, self.dim), np.float32)
        return tf.gather(self.var, rows).numpy()

    # --- state (checkpoints) ----------------------------------------------------------------
    def state(self, since: int | None = None) -> dict[str, np.ndarray]:
        """Everything needed to rebuild the table: all rows (``since=None``) or those changed
        after step ``since`` plus the ids evicted since (an increment).  Row numbers are not
        saved: a restore may place ids in other rows."""
        with self.lock:
            if since is None:
                rows = np.nonzero(self.row_id >= 0)[0]
                gone = np.zeros(0, np.int64)
            else:
                _, rows, gone, _ = self.changed_since(since)
            pend = np.array([[i, c, t] for i, (c, t) in self._pending.items()], np.int64).reshape(-1, 3)
            out = {"ids": self.row_id[rows].copy(), "vectors": self.vectors(rows),
                   "freq": self.freq[rows].copy(), "last_seen": self.last_seen[rows].copy(),
                   "version": self.version[rows].copy(), "removed": gone, "pending": pend,
                   "stats": np.array([self.stats.admitted, self.stats.evicted_ttl,
                                      self.stats.evicted_lfu, self.stats.default_lookups,
                                      self.stats.grown], np.int64)}
            for s, v in self.slots.items():
                out[f"slot_{s}"] = tf.gather(v, rows).numpy() if len(rows) else np.zeros((0, self.dim), np.float32)
            return out

    def load(self, state: dict[str, np.ndarray], increment: bool = False) -> None:
        """Apply a full state (replacing everything) or an increment (upserts and removals)."""
        with self.lock:
            if not increment:
                self._reset()
            gone = [self._rows[i] for i in state["removed"].tolist() if i in self._rows]
            if gone:
                g = np.array(gone, np.int64)
                for i in self.row_id[g].tolist():
                    del self._rows[i]
                self.row_id[g] = -1
                self.freq[g] = 0
                self._free.extend(gone)
            ids = state["ids"]
            rows = np.empty(len(ids), np.int64)
            for k, i in enumerate(ids.tolist()):
                r = self._rows.get(i)
                if r is None:
                    r = self._allocate(i, set(), 0)
                rows[k] = r
            if len(rows):
                self._write_rows(rows, state["vectors"],
                                 {s: state[f"slot_{s}"] for s in self.slots})
                self.freq[rows] = state["freq"]
                self.last_seen[rows] = state["last_seen"]
                self.version[rows] = state["version"]
            self._pending = {int(i): [int(c), int(t)] for i, c, t in state["pending"].tolist()}
            st = state["stats"].tolist()
            self.stats = TableStats(*st)

    def forget_history(self, step: int) -> None:
        """After a restore: evictions before ``step`` are unknown, so older delta marks resync."""
        self._removed.clear()
        self._log_horizon = step

    def _reset(self) -> None:
        self._rows.clear()
        self.row_id[:] = -1
        self.freq[:] = 0
        self.last_seen[:] = 0
        self.version[:] = 0
        self._free = []
        self._next = 1
        self._removed.clear()
        self._log_horizon = 0
