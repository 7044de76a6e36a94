"""Parameter-server shards for scaled-out training: the embedding tables split by id hash.

Shard k of S owns, for every table, the ids with ``shard_of(id, S) == k`` as a
``DynamicEmbedding`` with ``capacity / S`` rows and the same seed as an unsharded table: ids get
the same initial vectors, admission decisions and optimiser updates wherever they live, so S
shards compute what one table would (``tests/unit/test_ps.py`` checks this step for step).

A trainer's ``ShardedCTRModel`` looks up a batch's ids (one call per shard for all tables,
admitting them), scores and trains the dense network on the vectors, and sends the gradients
back summed per id (one more call per shard).  ``ShardedTables`` is that client; its shards are
``EmbeddingShard`` objects in-process or Ray actor handles running the same class.

Each shard counts its own ``version``: every training lookup and every gradient application
stamps the rows it touches with a new one, so "rows changed since mark M" (exporter deltas,
incremental checkpoints) never misses an update, whichever trainer made it.  A shard checkpoints
itself when the training group asks (``checkpoint(epoch, kind)``) and restores the group's
committed epoch when it starts (``trainers.group``).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from odl.config import TrainerConfig
from trainers import sparse_optim
from trainers.checkpoint import CheckpointInfo, CheckpointStore
from trainers.embedding import EXPIRE_EVERY_STEPS, DynamicEmbedding, splitmix64
from trainers.model import SPARSE_TABLES, Batch, CTRModel, Mark, new_incarnation, table_changes

Lookup = dict[str, tuple[np.ndarray, np.ndarray]]   # table -> (vectors, known before the call)


def shard_of(ids: np.ndarray, shards: int) -> np.ndarray:
    """The shard of each id: a hash, not ``id % S`` (sequential ids would pile up otherwise)."""
    return (splitmix64(np.asarray(ids, np.int64).astype(np.uint64)) % np.uint64(shards)).astype(np.int64)


class EmbeddingShard:
    def __init__(self, cfg: TrainerConfig, index: int, count: int, store_dir: Path | None = None,
                 epoch: int | None = None):
        self.index, self.count = index, count
        opt = sparse_optim.make(cfg.sparse_optimizer, cfg.sparse_learning_rate)
        self.tables = {}
        for k, name in enumerate(SPARSE_TABLES):
            tc = cfg.tables[name]
            part = tc.model_copy(update={"capacity": max(1, -(-tc.capacity // count))})
            self.tables[name] = DynamicEmbedding(name, part, opt, cfg.seed * 1000 + k)
        self._apply = {name: self._compile(t) for name, t in self.tables.items()}
        self.version = 0       # this shard's change counter (marks for deltas and increments)
        self.incarnation = new_incarnation()   # renewed by every load: readers' marks expire
        self.clock_ms = 0      # newest event time seen (TTL eviction)
        self._lookups = 0
        self.store = CheckpointStore(store_dir, cfg.checkpoint.keep_full) if store_dir else None
        self.last_ckpt: CheckpointInfo | None = None
        self._ckpt_version = 0
        if self.store is not None:
            self._restore(epoch)

    @staticmethod
    def _compile(t: DynamicEmbedding):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.int64),
                                      tf.TensorSpec([None, t.dim], tf.float32),
                                      tf.TensorSpec([], tf.int64)])
        def apply(rows, grads, step):
            t.opt.apply(t.var, t.slots, rows, grads, step)
        return apply

    # --- training ----------------------------------------------------------------------------
    def lookup(self, ids: dict[str, np.ndarray], clock_ms: int, train: bool) -> Lookup:
        """{table: (vectors of ``ids`` in order, whether each id had a row before this call)}.
        ``train`` admits and counts each occurrence as a sighting, as a local table does."""
        if train:
            self.version += 1
            self.clock_ms = max(self.clock_ms, clock_ms)
        out = {}
        for name, table_ids in ids.items():
            t = self.tables[name]
            if train:
                rows, known = t.lookup_train(table_ids, clock_ms, self.version, with_known=True)
            else:
                rows = t.rows_of(table_ids)
                known = rows > 0
            out[name] = (t.vectors(rows), known)
        if train:
            self._lookups += 1
            if self._lookups % EXPIRE_EVERY_STEPS == 0:
                for t in self.tables.values():
                    t.expire(self.clock_ms, self.version)
        return out

    def apply(self, grads: dict[str, tuple[np.ndarray, np.ndarray]], step: int) -> None:
        """Apply gradients summed per unique id; ids without a row (not admitted) are skipped.
        ``step`` is the trainer's (the optimiser's bias correction counts its steps)."""
        self.version += 1
        for name, (ids, g) in grads.items():
            t = self.tables[name]
            with t.lock:
                rows = t.rows_of(ids)
                keep = rows > 0
                if keep.any():
                    t.version[rows[keep]] = self.version
                    self._apply[name](tf.constant(rows[keep]), tf.constant(g[keep], tf.float32),
                                      tf.constant(step, tf.int64))

    # --- reading -----------------------------------------------------------------------------
    def changes(self, since: Mark | int) -> tuple[Mark, dict[str, dict]]:
        """(mark, {table: {ids, vectors, removed, complete}}) of rows changed after ``since``
        (``model.table_changes``: a mark from before a restore gets every row, incomplete)."""
        return table_changes(self.tables, since, self.incarnation, self.version)

    def occupancy(self) -> dict[str, dict[str, int]]:
        return {name: t.occupancy() for name, t in self.tables.items()}

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this actor runs on (where a group's members landed)."""
        import ray
        return ray.get_runtime_context().get_node_id()

    # --- state -------------------------------------------------------------------------------
    def state(self, since: int | None = None) -> dict[str, dict[str, np.ndarray]]:
        out = {f"table_{name}": t.state(since) for name, t in self.tables.items()}
        out["shard"] = {"version": np.array(self.version, np.int64),
                        "clock_ms": np.array(self.clock_ms, np.int64),
                        "lookups": np.array(self._lookups, np.int64)}
        return out

    def load(self, state: dict[str, dict[str, np.ndarray]], increment: bool = False) -> None:
        for name, t in self.tables.items():
            t.load(state[f"table_{name}"], increment=increment)
        self.incarnation = new_incarnation()
        if "shard" in state:
            self.version = int(state["shard"]["version"])
            self.clock_ms = int(state["shard"]["clock_ms"])
            self._lookups = int(state["shard"]["lookups"])

    def checkpoint(self, epoch: int, kind: str) -> dict[str, Any]:
        """Write this shard's part of group epoch ``epoch`` (the group's trainers are held)."""
        if self.store is None:
            raise RuntimeError("this shard has no checkpoint directory")
        if self.last_ckpt is None:
            kind = "full"   # an increment needs a base
        t0 = time.perf_counter()
        since = None if kind == "full" else self._ckpt_version
        meta = {"epoch": epoch, "version": self.version, "shard": self.index, "shards": self.count}
        info = self.store.write(kind, self.state(since), meta,
                                base=None if kind == "full" else self.last_ckpt.seq)
        self.last_ckpt, self._ckpt_version = info, self.version
        return {"kind": info.kind, "seconds": time.perf_counter() - t0, "bytes": info.size_bytes}

    def _restore(self, epoch: int | None) -> None:
        """Restore the group's committed ``epoch``; forget what was written after it."""
        self.store.discard_after(epoch)
        if epoch is None:
            return
        chain = self.store.restore_chain(epoch)
        for k, (_, groups) in enumerate(chain):
            self.load(groups, increment=k > 0)
        for t in self.tables.values():
            t.forget_history(self.version)
        self.last_ckpt = chain[-1][0]
        self._ckpt_version = self.version


class ShardedTables:
    """A trainer's view of the shards: split a batch's ids by shard, gather, scatter back."""

    def __init__(self, shards: list[Any], remote: bool = False):
        self.shards, self.remote = shards, remote
        self._unconfirmed: list[Any] = []   # refs of applies not yet known to have succeeded

    def _call_all(self, method: str, per_shard: list[tuple], wait: bool = True) -> list:
        """Call ``method`` on every shard with its arguments (None: skip it); results in order
        (``wait=False``: the remote calls' refs)."""
        calls = []
        for s, args in zip(self.shards, per_shard):
            if args is not None:
                f = getattr(s, method)
                calls.append(f.remote(*args) if self.remote else f(*args))
        if self.remote and wait:
            import ray
            return ray.get(calls)
        return calls

    def flush(self) -> None:
        """Wait until every gradient sent so far is applied (raises if a shard failed)."""
        if self._unconfirmed:
            import ray
            refs, self._unconfirmed = self._unconfirmed, []
            ray.get(refs)

    def _split(self, ids: np.ndarray) -> list[np.ndarray]:
        owner = shard_of(ids, len(self.shards))
        return [np.nonzero(owner == k)[0] for k in range(len(self.shards))]

    def lookup(self, ids: dict[str, np.ndarray], dim: int, clock_ms: int, train: bool) -> Lookup:
        """{table: (vectors [n, dim], known [n])} for each table's ids in their order.  Each
        shard gets its ids with their repeats: a sighting counts once per occurrence."""
        ids = {t: np.asarray(v, np.int64) for t, v in ids.items()}
        parts = {t: self._split(v) for t, v in ids.items()}
        args = []
        for k in range(len(self.shards)):
            mine = {t: ids[t][parts[t][k]] for t in ids if len(parts[t][k])}
            args.append((mine, clock_ms, train) if mine else None)
        if len(self._unconfirmed) > 2 * len(self.shards):   # surface a failed apply soon
            self.flush()
        results = iter(self._call_all("lookup", args))
        out = {t: (np.zeros((len(v), dim), np.float32), np.zeros(len(v), bool)) for t, v in ids.items()}
        for k, a in enumerate(args):
            if a is None:
                continue
            for t, (vecs, known) in next(results).items():
                out[t][0][parts[t][k]] = vecs
                out[t][1][parts[t][k]] = known
        return out

    def apply(self, grads: dict[str, tuple[np.ndarray, np.ndarray]], step: int) -> None:
        """Sum per-sample gradients per id and send each shard its part.  Remote applies are not
        waited for: a shard runs one caller's calls in order, so this trainer's next lookup sees
        them; ``flush`` confirms them (before a checkpoint, and every few steps)."""
        summed = {}
        for t, (ids, g) in grads.items():
            # in sample order, as TF's segment sum in a local table's step: the same float sums
            uniq, inverse = np.unique(np.asarray(ids, np.int64), return_inverse=True)
            s = np.zeros((len(uniq), g.shape[1]), np.float32)
            np.add.at(s, inverse, g)
            summed[t] = (uniq, s, self._split(uniq))
        args = []
        for k in range(len(self.shards)):
            mine = {t: (u[p[k]], s[p[k]]) for t, (u, s, p) in summed.items() if len(p[k])}
            args.append((mine, step) if mine else None)
        refs = self._call_all("apply", args, wait=False)
        if self.remote:
            self._unconfirmed.extend(refs)

    def changes(self, since: list[Mark] | int) -> tuple[list[Mark], dict[str, dict]]:
        """Every shard's changes after its mark in ``since`` (0 or a list from a previous call:
        one mark per shard), merged per table; returns the new marks."""
        marks = since if isinstance(since, list) and len(since) == len(self.shards) else [0] * len(self.shards)
        got = self._call_all("changes", [(m,) for m in marks])
        merged: dict[str, dict] = {}
        for _, tables in got:
            for name, c in tables.items():
                m = merged.setdefault(name, {"ids": [], "vectors": [], "removed": [], "complete": True})
                for key in ("ids", "vectors", "removed"):
                    m[key].append(c[key])
                m["complete"] = m["complete"] and c["complete"]
        for m in merged.values():
            for key in ("ids", "vectors", "removed"):
                m[key] = np.concatenate(m[key])
        return [mark for mark, _ in got], merged

    def occupancy(self) -> dict[str, dict[str, int]]:
        total: dict[str, dict[str, int]] = {}
        for occ in self._call_all("occupancy", [()] * len(self.shards)):
            for name, o in occ.items():
                t = total.setdefault(name, {})
                for key, v in o.items():
                    t[key] = t.get(key, 0) + v
        return total


class ShardedCTRModel(CTRModel):
    """The CTR model with its embedding tables in parameter-server shards: the dense network and
    its optimiser stay in this process; a step is one lookup and one apply round trip."""

    def __init__(self, cfg: TrainerConfig, remote: ShardedTables):
        self.remote = remote
        super().__init__(cfg)

    def _make_tables(self) -> dict[str, DynamicEmbedding]:
        return {}

    def _ids(self, batch: Batch) -> dict[str, np.ndarray]:
        return {"user": batch.user_ids, "item": batch.item_ids}

    def predict(self, batch: Batch) -> np.ndarray:
        got = self.remote.lookup(self._ids(batch), self.cfg.embedding_dim, 0, train=False)
        return self._predict_vectors(got["user"][0], got["item"][0], *self._context(batch)).numpy()

    def train(self, batch: Batch) -> float:
        return self._step(batch, score=False)[1]

    def score_and_train(self, batch: Batch) -> tuple[np.ndarray, float]:
        return self._step(batch, score=True)

    def _step(self, batch: Batch, score: bool) -> tuple[np.ndarray | None, float]:
        """Scores before the update (ids admitted by this very lookup score with the default
        row, as a local table's ``predict`` would), then the dense step and the sparse apply."""
        with self.lock:
            step = self.step + 1
            self.clock_ms = max(self.clock_ms, batch.clock_ms)
            got = self.remote.lookup(self._ids(batch), self.cfg.embedding_dim, self.clock_ms, train=True)
            (ue, ku), (ie, ki) = got["user"], got["item"]
            pos, hr, ft = self._context(batch)
            scores = None
            if score:
                scores = self._predict_vectors(ue * ku[:, None], ie * ki[:, None], pos, hr, ft).numpy()
            loss, g_u, g_i = self._train_on_vectors(ue, ie, pos, hr, ft,
                                                    tf.constant(batch.labels, tf.float32),
                                                    tf.constant(batch.delayed_mask))
            self.remote.apply({"user": (batch.user_ids, g_u.numpy()),
                               "item": (batch.item_ids, g_i.numpy())}, step)
            self.step = step
            return scores, float(loss)

    def flush(self) -> None:
        self.remote.flush()

    def embedding_changes(self, since) -> tuple[list[Mark], dict[str, dict]]:
        return self.remote.changes(since)

    def occupancy(self) -> dict[str, dict[str, int]]:
        return self.remote.occupancy()

    def frozen_copy(self):
        raise NotImplementedError("a frozen baseline needs the tables in-process")
