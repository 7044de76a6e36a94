"""The trainer's outer loop, shared by the Ray actor and `odl run trainer --no-ray`: follow the
control plane (pause/resume keep the position), heartbeat, poll, train, checkpoint on schedule,
and checkpoint once more on a clean stop.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from odl.config import Config
from odl.control import ControlPlane, Heartbeat
from trainers.streaming import StreamingTrainer

log = logging.getLogger("odl.trainer")


class TrainerLoop:
    def __init__(self, cfg: Config, partitions: list[int] | None = None, shard: str = "trainer-0"):
        self.cfg = cfg
        self.trainer = StreamingTrainer(cfg, partitions=partitions, shard=shard)
        self.cp = ControlPlane(cfg)
        self.stop_event = threading.Event()
        self.paused = False
        self.state = "starting"

    def heartbeat(self) -> None:
        self.cp.heartbeat(Heartbeat("trainer", "trainer", time.time(), self.state, os.getpid(),
                                    socket.gethostname(), None, self.trainer.metrics()))

    def _follow_control_plane(self) -> None:
        try:
            paused = self.cp.is_paused("trainer")
            if paused != self.paused:
                self.trainer.set_paused(paused)
                self.paused = paused
                self.state = "paused" if paused else "running"
                log.info("trainer %s", self.state)
            self.heartbeat()
        except Exception as exc:  # noqa: BLE001 - control plane away: keep training
            log.warning("control plane: %s", exc)

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
                now = time.monotonic()
                if now >= next_hb:
                    next_hb = now + self.cfg.control.heartbeat_interval_s
                    self._follow_control_plane()
                if self.paused:  # no polling: a rebalance cannot resume partitions behind our back
                    self.stop_event.wait(0.2)
                    continue
                self.trainer.step(self.trainer.poll_batch())
                kind = self.trainer.due_checkpoint()
                if kind:
                    self.checkpoint(kind)
            self.checkpoint("incr")  # a clean stop loses no work
            self.state = "stopped"
            try:
                self.heartbeat()
            except Exception:  # noqa: BLE001
                pass
            return self.trainer.metrics()
        finally:
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
