"""The trainer's outer loop, shared by the Ray actor and `odl run trainer --no-ray`: follow the
control plane (pause/resume keep the position), heartbeat, poll, train, checkpoint on schedule,
and checkpoint once more on a clean stop.

In a training group (``member``) the loop does not checkpoint by itself: the coordinator holds
it at a step boundary (``hold``), has it write its part of a group epoch, and releases it; and
every ``sync_every_steps`` steps it exchanges its dense weights with the group's averager.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any, Callable

from redis import RedisError

from odl.config import Config
from odl.control import ControlPlane, Heartbeat
from trainers.group import GroupMember
from trainers.ps import ShardedCTRModel, ShardedTables
from trainers.streaming import StreamingTrainer
from trainers.tf_threads import apply_intra_op_threads

log = logging.getLogger("odl.trainer")


class StepGate:
    """The hold protocol between a group coordinator and a trainer loop.  The coordinator's n-th
    ``hold`` returns once the loop, between steps, has parked for request n; ``release`` lets it
    go on.  One condition guards it all, so a release followed at once by the next hold cannot be
    missed by a loop still parked from the previous one (it answers the new request in place)."""

    def __init__(self, name: str):
        self.name = name
        self._cv = threading.Condition()
        self._held = False
        self._holds = 0          # hold requests so far
        self._parked_for = 0     # the request the loop is parked for
        self._ended = False      # the loop has returned or raised

    @property
    def requested(self) -> bool:
        return self._held

    @property
    def parked(self) -> bool:
        """Held at a step boundary: the model and positions will not change until release."""
        with self._cv:
            return self._held and self._parked_for == self._holds

    def hold(self, timeout_s: float = 60.0) -> None:
        with self._cv:
            self._holds += 1
            self._held = True
            want = self._holds
            self._cv.notify_all()
            ok = self._cv.wait_for(lambda: self._parked_for == want or self._ended, timeout_s)
            if not ok or self._ended:
                self._held = False
                raise TimeoutError(f"{self.name} did not reach a step boundary "
                                   f"({'its loop ended' if self._ended else f'{timeout_s}s'})")

    def release(self) -> None:
        with self._cv:
            self._held = False
            self._cv.notify_all()

    def park(self, stopping: Callable[[], bool]) -> None:
        """Called by the loop between steps: stay parked while held (answering each request)."""
        with self._cv:
            while self._held and not stopping():
                self._parked_for = self._holds
                self._cv.notify_all()
                self._cv.wait(0.2)

    def end(self) -> None:
        with self._cv:
            self._ended = True
            self._cv.notify_all()


class TrainerLoop:
    def __init__(self, cfg: Config, member: GroupMember | None = None):
        self.cfg = cfg
        self.member = member
        apply_intra_op_threads(cfg.trainer.intra_op_threads)    # before the model's first op
        if member is None:
            self.trainer = StreamingTrainer(cfg)
            self.instance = "trainer"
        else:
            model = ShardedCTRModel(cfg.trainer, ShardedTables(member.shards, remote=True))
            self.trainer = StreamingTrainer(cfg, member.partitions, member.name, model=model,
                                            group=True, group_epoch=member.epoch)
            self.instance = member.name
            if member.skip_ahead:     # a group rolled back with --skip-ahead
                self.trainer.skip_ahead()
        self.cp = ControlPlane(cfg)
        self.stop_event = threading.Event()
        self.paused = False
        self.state = "starting"
        self.gate = StepGate(self.instance)   # the group coordinator's hold at a step boundary
        self._last_sync = self.trainer.model.step

    def heartbeat(self) -> None:
        self.cp.heartbeat(Heartbeat("trainer", self.instance, time.time(), self.state, os.getpid(),
                                    socket.gethostname(), None, self.trainer.metrics()))

    # --- group: dense averaging ----------------------------------------------------------------
    def _sync_dense(self) -> None:
        """Exchange dense weights with the averager and adopt the group's average."""
        import ray
        model = self.trainer.model
        avg = ray.get(self.member.averager.exchange.remote(self.member.index, model.dense_weights()))
        with model.lock:
            for k, v in avg.items():
                model.dense[k].assign(v)
        self._last_sync = model.step

    def _follow_control_plane(self) -> None:
        try:
            self._follow_rollback()
            paused = self.cp.is_paused("trainer")
            if paused != self.paused:
                self.trainer.set_paused(paused)
                self.paused = paused
                self.state = "paused" if paused else "running"
                log.info("trainer %s", self.state)
            self.heartbeat()
        except (RedisError, OSError) as exc:  # control plane away: keep training
            log.warning("control plane: %s", exc)
        except Exception:  # noqa: BLE001 - a bug here must not stop training, but must show
            log.exception("control plane step failed")

    def _follow_rollback(self) -> None:
        """Carry out an `odl rollback --trainer` request once (answered by its id).  A group
        member leaves it to the coordinator, which rebuilds the group (trainers.coordinator)."""
        if self.member is not None:
            return
        req = self.cp.pending_trainer_rollback()
        if req is None:
            return
        answer: dict[str, Any] = {"id": req["id"], "instance": self.instance}
        try:
            answer.update(ok=True, reason=None, **self.trainer.rollback_to(
                req["checkpoint"], bool(req.get("skip_ahead"))))
        except Exception as exc:  # noqa: BLE001 - answered, not fatal: training goes on
            log.error("rollback to %s failed: %s", req["checkpoint"], exc)
            answer.update(ok=False, reason=str(exc))
        self.cp.record_trainer_rollback(answer)

    def checkpoint(self, kind: str) -> None:
        try:
            info = self.trainer.checkpoint(kind)
            log.debug("checkpoint %s", info.path.name)
        except OSError as exc:  # disk trouble: keep training, the next attempt may succeed
            log.error("checkpoint failed: %s", exc)

    def run(self) -> dict[str, Any]:
        """Train until ``stop_event`` is set; returns the final metrics."""
        next_hb = 0.0
        self.state = "running"
        try:
            while not self.stop_event.is_set():
                if self.gate.requested:
                    self.trainer.model.flush()   # gradients in flight reach the shards first
                    self.gate.park(self.stop_event.is_set)
                    continue
                now = time.monotonic()
                if now >= next_hb:
                    next_hb = now + self.cfg.control.heartbeat_interval_s
                    self._follow_control_plane()
                if self.paused:  # no polling: a rebalance cannot resume partitions behind our back
                    self.stop_event.wait(0.2)
                    continue
                self.trainer.step(self.trainer.poll_batch())
                if self.member is not None:
                    if self.trainer.model.step - self._last_sync >= self.cfg.trainer.scale.sync_every_steps:
                        self._sync_dense()
                    continue
                kind = self.trainer.due_checkpoint()
                if kind:
                    self.checkpoint(kind)
            if self.member is None:
                self.checkpoint("incr")  # a clean stop loses no work (a group: its coordinator)
            self.state = "stopped"
            try:
                self.heartbeat()
            except Exception:  # noqa: BLE001
                pass
            return self.trainer.metrics()
        finally:
            self.gate.end()
            self.trainer.close()


def run_standalone(cfg: Config) -> int:
    """`odl run trainer --no-ray`: the same loop in this process (no Ray cluster needed)."""
    import signal

    from odl.runtime import setup_logging
    setup_logging("trainer")
    loop = TrainerLoop(cfg)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: loop.stop_event.set())
    metrics = loop.run()
    log.info("trainer stopped: %s", {k: metrics[k] for k in ("samples_trained", "step", "checkpoint")})
    return 0
