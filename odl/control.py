"""Control plane in Redis: desired state (pause flags, pinned version) written by the CLI, and
observed state (heartbeats with metrics) written by every component.

Components never talk to each other through the control plane's values for data; they only read
flags and publish what they see, so a dead control plane degrades to "no steering", not to data
loss.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from odl import names
from odl.config import Config
from odl.redis_conn import Client, atomic, redis_client


@dataclass
class Heartbeat:
    component: str
    instance: str
    ts: float
    state: str
    pid: int
    host: str
    version: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def age_s(self) -> float:
        return max(0.0, time.time() - self.ts)


class ControlPlane:
    def __init__(self, cfg: Config, client: Client | None = None):
        self.cfg = cfg
        self.r = client or redis_client(cfg)

    # --- desired state (CLI) --------------------------------------------------------------
    def pause(self, component: str) -> None:
        self.r.sadd(names.CP_PAUSED, component)

    def resume(self, component: str) -> None:
        """Resuming the exporter is also the operator's override of a gate freeze."""
        pipe = atomic(self.r, names.CP)
        pipe.srem(names.CP_PAUSED, component)
        if component == "exporter":
            pipe.delete(names.CP_FROZEN)
        pipe.execute()

    def record_embeddings(self, record: dict[str, Any]) -> None:
        """What the embedding generation serving reads holds: ``{"source": "trainer" |
        "version", "version", "generation", "ok", "reason", "ts"}`` (the exporter writes it)."""
        self.r.set(names.CP_EMBEDDINGS, json.dumps({"ts": time.time(), **record}))

    def embeddings(self) -> dict[str, Any] | None:
        raw = self.r.get(names.CP_EMBEDDINGS)
        return json.loads(raw) if raw else None

    def request_trainer_rollback(self, checkpoint: str, skip_ahead: bool, version: str) -> str:
        """Ask the trainer to roll back to ``checkpoint``; returns the request's id."""
        rid = uuid.uuid4().hex[:12]
        self.r.set(names.CP_TRAINER_ROLLBACK, json.dumps(
            {"id": rid, "checkpoint": checkpoint, "skip_ahead": skip_ahead, "version": version,
             "ts": time.time()}))
        return rid

    def trainer_rollback_request(self) -> dict[str, Any] | None:
        raw = self.r.get(names.CP_TRAINER_ROLLBACK)
        return json.loads(raw) if raw else None

    def pending_trainer_rollback(self) -> dict[str, Any] | None:
        """The rollback request not answered yet (the trainer's side), or None."""
        req = self.trainer_rollback_request()
        if req is None:
            return None
        done = self.trainer_rolled_back()
        return None if done is not None and done.get("id") == req["id"] else req

    def record_trainer_rollback(self, record: dict[str, Any]) -> None:
        """The trainer's answer: ``{"id", "ok", "reason", "step", "positions", ...}``."""
        self.r.set(names.CP_TRAINER_ROLLED_BACK, json.dumps({"ts": time.time(), **record}))

    def trainer_rolled_back(self) -> dict[str, Any] | None:
        raw = self.r.get(names.CP_TRAINER_ROLLED_BACK)
        return json.loads(raw) if raw else None

    def freeze(self, record: dict[str, Any]) -> None:
        """The gate refused what the exporter was about to publish: hold sparse deltas and dense
        refreshes (as a pin does) until a version passes or `odl resume exporter`."""
        self.r.set(names.CP_FROZEN, json.dumps(record))

    def unfreeze(self) -> None:
        self.r.delete(names.CP_FROZEN)

    def frozen(self) -> dict[str, Any] | None:
        raw = self.r.get(names.CP_FROZEN)
        return json.loads(raw) if raw else None

    def paused(self) -> set[str]:
        return set(self.r.smembers(names.CP_PAUSED))

    def is_paused(self, component: str) -> bool:
        return bool(self.r.sismember(names.CP_PAUSED, component))

    def pin_version(self, version: str | None) -> None:
        if version is None:
            self.r.delete(names.CP_PINNED_VERSION)
        else:
            self.r.set(names.CP_PINNED_VERSION, version)

    def promote(self, version: str) -> None:
        """Make ``version`` the newest as far as serving is concerned, and drop any pin."""
        pipe = atomic(self.r, names.CP)
        pipe.set(names.CP_LATEST_VERSION, version)
        pipe.delete(names.CP_PINNED_VERSION)
        pipe.execute()

    def pinned_version(self) -> str | None:
        return self.r.get(names.CP_PINNED_VERSION)

    def request_publish(self, skip_gate: bool = False) -> None:
        """Ask the exporter for a version now (``odl publish``)."""
        self.r.set(names.CP_PUBLISH_REQUEST, json.dumps({"ts": time.time(), "skip_gate": skip_gate}))

    def take_publish_request(self) -> dict[str, Any] | None:
        """The pending publish request, removed as it is read (the exporter's side)."""
        raw = self.r.getdel(names.CP_PUBLISH_REQUEST)
        return json.loads(raw) if raw else None

    # --- versions -------------------------------------------------------------------------
    def register_version(self, manifest: dict[str, Any]) -> None:
        pipe = atomic(self.r, names.CP)
        pipe.hset(names.CP_VERSIONS, manifest["version"], json.dumps(manifest))
        pipe.set(names.CP_LATEST_VERSION, manifest["version"])
        pipe.execute()

    def record_refused(self, record: dict[str, Any], keep: int = 50) -> None:
        pipe = atomic(self.r, names.CP)
        pipe.lpush(names.CP_REFUSED, json.dumps(record))
        pipe.ltrim(names.CP_REFUSED, 0, keep - 1)
        pipe.execute()

    def refused(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.r.lrange(names.CP_REFUSED, 0, -1)]

    def latest_version(self) -> str | None:
        return self.r.get(names.CP_LATEST_VERSION)

    def served_version(self) -> str | None:
        """The version serving must use: the pinned one if an operator pinned it, else the newest."""
        return self.pinned_version() or self.latest_version()

    def versions(self) -> list[dict[str, Any]]:
        out = [json.loads(v) for v in self.r.hvals(names.CP_VERSIONS)]
        return sorted(out, key=lambda m: (len(m["version"]), m["version"]))  # numeric order

    def forget_version(self, version: str) -> None:
        self.r.hdel(names.CP_VERSIONS, version)

    # --- observed state (components) ------------------------------------------------------
    def record_restart(self, instance: str) -> int:
        """A supervisor restarted ``instance``; returns its restarts so far."""
        return int(self.r.hincrby(names.CP_RESTARTS, instance, 1))

    def restarts(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.r.hgetall(names.CP_RESTARTS).items()}

    def heartbeat(self, hb: Heartbeat) -> int:
        """Publish ``hb``; returns the instance's restarts so far (read in the same round trip)."""
        key = names.cp_heartbeat(hb.instance)
        mapping = {"component": hb.component, "instance": hb.instance, "ts": hb.ts,
                   "state": hb.state, "pid": hb.pid, "host": hb.host,
                   "version": hb.version or "", "metrics": json.dumps(hb.metrics)}
        pipe = atomic(self.r, names.CP)
        pipe.hset(key, mapping=mapping)
        pipe.expire(key, self.cfg.control.heartbeat_ttl_s)
        pipe.sadd(names.CP_COMPONENTS, hb.instance)
        pipe.hget(names.CP_RESTARTS, hb.instance)
        return int(pipe.execute()[-1] or 0)

    def heartbeats(self) -> list[Heartbeat]:
        instances = sorted(self.r.smembers(names.CP_COMPONENTS))
        pipe = self.r.pipeline(transaction=False)
        for inst in instances:
            pipe.hgetall(names.cp_heartbeat(inst))
        out = []
        for inst, h in zip(instances, pipe.execute()):
            if not h:
                continue
            out.append(Heartbeat(component=h["component"], instance=inst, ts=float(h["ts"]),
                                 state=h["state"], pid=int(h["pid"]), host=h["host"],
                                 version=h["version"] or None, metrics=json.loads(h["metrics"])))
        return out


class Heartbeater:
    """Background thread that publishes a component's heartbeat every interval.

    ``probe`` returns (state, version, metrics) and is called on the heartbeat thread, so it must
    only read values the component already keeps (no blocking work).  Redis outages are logged
    and retried: a component keeps working while the control plane is away.
    """

    def __init__(self, cp: ControlPlane, component: str, instance: str,
                 probe: Callable[[], tuple[str, str | None, dict[str, Any]]],
                 on_restarts: Callable[[int], None] | None = None):
        self.cp, self.component, self.instance, self.probe = cp, component, instance, probe
        self.on_restarts = on_restarts    # told the instance's recorded restarts at each beat
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"hb-{instance}", daemon=True)
        self.paused = False

    def start(self) -> "Heartbeater":
        self._thread.start()
        return self

    def beat(self, final_state: str | None = None) -> None:
        state, version, metrics = self.probe()
        restarts = self.cp.heartbeat(Heartbeat(self.component, self.instance, time.time(),
                                               final_state or state, os.getpid(),
                                               socket.gethostname(), version, metrics))
        if self.on_restarts is not None:
            self.on_restarts(restarts)
        if final_state is None:
            self.paused = self.cp.is_paused(self.component)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
            except Exception as exc:  # noqa: BLE001 - keep beating through Redis outages
                print(f"[{self.instance}] heartbeat failed: {exc}", flush=True)
            self._stop.wait(self.cp.cfg.control.heartbeat_interval_s)

    def stop(self, final_state: str = "stopped") -> None:
        self._stop.set()
        try:
            self.beat(final_state)
        except Exception:  # noqa: BLE001 - the control plane may already be gone at shutdown
            pass
