"""`odl run exporter`: pull embedding deltas and dense snapshots from the trainer actor, push
rows to Redis every ``delta_interval_s`` and publish a full version every
``version_interval_s``.

Order matters for consistency: before a version is published, the rows trained up to its
snapshot are pushed, so Redis always holds at least the embeddings the version was trained with.
"""
from __future__ import annotations

import math
import time

from prometheus_client import Counter, Gauge

from exporters import embeddings, savedmodel
from exporters.registry import Manifest, ModelStore
from odl.config import Config
from odl.control import redis_client
from odl.ray_util import NAMESPACE, TRAINER_ACTOR, connect
from odl.runtime import Component

ROWS_PUSHED = Counter("odl_exporter_rows_pushed_total", "embedding rows written to Redis", ["table"])
ROWS_DELETED = Counter("odl_exporter_rows_deleted_total", "evicted ids deleted from Redis", ["table"])
VERSIONS = Counter("odl_exporter_versions_total", "versions", ["outcome"])
LATEST = Gauge("odl_exporter_latest_version", "newest published version")


def quality_gate(snap: dict) -> str | None:
    """Why a snapshot must not become a version, or None.  Weights must be finite, and so must the
    last training loss once the model has trained (NaN AUC is legitimate: one class seen so far)."""
    reason = savedmodel.check_weights(snap["weights"])
    if reason:
        return reason
    loss = snap["metrics"].get("loss")
    if snap["step"] > 0 and loss is not None and not math.isfinite(loss):
        return f"non-finite training loss ({loss})"
    return None


class Exporter:
    def __init__(self, cfg: Config, comp: Component, actor, ray):
        self.cfg, self.comp, self.actor, self.ray = cfg, comp, actor, ray
        self.r = redis_client(cfg, decode=False)
        self.store = ModelStore(cfg.paths.model_store, cfg.serving.model_name)
        self.generation = 0
        self.mark = 0   # trainer step up to which embedding changes were pushed
        self.rows_pushed = 0
        self.last_version: int | None = self.store.latest()
        self.last_step = 0
        self.refused = 0

    def push_deltas(self) -> int:
        """Push rows changed since the last push and delete evicted ids; returns rows written."""
        mark, changes = self.ray.get(self.actor.embedding_changes.remote(self.mark), timeout=60)
        if not all(c["complete"] for c in changes.values()):
            # evictions older than the mark are forgotten (or the trainer restarted): resync all
            mark, changes = self.ray.get(self.actor.embedding_changes.remote(0), timeout=60)
        n = 0
        for table, c in changes.items():
            if len(c["removed"]):
                embeddings.delete_rows(self.r, table, c["removed"])
                ROWS_DELETED.labels(table).inc(len(c["removed"]))
            if len(c["ids"]):
                self.generation = embeddings.push_rows(self.r, table, c["ids"], c["vectors"])
                ROWS_PUSHED.labels(table).inc(len(c["ids"]))
                n += len(c["ids"])
        self.mark = mark
        self.rows_pushed += n
        return n

    def publish_version(self, force: bool = False) -> int | None:
        self.push_deltas()
        snap = self.ray.get(self.actor.snapshot.remote(), timeout=60)
        trained = snap["metrics"]["samples_trained"]
        if not force and snap["step"] == self.last_step:
            return None  # nothing new was trained
        if not force and trained < self.cfg.exporter.min_samples_per_version:
            return None
        reason = quality_gate(snap)
        version = self.store.next_version()
        if reason:
            self.refused += 1
            VERSIONS.labels("refused").inc()
            self.comp.cp.record_refused({"version": version, "reason": reason, "ts": time.time(),
                                         "step": snap["step"]})
            self.comp.log.warning("refused version %d: %s", version, reason)
            return None
        manifest = Manifest(version=str(version),
                            parent=str(self.last_version) if self.last_version else None,
                            trainer_step=snap["step"], kafka_offsets=snap.get("offsets", {}),
                            metrics=snap["metrics"], embedding_generation=self.generation,
                            model_name=self.cfg.serving.model_name,
                            embedding_dim=snap["embedding_dim"])
        dim = snap["embedding_dim"]
        self.store.publish(version, lambda p: savedmodel.save(snap["weights"], dim, p), manifest)
        self.comp.cp.register_version(manifest.to_dict())
        self.last_version, self.last_step = version, snap["step"]
        VERSIONS.labels("published").inc()
        LATEST.set(version)
        protect = {int(v) for v in [self.comp.cp.pinned_version()] if v and v.isdigit()}
        for v in self.store.retain(self.cfg.exporter.keep_versions, protect):
            self.comp.cp.forget_version(str(v))
        self.comp.log.info("published version %d (step %d, auc %.4f)", version, snap["step"],
                           snap["metrics"].get("auc", float("nan")))
        return version


def wait_for_actor(ray, comp: Component, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while not comp.stop.is_set():
        try:
            return ray.get_actor(TRAINER_ACTOR, namespace=NAMESPACE)
        except ValueError:
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
    ex = Exporter(cfg, comp, actor, ray)
    comp.start_heartbeat(lambda: ("paused" if comp.paused else "running",
                                  str(ex.last_version) if ex.last_version else None,
                                  {"rows_pushed": ex.rows_pushed, "generation": ex.generation,
                                   "refused": ex.refused, "latest_version": ex.last_version}))
    next_version = time.monotonic() + cfg.exporter.version_interval_s
    try:
        while not comp.stop.is_set():
            if comp.paused:
                comp.stop.wait(0.5)
                continue
            try:
                if time.monotonic() >= next_version:
                    next_version = time.monotonic() + cfg.exporter.version_interval_s
                    ex.publish_version()
                else:
                    ex.push_deltas()
            except ray.exceptions.RayError as exc:   # the actor, or a group member, is away
                comp.log.warning("trainer actor unavailable (%s); waiting for it", exc)
                actor = wait_for_actor(ray, comp)
                if actor is None:
                    break
                ex.actor = actor
            comp.stop.wait(cfg.exporter.delta_interval_s)
    finally:
        comp.close()
        ray.shutdown()
    return 0
