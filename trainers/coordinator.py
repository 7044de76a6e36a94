"""A training group on Ray: N trainer actors, S parameter-server shard actors, a dense averager,
and the coordinator that checkpoints them as one and restarts them as one (``trainers.group``
states the protocol and the consistency model).

The coordinator is the actor the rest of ODL knows as the trainer (``odl-trainer``): it answers
``embedding_changes`` (from the shards), ``snapshot`` (the trainers' averaged dense weights) and
``metrics`` (the group's sums), so the exporter and the driver work unchanged with one trainer or
a group.
"""
from __future__ import annotations

import math
import threading
import time
from typing import Any

import numpy as np
from prometheus_client import Gauge

from odl import names
from odl.config import Config
from odl.control import ControlPlane, Heartbeater
from odl.runtime import setup_logging
from odl.supervision import RestartBudget, RunOnce, note_restart
from trainers.actor import TrainerActorImpl, registry_text
from trainers.checkpoint import due_kind
from trainers.group import DenseAverager, GroupCommit, GroupMember, average_weights, partitions_for
from trainers.ps import EmbeddingShard, ShardedTables
from trainers.gauges import publish_occupancy
from trainers.streaming import checkpoint_dir

# what the coordinator's own registry contributes to the group's metrics (the rest are members')
COORDINATOR_FAMILIES = ("odl_trainer_group_", "odl_trainer_embedding_", "process_", "python_")
EPOCH = Gauge("odl_trainer_group_epoch", "newest committed group checkpoint epoch")
RESTARTS = Gauge("odl_trainer_group_restarts", "times the group restarted from its last epoch")


class TrainingGroupImpl:
    def __init__(self, cfg_json: str):
        self.cfg = Config.model_validate_json(cfg_json)
        self.scale = self.cfg.trainer.scale
        self.log = setup_logging("trainer-group")
        self.stop_event = threading.Event()
        self.trainers: list[Any] = []
        self.shards: list[Any] = []
        self.averager: Any = None
        self.tables: ShardedTables | None = None
        self.runs: list[Any] = []
        self.epoch = 0
        sup = self.cfg.supervision
        self.budget = RestartBudget(sup.max_restarts, sup.window_s)
        self._run_once = RunOnce()
        self.last_checkpoint: dict[str, Any] = {}
        self.summary: dict[str, Any] = {}
        self.cp = ControlPlane(self.cfg)
        self.heartbeat = Heartbeater(self.cp, "trainer", "trainer", self._probe)

    # --- building and tearing down -----------------------------------------------------------
    def _build(self, skip_ahead: bool = False) -> None:
        """Start the shards, the averager and the trainers from the committed epoch (or afresh);
        ``skip_ahead``: the trainers then go on from the newest offsets (a rollback's choice)."""
        import ray
        cfg, n, s = self.cfg, self.scale.trainers, self.scale.ps_shards
        commit = GroupCommit.read(cfg)
        if commit is not None and not cfg.trainer.checkpoint.restore:
            GroupCommit.path(cfg).unlink()
            commit = None
        if commit is not None:
            commit.check_shape(n, s, GroupCommit.path(cfg))
        epoch = commit.epoch if commit else None
        where = {"scheduling_strategy": "SPREAD"} if self.scale.placement == "spread" else {}
        Shard = ray.remote(EmbeddingShard).options(num_cpus=0, max_restarts=0, **where)
        self.shards = [Shard.remote(cfg.trainer, k, s, checkpoint_dir(cfg, f"ps-{k}"), epoch)
                       for k in range(s)]
        self.averager = ray.remote(DenseAverager).options(num_cpus=0).remote(n)
        gpu = ray.cluster_resources().get("GPU", 0) >= n
        Trainer = ray.remote(TrainerActorImpl).options(
            max_concurrency=4, max_restarts=0, num_cpus=self.scale.trainer_cpus,
            num_gpus=1 if gpu else 0, **where)
        self.trainers = [
            Trainer.remote(cfg.model_dump_json(),
                           GroupMember(i, n, partitions_for(i, n, cfg.kafka.partitions),
                                       self.shards, self.averager, epoch, skip_ahead))
            for i in range(n)]
        # constructors restore; wait for them so a broken checkpoint fails here, loudly
        ray.get([a.pid.remote() for a in self.trainers + self.shards], timeout=600)
        self.tables = ShardedTables(self.shards, remote=True)
        self.epoch = epoch or 0
        EPOCH.set(self.epoch)
        self.runs = [t.run.remote() for t in self.trainers]
        self.log.info("group of %d trainers and %d shards %s", n, s,
                      f"restored epoch {epoch}" if epoch else "started afresh")

    def _teardown(self) -> None:
        import ray
        for a in self.trainers + self.shards + [self.averager]:
            if a is not None:
                ray.kill(a, no_restart=True)
        self.trainers, self.shards, self.averager, self.runs = [], [], None, []

    @property
    def restarts(self) -> int:
        return self.budget.total

    def _restart(self, why: str) -> None:
        """Restart the whole group from its committed epoch, within the restart budget (a rate:
        ``supervision``); beyond it ``BudgetExhausted`` ends ``run`` and the driver sees it.
        A member that dies while the group is rebuilt is another failure, not the end: when a
        node is lost, Ray may place a new member on it before it is known to be dead."""
        import ray
        while True:
            self.budget.record(why)
            RESTARTS.set(self.restarts)
            note_restart(self.cp, "trainer", self.log)
            self.log.error("group member failed (%s); restarting the group from epoch %d "
                           "(%d within %.0f s, %d in all)", why, self.epoch, self.budget.in_window,
                           self.budget.window_s, self.restarts)
            self._teardown()
            time.sleep(1.0)
            try:
                self._build()
                return
            except (ray.exceptions.RayError, TimeoutError) as exc:
                why = f"rebuilding: {type(exc).__name__}: {str(exc).splitlines()[0]}"

    # --- rollback ----------------------------------------------------------------------------
    def _follow_rollback(self) -> None:
        """Carry out an `odl rollback --trainer` request once: the group goes back to the epoch
        a version was cut from (``epoch-N``).  Its members are stopped, ``group.json`` is set to
        that epoch, and the group is rebuilt from it: every member and shard restores it and
        deletes the epochs written after it (as after a crash), so a restart resumes from the
        rolled-back state.  Then either the samples since that epoch are replayed (they are new
        to the restored duplicate windows and ledgers, so each trains again once) or, with
        skip-ahead, the trainers go on from the newest offsets and a full epoch is committed at
        once to make that choice durable.  The answer goes to the control plane."""
        try:
            req = self.cp.pending_trainer_rollback()
        except Exception as exc:  # noqa: BLE001 - control plane away: look again later
            self.log.warning("control plane: %s", exc)
            return
        if req is None:
            return
        answer: dict[str, Any] = {"id": req["id"], "instance": "trainer"}
        try:
            answer.update(ok=True, reason=None, **self._rollback(req["checkpoint"],
                                                                 bool(req.get("skip_ahead"))))
        except Exception as exc:  # noqa: BLE001 - answered, not fatal
            self.log.error("rollback to %s failed: %s", req["checkpoint"], exc)
            answer.update(ok=False, reason=str(exc))
        self.cp.record_trainer_rollback(answer)

    def _rollback(self, checkpoint: str, skip_ahead: bool) -> dict[str, Any]:
        prefix = "epoch-"
        if not checkpoint.startswith(prefix) or not checkpoint[len(prefix):].isdigit():
            raise ValueError(f"{checkpoint!r} is not a group checkpoint (epoch-N): the version "
                             "was cut from a lone trainer, not this group")
        target = int(checkpoint[len(prefix):])
        if not 0 < target <= self.epoch:
            raise ValueError(f"epoch {target} is not committed (the group is at epoch {self.epoch})")
        n, s = self.scale.trainers, self.scale.ps_shards
        self.log.warning("rolling the group back from epoch %d to %d (%s)", self.epoch, target,
                         "skipping ahead" if skip_ahead else "replaying")
        self._teardown()
        GroupCommit(target, n, s).write(self.cfg)
        try:
            self._build(skip_ahead=skip_ahead)
            if skip_ahead:
                self._checkpoint("full")
        except Exception as exc:  # a member failed on the way: the group still has to run
            self._restart(f"rolling back: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            raise
        return {"checkpoint": checkpoint, "epoch": self.epoch, "step": self.metrics().get("step"),
                "mode": "skip-ahead" if skip_ahead else "replay"}

    # --- group checkpoints -------------------------------------------------------------------
    def _checkpoint(self, kind: str) -> None:
        """Hold every trainer at a step boundary, write every part of the next epoch, commit."""
        import ray
        e = self.epoch + 1
        t0 = time.perf_counter()
        ray.get([t.hold.remote() for t in self.trainers], timeout=120)
        try:
            parts = ray.get([t.checkpoint_epoch.remote(e, kind) for t in self.trainers]
                            + [s.checkpoint.remote(e, kind) for s in self.shards], timeout=600)
            GroupCommit(e, self.scale.trainers, self.scale.ps_shards).write(self.cfg)
            self.epoch = e
        finally:
            ray.get([t.release.remote() for t in self.trainers], timeout=60)
        EPOCH.set(e)
        self.last_checkpoint = {"epoch": e, "kind": kind, "bytes": sum(p["bytes"] for p in parts),
                                "seconds": round(time.perf_counter() - t0, 3)}

    def _due(self, last_full: float, last_incr: float) -> str | None:
        ck = self.cfg.trainer.checkpoint
        return due_kind(ck.full_interval_s, ck.incremental_interval_s, self.epoch > 0,
                        last_full, last_incr, time.monotonic())

    # --- the actor's API ---------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run the group until ``stop``: watch the members, checkpoint on schedule, restart the
        whole group from the committed epoch when any member fails.  A repeated call joins."""
        return self._run_once(self._run)

    def _run(self) -> dict[str, Any]:
        import ray
        self._build()
        self.heartbeat.start()
        last_full = last_incr = next_control = time.monotonic()
        next_summary = 0.0
        try:
            while not self.stop_event.is_set():
                if time.monotonic() >= next_control:
                    next_control = time.monotonic() + self.cfg.control.heartbeat_interval_s
                    self._follow_rollback()
                ready, _ = ray.wait(self.runs, timeout=0.5)
                if ready:
                    try:
                        ray.get(ready)
                        why = "a trainer's loop returned"
                    except ray.exceptions.RayError as exc:
                        why = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                    self._restart(why)
                    last_full = last_incr = time.monotonic()
                    continue
                kind = self._due(last_full, last_incr)
                try:
                    if kind:
                        self._checkpoint(kind)
                        last_incr = time.monotonic()
                        if kind == "full":
                            last_full = last_incr
                    if time.monotonic() >= next_summary:
                        next_summary = time.monotonic() + self.cfg.control.heartbeat_interval_s
                        self.summary = self.metrics()
                except (ray.exceptions.RayError, TimeoutError) as exc:
                    self._restart(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
                    last_full = last_incr = time.monotonic()
            self._checkpoint("incr")  # a clean stop loses no work
            return self.metrics()
        finally:
            self.heartbeat.stop()
            for t in self.trainers:
                t.stop.remote()
            try:
                ray.get(self.runs, timeout=30)
            except Exception as exc:  # noqa: BLE001
                self.log.warning("group did not stop cleanly: %s", exc)
            self._teardown()

    def stop(self) -> None:
        self.stop_event.set()

    def track_served(self, step: int) -> bool:
        """No shadow in a group (the tables live in the shards): the gate compares windows."""
        return False

    def embedding_changes(self, since):
        """(marks, {table: {ids, vectors, removed, complete}}) from every shard; pass the marks
        back next time (0 = everything)."""
        return self._built().changes(since)

    def snapshot(self, embeddings: bool = False) -> dict[str, Any]:
        """The average of the trainers' dense weights (what the averager converges them to) and
        what a manifest needs; with ``embeddings`` every shard's rows, read right after (the
        group trains asynchronously, so there is no single step to read them at)."""
        import ray
        tables = self._built()
        weights = average_weights(ray.get([t.dense_weights.remote() for t in self.trainers]))
        rows = ({t: (c["ids"], c["vectors"]) for t, c in tables.changes(0)[1].items()}
                if embeddings else None)
        m = self.metrics()
        # the members read disjoint partitions: the group's moments are their sums
        moments: dict[str, list[float]] = {}
        for part in ray.get([t.numeric_moments.remote() for t in self.trainers]):
            for name, mo in part.items():
                moments[name] = [a + b for a, b in zip(moments.get(name, [0.0, 0.0, 0.0]), mo)]
        return {"weights": weights, "step": m["step"], "metrics": m, "embeddings": rows,
                "offsets": {f"{m['topic']}:{p}": o for p, o in m["positions"].items()},
                "embedding_dim": self.cfg.trainer.embedding_dim, "numeric_moments": moments,
                "config": self.cfg.trainer.model_dump(mode="json")}

    def metrics(self) -> dict[str, Any]:
        """The group's figures: sums of counts, the mean of the members' window AUC and loss."""
        import ray
        if self.tables is None:
            return {"samples_trained": 0, "step": 0, "state": "starting"}
        members = ray.get([t.metrics.remote() for t in self.trainers])
        occ = publish_occupancy(self.tables.occupancy())
        finite = lambda key: [x[key] for x in members if x[key] is not None and math.isfinite(x[key])]  # noqa: E731
        total = lambda key: sum(x[key] for x in members)  # noqa: E731
        positions = {p: o for x in members for p, o in x["positions"].items()}
        return {"samples_trained": total("samples_trained"), "step": total("step"),
                "duplicates": total("duplicates"), "malformed": total("malformed"),
                "auc": float(np.mean(finite("auc"))) if finite("auc") else float("nan"),
                "logloss": float(np.mean(finite("logloss"))) if finite("logloss") else float("nan"),
                "loss": float(np.mean(finite("loss"))) if finite("loss") else float("nan"),
                "samples_per_s": round(total("samples_per_s"), 1),
                "held_for_labels": total("held_for_labels"),
                "waiting_for_batch": total("waiting_for_batch"),
                "checkpoint": f"epoch-{self.epoch}" if self.epoch else None,
                "last_group_checkpoint": self.last_checkpoint, "restarts": self.restarts,
                "trainers": len(members), "ps_shards": len(self.shards),
                "topic": names.topic(names.SAMPLES, self.cfg.kafka.topic_prefix),
                "positions": dict(sorted(positions.items(), key=lambda kv: int(kv[0]))),
                **{f"rows_{k}": v["rows"] for k, v in occ.items()}, "tables": occ,
                "members": [{k: x[k] for k in ("samples_trained", "step", "auc", "positions")}
                            for x in members]}

    def metrics_text(self) -> str:
        """The coordinator's metrics and each member's, labelled ``member``."""
        import ray

        from trainers.metrics_relay import merge
        self.metrics()          # refreshes the occupancy gauges
        texts = ray.get([t.metrics_text.remote() for t in self.trainers]) if self.tables else []
        return merge([(registry_text(), {})] + [(t, {"member": str(i)}) for i, t in enumerate(texts)],
                     only={0: COORDINATOR_FAMILIES})

    def samples_trained(self) -> int:
        import ray
        return sum(ray.get([t.samples_trained.remote() for t in self.trainers])) if self.tables else 0

    def _built(self) -> ShardedTables:
        if self.tables is None:
            raise RuntimeError("the training group is still starting")
        return self.tables

    def _probe(self) -> tuple[str, str | None, dict[str, Any]]:
        return ("paused" if self.heartbeat.paused else "running"), None, self.summary

    def member_pids(self) -> dict[str, list[int]]:
        import ray
        return {"trainers": ray.get([t.pid.remote() for t in self.trainers]),
                "shards": ray.get([s.pid.remote() for s in self.shards])}

    def member_nodes(self) -> dict[str, list[str]]:
        """The Ray node of each trainer and shard (``trainer.scale.placement``)."""
        import ray
        return {"trainers": ray.get([t.node_id.remote() for t in self.trainers]),
                "shards": ray.get([s.node_id.remote() for s in self.shards])}
