"""`odl run exporter`: turn the trainer's ever-changing model into what serving can use safely.

Three cadences, each configurable (``exporter.*``):
- sparse deltas every ``delta_interval_s``: rows changed since the last push go to the active
  Redis generation, evicted ids leave it, the hot set stays bounded (``hot_embeddings``);
- dense refreshes every ``dense_interval_s``: the trainer's dense weights, gated, through
  ``dense_channel`` to replicas serving the newest version, applied there in place;
- full versions every ``version_interval_s`` or on request (``odl publish``): the optimised
  SavedModel, the embedding snapshot and a manifest into the model store, through the quality
  gate (``gate``), registered in the control plane, the last ``keep_versions`` retained.

Rollback: while the control plane pins a version, the exporter restores that version's
embedding snapshot into a new generation and leaves Redis alone (no deltas, no refreshes):
serving then sees the pinned version's dense weights *and* embeddings.  It keeps exporting
gated versions to the store.  When the pin is lifted it resyncs Redis from the trainer.  A
paused exporter does nothing but follow pins.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import redis
from prometheus_client import Counter, Gauge

from exporters import gate, savedmodel, spec_savedmodel
from odl import dense_channel
from odl.config import Config
from odl.control import ControlPlane
from odl.redis_conn import redis_client
from odl.embedding_store import HotEmbeddings, Pointer
from odl.model_store import CachePolicy, Manifest, ModelStore
from odl.ray_util import NAMESPACE, TRAINER_ACTOR, connect
from odl.runtime import Component
from odl.spec import is_default, running_spec
from odl.spec.net import SpecNet

ROWS_PUSHED = Counter("odl_exporter_rows_pushed_total", "embedding rows written to Redis", ["table"])
ROWS_DELETED = Counter("odl_exporter_rows_deleted_total", "rows deleted from Redis", ["reason"])
VERSIONS = Counter("odl_exporter_versions_total", "versions", ["outcome"])
REFRESHES = Counter("odl_exporter_dense_refreshes_total", "dense refreshes", ["outcome"])
LATEST = Gauge("odl_exporter_latest_version", "newest published version")
GENERATION = Gauge("odl_exporter_embedding_generation", "active Redis embedding generation")
HOT_ROWS = Gauge("odl_exporter_hot_rows", "rows in the active generation", ["table"])
REDIS_MEMORY = Gauge("odl_exporter_redis_used_memory_bytes", "Redis used_memory")
SET_LOST = Counter("odl_exporter_embedding_set_lost_total",
                   "times Redis no longer held the active generation (restarted empty, flushed)")
DELTAS_REFUSED = Counter("odl_exporter_deltas_refused_total",
                         "sparse deltas or embedding sets the gate refused (nothing written)")
FROZEN = Gauge("odl_exporter_frozen", "1 while the gate holds sparse and dense publishing")


class TrainerClient:
    """The trainer actor (single trainer or group coordinator: the same two calls)."""

    def __init__(self, actor, ray, timeout_s: float = 60):
        self.actor, self.ray, self.timeout_s = actor, ray, timeout_s

    def changes(self, since):
        return self.ray.get(self.actor.embedding_changes.remote(since), timeout=self.timeout_s)

    def snapshot(self, embeddings: bool = False) -> dict[str, Any]:
        return self.ray.get(self.actor.snapshot.remote(embeddings), timeout=self.timeout_s)

    def track_served(self, step: int) -> bool:
        return self.ray.get(self.actor.track_served.remote(step), timeout=self.timeout_s)


@dataclass
class Schedule:
    """When each cadence is next due (monotonic seconds)."""
    delta_s: float
    dense_s: float
    version_s: float
    next_dense: float = 0.0
    next_version: float = 0.0

    def __post_init__(self):
        now = time.monotonic()
        self.next_dense, self.next_version = now + self.dense_s, now + self.version_s

    def due(self, now: float) -> str:
        if now >= self.next_version:
            self.next_version = now + self.version_s
            return "version"
        if now >= self.next_dense:
            self.next_dense = now + self.dense_s
            return "dense"
        return "delta"


class Exporter:
    def __init__(self, cfg: Config, trainer: TrainerClient, cp: ControlPlane, log, r=None):
        ec = cfg.exporter
        self.cfg, self.trainer, self.cp, self.log = cfg, trainer, cp, log
        self.r = r if r is not None else redis_client(cfg, decode=False)
        self.store = ModelStore(cfg.paths.model_store, cfg.serving.model_name)
        self.spec = running_spec(cfg)
        # a declared spec's model: its own graph (exporters.spec_savedmodel), its tables' widths
        self.spec_net = None if is_default(self.spec) else SpecNet.of(self.spec)
        if ec.precision != "float32" and (self.spec_net is None or not ec.optimised_graph):
            raise ValueError(f"exporter.precision {ec.precision} applies to a declared spec's "
                             "optimised graph (the default shape's graph and the plain one are "
                             "float32): set it back to float32, or run a spec")
        dims = {t: s.dim for t, s in self.spec.tables.items()} if self.spec_net else None
        self.hot = HotEmbeddings(self.r, cfg.trainer.embedding_dim, ec.embedding_dtype,
                                 ec.hot_rows_per_table, ec.retire_generation_after_s, dims=dims)
        self.mark: Any = 0          # the trainer's change mark up to which rows were pushed
        self.rows_pushed = 0
        self.last_version: int | None = self.store.latest()
        self.last_step = -1
        self.refused = 0
        self.refresh_seq = 0
        self.refresh_step = -1
        self.restored_for: str | None = None   # the held version whose embeddings Redis holds
        self.frozen: dict[str, Any] | None = cp.frozen()   # the gate's hold (``gate``)

    # --- the gate's freeze -----------------------------------------------------------------------
    def _freeze(self, what: str, reason: str, **extra: Any) -> None:
        rec = {"what": what, "reason": reason, "ts": time.time(), **extra}
        self.cp.freeze(rec)
        self.frozen = rec
        FROZEN.set(1)
        self.log.warning("gate refused %s: %s; sparse and dense publishing frozen until a version "
                         "passes or `odl resume exporter`", what, reason)

    def _unfreeze(self, why: str) -> None:
        if self.frozen is not None:
            self.log.info("publishing unfrozen: %s", why)
        self.cp.unfreeze()
        self.frozen = None
        FROZEN.set(0)

    def _rows_ok(self, changes: dict[str, dict], what: str) -> bool:
        verdict = gate.check_rows(((t, c["vectors"]) for t, c in changes.items()),
                                  self.cfg.exporter.gate_max_row_norm)
        if not verdict.ok:
            DELTAS_REFUSED.inc()
            self._freeze(what, verdict.reason)
        return verdict.ok

    # --- sparse deltas -------------------------------------------------------------------------
    def push_deltas(self) -> int:
        """Rows changed since the last push, and evictions; returns rows written.  Frozen, or
        when a row fails the gate, nothing is written and the mark stays: the rows go out with
        a later push once the freeze is lifted."""
        if self.frozen is not None:
            return 0
        if self.hot.active is None:
            return self.resync("start")
        mark, changes = self.trainer.changes(self.mark)
        if not all(c["complete"] for c in changes.values()):
            # evictions older than the mark are forgotten, or the trainer restarted: start over
            return self.resync()
        if not self._rows_ok(changes, "sparse delta"):
            return 0
        n = self._write(changes)
        self.mark = mark
        ROWS_DELETED.labels("hot-set bound").inc(self.hot.enforce_bound())
        self.hot.collect()
        return n

    def _write(self, changes: dict[str, dict]) -> int:
        n = 0
        for table, c in changes.items():
            if len(c["removed"]):
                ROWS_DELETED.labels("evicted by trainer").inc(self.hot.delete(table, c["removed"]))
            if len(c["ids"]):
                n += self.hot.push(table, c["ids"], c["vectors"], c.get("clock_ms"))
                ROWS_PUSHED.labels(table).inc(len(c["ids"]))
        self.rows_pushed += n
        return n

    # --- dense refreshes -----------------------------------------------------------------------
    def publish_dense(self) -> int | None:
        """The trainer's dense weights as a refresh of the newest version; returns its seq."""
        if self.last_version is None or self.frozen is not None:
            return None
        snap = self.trainer.snapshot()
        if snap["step"] == self.refresh_step:
            return None
        verdict = self._gate(snap)
        if not verdict.ok:   # skipped, not frozen: a refresh is the next one's to make good
            REFRESHES.labels("refused").inc()
            self.log.warning("dense refresh refused: %s", verdict.reason)
            return None
        self.refresh_seq = dense_channel.publish(self.r, self.cfg.serving.model_name,
                                                 str(self.last_version), snap["step"], snap["weights"])
        self.refresh_step = snap["step"]
        REFRESHES.labels("published").inc()
        self._track_served(snap["step"])
        return self.refresh_seq

    # --- versions ------------------------------------------------------------------------------
    def _track_served(self, step: int) -> None:
        """The trainer scores what was just published beside itself (the gate's shadow)."""
        try:
            self.trainer.track_served(step)
        except Exception as exc:  # noqa: BLE001 - the gate falls back to comparing windows
            self.log.warning("trainer did not take the served weights' shadow: %s", exc)

    def _gate(self, snap: dict[str, Any], rows=()) -> "gate.Verdict":
        ec = self.cfg.exporter
        return gate.check(snap, self._served_metrics(), ec.gate_auc_margin, rows,
                          ec.gate_max_row_norm, ec.gate_logloss_margin, ec.gate_min_paired)

    def _served_metrics(self) -> dict[str, Any] | None:
        served = self.cp.served_version()
        try:
            return self.store.manifest(served)["metrics"] if served else None
        except (FileNotFoundError, ValueError, KeyError):
            return None   # retired from the store or unreadable: nothing to compare against

    def publish_version(self, force: bool = False, skip_gate: bool = False,
                        pinned: str | None = None) -> int | None:
        """``pinned``: the operator's pinned version, if any (then Redis is left alone)."""
        if not pinned:
            self.push_deltas()
        snap = self.trainer.snapshot(embeddings=True)
        if not force and (snap["step"] == self.last_step
                          or snap["metrics"]["samples_trained"] < self.cfg.exporter.min_samples_per_version):
            return None   # nothing new, or too little, was trained
        version = self.store.next_version()
        rows = [(t, v) for t, (_, v) in (snap["embeddings"] or {}).items()]
        verdict = self._gate(snap, rows)
        if not verdict.ok and not skip_gate:
            self.refused += 1
            VERSIONS.labels("refused").inc()
            rec = {"version": version, "reason": verdict.reason, "ts": time.time(),
                   "step": snap["step"], "auc": snap["metrics"].get("auc")}
            self.cp.record_refused(rec)
            self.store.record("refused", **rec)
            if verdict.integrity or self.cfg.exporter.freeze_on_regression:
                self._freeze(f"version {version}", verdict.reason, step=snap["step"])
            else:
                self.log.warning("refused version %d: %s (not published; serving keeps the "
                                 "served weights)", version, verdict.reason)
            return None
        if self.frozen is not None:    # this version passed (or the operator skipped the gate)
            self._unfreeze(f"version {version} {'passed the gate' if verdict.ok else 'published with --skip-gate'}")
            if not pinned:
                self.push_deltas()     # the held rows, checked; a bad one freezes again
            if self.frozen is not None:
                return None
        ec = self.cfg.exporter
        manifest = Manifest(version=str(version),
                            parent=str(self.last_version) if self.last_version else None,
                            trainer_step=snap["step"], kafka_offsets=snap.get("offsets", {}),
                            metrics=snap["metrics"],
                            embedding_generation=None if pinned else self.hot.active,
                            model_name=self.cfg.serving.model_name,
                            embedding_dim=snap["embedding_dim"],
                            cache_policy=asdict(CachePolicy(ec.cache_every_n_calls, ec.cache_every_s)),
                            spec=self.spec.hash,
                            trainer_checkpoint=snap["metrics"].get("checkpoint"),
                            numeric_moments=snap.get("numeric_moments") or {})
        dim = snap["embedding_dim"]

        def write(path):
            if self.spec_net is not None:
                manifest.graph = spec_savedmodel.save_published(
                    self.spec_net, snap["weights"], path, ec.optimised_graph, ec.precision,
                    ec.precision_tolerance)
                check = (manifest.graph or {}).get("precision_check")
                if check and manifest.graph["precision"] != check["wanted"]:
                    self.log.warning("version %s published in float32: %s differs by %.4f on the "
                                     "probe request (exporter.precision_tolerance %.4f)", version,
                                     check["wanted"], check["max_diff"], check["tolerance"])
            elif ec.optimised_graph:
                manifest.graph = savedmodel.save_optimised(snap["weights"], dim, path)
            else:
                savedmodel.save(snap["weights"], dim, path)

        self.store.publish(version, write, manifest, embeddings=snap["embeddings"])
        self.cp.register_version(manifest.to_dict())
        self.store.record("published", version=version, step=snap["step"],
                          auc=snap["metrics"].get("auc"), generation=manifest.embedding_generation,
                          gate="skipped" if not verdict.ok else "passed")
        self.last_version, self.last_step = version, snap["step"]
        VERSIONS.labels("published").inc()
        self._track_served(snap["step"])
        LATEST.set(version)
        protect = {int(v) for v in [pinned] if v and v.isdigit()}
        for v in self.store.retain(ec.keep_versions, protect):
            self.cp.forget_version(str(v))
            self.store.record("retired", version=v)
        self.log.info("published version %d (step %d, auc %.4f)", version, snap["step"],
                      snap["metrics"].get("auc", float("nan")))
        if pinned and not self.cp.pinned_version():
            self.follow_served()   # a promoted older version is replaced: the trainer's rows now
        return version

    # --- rollback, pin, promote ------------------------------------------------------------
    def held_version(self) -> str | None:
        """The version whose own embeddings serving must read: a pinned version, or one promoted
        over this exporter's newest (``odl promote`` of an older version).  None: serving follows
        the newest version, which reads the trainer's rows."""
        pinned = self.cp.pinned_version()
        if pinned:
            return pinned
        served = self.cp.served_version()
        if served is not None and self.last_version is not None and served != str(self.last_version):
            return served
        return None

    def follow_served(self) -> str | None:
        """Make Redis hold the held version's embedding snapshot, or the trainer's rows once
        nothing is held; record the outcome in the control plane (``odl rollback`` waits for
        it).  Returns the held version."""
        held = self.held_version()
        if held and held != self.restored_for:
            self.restored_for = held     # tried once per hold: a failure is recorded, not retried
            try:
                tables = self.store.snapshot(held)
            except (KeyError, FileNotFoundError, ValueError) as exc:
                reason = f"version {held} has no readable embedding snapshot ({exc})"
                self.log.error("cannot restore embeddings: %s", reason)
                self.cp.record_embeddings({"source": "trainer", "version": held, "ok": False,
                                           "generation": self.hot.active, "reason": reason})
                return held
            gen = self.hot.restore(tables, source=f"rollback:{held}")
            GENERATION.set(gen)
            self.store.record("restored", version=held, generation=gen,
                              rows={t: int(len(i)) for t, (i, _) in tables.items()})
            self.cp.record_embeddings({"source": "version", "version": held, "ok": True,
                                       "generation": gen, "reason": None})
        elif not held and self.restored_for is not None:
            self.restored_for = None
            self.resync("unpinned")
        return held

    def resync(self, source: str = "resync") -> int:
        """Every trainer row into a new generation, made visible when complete; returns rows
        (0, and nothing written, when the gate refuses a row)."""
        mark, changes = self.trainer.changes(0)
        if not self._rows_ok(changes, f"embedding set ({source})"):
            return 0
        self.hot.begin()
        n = self._write(changes)
        self.hot.enforce_bound()
        GENERATION.set(self.hot.activate(source))
        self.mark = mark
        self.cp.record_embeddings({"source": "trainer", "version": None, "ok": True,
                                   "generation": self.hot.active, "reason": None})
        return n

    def check_set(self) -> bool:
        """If Redis lost the active generation (restarted without persistence, flushed), forget
        it, so that this tick writes the whole set again; True if it was lost."""
        if self.hot.active is None or self.hot.building is not None:
            return False
        p = Pointer.read(self.r)
        if p is not None and p.generation == self.hot.active:
            return False
        self.log.warning("Redis no longer holds embedding generation %s (pointer: %s): writing the "
                         "set again", self.hot.active, p.generation if p else None)
        SET_LOST.inc()
        self.hot.active, self.hot.index = None, {}
        if self.restored_for is not None:
            self.restored_for = None          # follow_served restores the held version again
        self.reregister()
        return True

    def reregister(self) -> int:
        """A control plane that came back empty lists the model store's versions again (their
        manifests are on disk), so `odl versions` and rollback still see them; returns how many.
        Pins and pauses live only in Redis: without Redis persistence a restart drops them."""
        if self.cp.versions():
            return 0
        versions = self.store.versions()
        for v in versions:
            self.cp.register_version(self.store.manifest(v))
        if versions:
            self.log.warning("control plane had no versions: registered %d from the model store "
                             "again (%s..%s)", len(versions), versions[0], versions[-1])
        return len(versions)

    def tick(self, schedule: Schedule, paused: bool) -> str:
        """One round of the loop; returns what it did."""
        self.frozen = self.cp.frozen()     # `odl resume exporter` lifts it from outside
        FROZEN.set(int(self.frozen is not None))
        lost = self.check_set()
        pinned = self.follow_served()
        if lost and not pinned:
            self.resync("redis-restarted")
        self.hot.collect()
        if paused:
            return "paused"
        request = self.cp.take_publish_request()
        what = "version" if request else schedule.due(time.monotonic())
        if what == "version":
            self.publish_version(force=bool(request), pinned=pinned,
                                 skip_gate=bool(request and request.get("skip_gate")))
        elif pinned:
            return "pinned"
        elif self.frozen is not None:
            return "frozen"
        elif what == "dense":
            self.publish_dense()
        else:
            self.push_deltas()
        return what

    def probe(self) -> dict[str, Any]:
        mem = self.hot.memory()
        REDIS_MEMORY.set(mem["redis_used_memory_bytes"])
        for table, t in mem["tables"].items():
            HOT_ROWS.labels(table).set(t["rows"])
        return {"latest_version": self.last_version, "rows_pushed": self.rows_pushed,
                "generation": self.hot.active, "refused": self.refused,
                "refresh_seq": self.refresh_seq, "evicted": self.hot.evicted,
                "restored_for": self.restored_for,
                "frozen": (self.frozen or {}).get("reason"),
                "redis_used_memory_bytes": mem["redis_used_memory_bytes"],
                **{f"hot_rows_{t}": v["rows"] for t, v in mem["tables"].items()},
                **{f"hot_bytes_{t}": v["bytes_estimate"] for t, v in mem["tables"].items()}}


def wait_for_actor(ray, comp: Component, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while not comp.stop.is_set():
        try:
            return ray.get_actor(TRAINER_ACTOR, namespace=NAMESPACE)
        except ValueError:
            comp.work.beat("export", waiting="the trainer actor")
            if time.monotonic() > deadline:
                raise TimeoutError(f"trainer actor {TRAINER_ACTOR!r} did not appear in {timeout_s}s")
            comp.stop.wait(1.0)
    return None


def run(cfg: Config) -> int:
    comp = Component(cfg, "exporter")
    comp.install_signal_handlers()
    ray = connect(cfg)
    actor = wait_for_actor(ray, comp)
    if actor is None:
        return 0
    ex = Exporter(cfg, TrainerClient(actor, ray), comp.cp, comp.log)
    orphans = ex.hot.drop_orphans()
    if orphans:
        comp.log.info("retiring embedding generations left behind: %s", orphans)
    comp.start_heartbeat(lambda: ("paused" if comp.paused else "running",
                                  str(ex.last_version) if ex.last_version else None, ex.probe()))
    ec = cfg.exporter
    schedule = Schedule(ec.delta_interval_s, ec.dense_interval_s, ec.version_interval_s)
    try:
        while not comp.stop.is_set():
            try:
                ex.tick(schedule, comp.paused)
                comp.work.beat("export")
            except redis.RedisError as exc:   # Redis away: keep the trainer's state, retry
                comp.log.warning("redis unavailable (%s); retrying", exc)
                comp.work.beat("export", waiting=f"redis unavailable ({exc})")
            except ray.exceptions.RayError as exc:   # the actor, or a group member, is away
                comp.log.warning("trainer actor unavailable (%s); waiting for it", exc)
                actor = wait_for_actor(ray, comp)
                if actor is None:
                    break
                ex.trainer = TrainerClient(actor, ray)
            comp.stop.wait(ec.delta_interval_s)
    finally:   # generations still retiring are found by drop_orphans at the next start
        comp.close()
        ray.shutdown()
    return 0
