"""The trainer as a Ray actor, and the `odl run trainer` driver that keeps it running.

The actor is threaded (``max_concurrency``) so the exporter can pull embedding deltas and dense
snapshots while ``run`` trains; the model's lock makes each pull consistent with one step.  It
asks for a GPU when the cluster has one; TensorFlow then places the model there.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

from odl.config import Config
from odl.runtime import metrics_port, setup_logging
from odl.ray_util import NAMESPACE, TRAINER_ACTOR, connect
from odl.supervision import RunOnce

if TYPE_CHECKING:
    from trainers.group import GroupMember



def registry_text() -> str:
    """This process's Prometheus metrics in the exposition format: what the actor hands its
    driver, which serves them where probes and Prometheus reach (``trainers.metrics_relay``)."""
    from prometheus_client import generate_latest
    return generate_latest().decode()


class TrainerActorImpl:
    def __init__(self, cfg_json: str, member: "GroupMember | None" = None):
        from trainers.loop import TrainerLoop
        self.cfg = Config.model_validate_json(cfg_json)
        self.log = setup_logging(member.name if member else "trainer")
        self.loop = TrainerLoop(self.cfg, member)   # restores its checkpoint
        self.trainer = self.loop.trainer
        self._run_once = RunOnce()

    def run(self) -> dict[str, Any]:
        """Train until ``stop``; pauses (keeping the position) while the control plane says so.
        A repeated call joins the running loop."""
        return self._run_once(self.loop.run)

    def stop(self) -> None:
        self.loop.stop_event.set()

    def embedding_changes(self, since: int):
        """(mark, {table: {ids, vectors, removed, complete}}) of rows changed after ``since``."""
        return self.trainer.model.embedding_changes(since)

    def snapshot(self, embeddings: bool = False) -> dict[str, Any]:
        """Dense weights plus what a manifest needs, taken under the model lock; with
        ``embeddings`` also every table's rows ({table: (ids, vectors)}) from the same step."""
        m = self.trainer.model
        with m.lock:
            self.trainer.mark_candidate()   # may be published: keep it for the gate's shadow
            return {**m.export_snapshot(embeddings), "metrics": self.trainer.metrics(),
                    "offsets": {f"{self.trainer.topic}:{p}": o
                                for p, o in self.trainer.positions.items()},
                    "embedding_dim": self.cfg.trainer.embedding_dim,
                    "numeric_moments": self.trainer.numeric_moments,
                    "config": self.cfg.trainer.model_dump(mode="json")}

    def track_served(self, step: int) -> bool:
        """The exporter published the snapshot of ``step``: score it beside the live model."""
        return self.trainer.track_served(step)

    def metrics(self) -> dict[str, Any]:
        return self.trainer.metrics()

    def metrics_text(self) -> str:
        publish_gauges = self.trainer.metrics   # refreshes the table gauges before the scrape
        publish_gauges()
        return registry_text()

    def samples_trained(self) -> int:
        """A cheap progress probe (``metrics`` asks the tables for their occupancy)."""
        return self.trainer.trained

    # --- training-group protocol (trainers.coordinator) --------------------------------------
    def hold(self) -> None:
        self.loop.gate.hold()

    def release(self) -> None:
        self.loop.gate.release()

    def checkpoint_epoch(self, epoch: int, kind: str) -> dict[str, Any]:
        """This trainer's part of group epoch ``epoch``; only while held."""
        if not self.loop.gate.parked:
            raise RuntimeError("checkpoint_epoch needs the trainer held at a step boundary")
        t0 = time.perf_counter()
        info = self.trainer.checkpoint(kind, epoch=epoch)
        return {"kind": info.kind, "seconds": time.perf_counter() - t0, "bytes": info.size_bytes}

    def dense_weights(self) -> dict[str, Any]:
        return self.trainer.model.dense_weights()

    def numeric_moments(self) -> dict[str, list[float]]:
        return self.trainer.numeric_moments

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this actor runs on (where a group's members landed)."""
        import ray
        return ray.get_runtime_context().get_node_id()


def run(cfg: Config) -> int:
    """`odl run trainer`: create the actor on the cluster, keep it running, stop it on SIGTERM.

    Ray restarts the actor process whenever it dies (``max_restarts=-1``); this driver decides
    when to give up, by the restart *rate* (``supervision``), counting one death per new actor
    process however many "unavailable" answers the restart produces."""
    # The actor publishes the trainer's heartbeat itself; the driver supervises it and serves
    # its metrics and probes (the actor may run on another node: trainers.metrics_relay).
    from odl.control import ControlPlane
    from odl.supervision import BudgetExhausted, RestartBudget, note_restart, wait_for_incarnation
    ray = connect(cfg)
    log = setup_logging("trainer-driver")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    gpus = ray.cluster_resources().get("GPU", 0)
    scale, sup = cfg.trainer.scale, cfg.supervision
    if scale.grouped:   # the coordinator answers as the trainer; its members ask for the CPUs/GPUs
        from trainers.coordinator import TrainingGroupImpl
        Actor = ray.remote(TrainingGroupImpl).options(
            name=TRAINER_ACTOR, namespace=NAMESPACE, max_concurrency=4, max_restarts=-1,
            num_cpus=0, get_if_exists=False)
    else:
        Actor = ray.remote(TrainerActorImpl).options(
            name=TRAINER_ACTOR, namespace=NAMESPACE, max_concurrency=4, max_restarts=-1,
            num_cpus=1, num_gpus=1 if gpus >= 1 else 0, get_if_exists=False)
    actor = Actor.remote(cfg.model_dump_json())
    log.info("trainer actor started (gpu=%s, %d trainers, %d ps shards)", gpus >= 1,
             scale.trainers, scale.ps_shards)
    relay = None
    if cfg.metrics.enabled:
        from trainers.metrics_relay import MetricsRelay
        relay = MetricsRelay(cfg.metrics.host, metrics_port(cfg, "trainer"),
                             lambda: ray.get(actor.metrics_text.remote(), timeout=10),
                             stale_s=max(60.0, sup.reconnect_timeout_s))
        log.info("trainer metrics and probes on %s:%d", cfg.metrics.host, relay.port)
    budget = RestartBudget(sup.max_restarts, sup.window_s)
    cp = ControlPlane(cfg)
    rc, run_ref = 0, None
    try:
        incarnation = wait_for_incarnation(ray, actor, stop, sup.reconnect_timeout_s, log)
        run_ref = actor.run.remote()
        while not stop.is_set():
            ready, _ = ray.wait([run_ref], timeout=1.0)
            if not ready:
                continue
            try:
                log.info("trainer run returned: %s", ray.get(run_ref))
                break
            except ray.exceptions.RayActorError as exc:
                why = str(exc).splitlines()[0]
                log.warning("trainer actor unavailable: %s", why)
                pid = wait_for_incarnation(ray, actor, stop, sup.reconnect_timeout_s, log)
                if pid is None:
                    break
                if pid != incarnation:  # a new process: one death, however many errors it took
                    incarnation = pid
                    budget.record(why)
                    note_restart(cp, "trainer", log)
                    if relay is not None:
                        relay.restarts = budget.total
                    log.error("trainer actor restarted as pid %d (%d within %.0f s, %d in all): %s",
                              pid, budget.in_window, sup.window_s, budget.total, why)
                # same process: the call was lost, not the actor; run() joins a loop still running
                run_ref = actor.run.remote()
    except BudgetExhausted as exc:
        log.error("trainer restart budget exhausted, giving up: %s", exc)
        rc = 2
        if relay is not None:
            relay.ended = f"restart budget exhausted: {exc}"
    except ray.exceptions.RayTaskError as exc:  # run() raised: a group out of budget, a bug
        log.error("trainer run failed, giving up: %s", exc)
        rc = 2
    except (ray.exceptions.ActorDiedError, TimeoutError) as exc:
        log.error("trainer actor is gone for good, giving up: %s", str(exc).splitlines()[0])
        rc = 2
    finally:
        try:
            ray.get(actor.stop.remote(), timeout=10)
            if run_ref is not None:
                ray.get(run_ref, timeout=30)
        except Exception as exc:  # noqa: BLE001
            log.warning("trainer did not stop cleanly: %s", exc)
            rc = rc or 1
        ray.kill(actor)
        ray.shutdown()
        if relay is not None:
            relay.close()
    return rc
