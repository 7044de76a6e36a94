"""The faults of `odl bench chaos` and how each one's recovery is judged.

A fault is injected once; a thread then polls until the component does its work again, which
is the fault's recovery time:

- ``trainer``: SIGKILL of the trainer's Ray actor process.  Back when a new incarnation beats
  ``running`` and has trained more samples than it restored.
- ``feature-job``: SIGKILL of the job's whole process tree (driver, Flink JVM, Python workers)
  but its keeper.  Back when a new driver beats ``running`` and the samples topic has grown
  past its end at the kill.
- ``exporter``: SIGKILL of the exporter process.  Back when a new one beats ``running`` with an
  embedding generation in Redis.
- ``replica``: SIGKILL of one serving replica (chosen at random).  Back when it answers its
  readiness check (a model loaded) from a new process.
- ``redis``: SIGKILL of redis-server; its keeper starts it again, empty (the local stack keeps
  no Redis persistence).  Back when Redis answers, the exporter has written an embedding
  generation again, and every replica is ready and not degraded.
"""
from __future__ import annotations

import os
import random
import signal
import threading
import time
from typing import Callable

import redis
import requests

from odl.config import Config
from odl.control import ControlPlane, Heartbeat
from odl.embedding_store import Pointer
from odl.keeper import kill_component
from odl.launcher import LocalStack
from odl.redis_conn import redis_client


class Probes:
    """Read-only views of the stack the faults judge recovery by."""

    def __init__(self, cfg: Config, stack: LocalStack):
        self.cfg, self.stack = cfg, stack
        self.cp = ControlPlane(cfg)
        self.r = redis_client(cfg, timeout_s=2)

    def beat(self, instance: str) -> Heartbeat | None:
        try:
            return next((hb for hb in self.cp.heartbeats() if hb.instance == instance), None)
        except redis.RedisError:
            return None

    def health(self, replica: int) -> dict | None:
        """The replica's /healthz body when it answers 200 (a model loaded), else None."""
        port = self.cfg.serving.ports[replica]
        try:
            resp = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
        except requests.RequestException:
            return None
        return resp.json() if resp.status_code == 200 else None

    def generation(self) -> int | None:
        try:
            p = Pointer.read(self.r)
        except redis.RedisError:
            return None
        return p.generation if p else None

    def flowing(self) -> bool:
        hb = self.beat("trainer")
        return bool(hb and hb.metrics.get("samples_trained", 0) > 0 and self.cp.versions()
                    and all(self.health(n) for n in range(len(self.cfg.serving.ports)))
                    and self.generation() is not None)

    def group(self, name: str) -> int:
        st = self.stack._read_state().get(name)
        if st is None:
            raise RuntimeError(f"{name} is not part of the stack")
        return st.pid


class Fault:
    kind = ""

    def __init__(self, cfg: Config, stack: LocalStack, probes: Probes, rng: random.Random):
        self.cfg, self.stack, self.probes, self.rng = cfg, stack, probes, rng
        self.at_s = 0.0
        self.target = self.kind
        self.killed: set[int] = set()
        self.recover_s: float | None = None
        self.error: str | None = None
        self._t_kill = 0.0
        self._done = threading.Event()

    # --- to implement ---------------------------------------------------------------------------
    def kill(self) -> set[int]:
        """Inject the fault; returns the pids it killed."""
        raise NotImplementedError

    def back(self) -> bool:
        raise NotImplementedError

    # --- shared ---------------------------------------------------------------------------------
    def inject(self, at_s: float) -> None:
        self.at_s = at_s
        self._t_kill = time.monotonic()
        self.killed = self.kill()

    def watch(self, timeout_s: float) -> None:
        def loop() -> None:
            try:
                while time.monotonic() - self._t_kill < timeout_s:
                    try:
                        if self.back():
                            self.recover_s = time.monotonic() - self._t_kill
                            return
                    except Exception as exc:  # noqa: BLE001 - the stack is in flux: look again
                        self.error = f"{type(exc).__name__}: {exc}"
                    time.sleep(0.5)
                self.error = f"not back within {timeout_s:.0f} s" + (f" (last: {self.error})" if self.error else "")
            finally:
                self._done.set()
        threading.Thread(target=loop, name=f"chaos-{self.kind}", daemon=True).start()

    @property
    def settled(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout_s: float) -> None:
        self._done.wait(timeout_s + 5)

    def describe(self) -> str:
        return f"{self.kind:<11} {self.target} (pids {sorted(self.killed)})"

    def _new_beat(self, instance: str, state: str = "running") -> Heartbeat | None:
        hb = self.probes.beat(instance)
        return hb if hb and hb.pid not in self.killed and hb.state == state else None

    def _kill_group(self, name: str) -> set[int]:
        return set(kill_component(self.probes.group(name)))


def wait_until(pred: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.5):
    """``pred()``'s first truthy value; RuntimeError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(poll_s)
    raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")


class TrainerKill(Fault):
    kind = "trainer"

    def kill(self) -> set[int]:
        hb = wait_until(lambda: self.probes.beat("trainer"), 60, "a trainer heartbeat to kill")
        os.kill(hb.pid, signal.SIGKILL)
        self._first: int | None = None
        return {hb.pid}

    def back(self) -> bool:
        hb = self._new_beat("trainer")
        if hb is None or hb.metrics.get("restored_from") is None:
            return False
        n = hb.metrics.get("samples_trained", 0)
        if self._first is None:
            self._first = n
        return n > self._first


class FeatureJobKill(Fault):
    kind = "feature-job"

    def _samples(self) -> int:
        from odl import names
        from odl.kafka_util import TopicCounter
        counter = TopicCounter(self.cfg)
        try:
            return counter.count(names.topic(names.SAMPLES, self.cfg.kafka.topic_prefix))
        finally:
            counter.close()

    def kill(self) -> set[int]:
        self._samples_at_kill = self._samples()
        return self._kill_group("feature-job")

    def back(self) -> bool:
        # the topic itself, not the heartbeat's count: a new driver's observer re-reads the
        # topic from the start, which would add its catch-up to the recovery time
        return bool(self._new_beat("feature-job") and self._samples() > self._samples_at_kill)


class ExporterKill(Fault):
    kind = "exporter"

    def kill(self) -> set[int]:
        return self._kill_group("exporter")

    def back(self) -> bool:
        hb = self._new_beat("exporter")
        return bool(hb and hb.metrics.get("generation") is not None)


class ReplicaKill(Fault):
    kind = "replica"

    def kill(self) -> set[int]:
        self.replica = self.rng.randrange(len(self.cfg.serving.ports))
        self.target = f"serving-{self.replica}"
        return self._kill_group(self.target)

    def back(self) -> bool:
        return bool(self._new_beat(self.target, state="serving") and self.probes.health(self.replica))


class RedisRestart(Fault):
    kind = "redis"

    def kill(self) -> set[int]:
        return self._kill_group("redis")

    def back(self) -> bool:
        try:
            self.probes.r.ping()
        except redis.RedisError:
            return False
        if self.probes.generation() is None:
            return False
        health = [self.probes.health(n) for n in range(len(self.cfg.serving.ports))]
        return all(h is not None and not h.get("degraded") for h in health)


FAULT_KINDS: dict[str, type[Fault]] = {f.kind: f for f in
                                       (TrainerKill, FeatureJobKill, ExporterKill, ReplicaKill, RedisRestart)}
