"""`odl bench chaos`: faults at random moments against a private local stack, then an audit.

The stack is `odl up`'s (broker, Redis, Ray, Flink mini-cluster, trainer, exporter, two serving
replicas), on free loopback ports in a temporary directory, with the trainer's checkpoint ledger
on.  Under steady serving load through a balancer-like client (``serving.balancer``), and with a
CPU-burning neighbour process for the middle part of the fault window, it SIGKILLs the trainer
actor, the feature job, the exporter and a serving replica, and kills Redis (its keeper restarts
it empty), each at a random moment of the window (one per slot; a target still recovering from
its previous fault is waited for).  Each fault's recovery time runs from the kill until the
component does its work again (:mod:`bench.chaos_faults`).  Then the source stops, the stream
drains, and the trainer's committed ledger is audited against the samples topic
(``trainers.audit``): lost, trained twice; the DLQ is read back for valid events made late.

Last line: ``RESULT chaos lost= dup= late= failed= max_recover_s= ...``.  Goal: 0, 0, 0, 0 and
every component back within 60 s.  A shorter plan of the same run is a slow test.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from bench.chaos_faults import FAULT_KINDS, Fault, Probes, wait_until
from bench.common import free_port, free_port_block
from bench.registry import BenchResult
from odl import names
from odl.config import Config, load_config
from odl.control import ControlPlane
from odl.kafka_util import TopicCounter, read_topic
from odl.launcher import LocalStack
from serving.balancer import FleetClient, run_load

DESCRIPTION = ("SIGKILL trainer actor x5, feature job x2, exporter x2, a serving replica, Redis, at "
               "random moments under serving load and a CPU burner; audit lost/dup/late/failed")
RECOVER_GOAL_S = 60.0


@dataclass
class ChaosPlan:
    """How many faults of each kind, over what window, under what load."""
    faults: dict[str, int] = field(default_factory=lambda: {
        "trainer": 5, "feature-job": 2, "exporter": 2, "replica": 1, "redis": 1})
    window_s: float = 420.0              # the faults fall at random moments of this window
    burner: tuple[float, float] = (0.3, 0.7)   # the neighbour burns a core over this share of it
    request_rate: float = 10.0           # serving requests a second, through the balancer
    source_rate: float = 150.0           # impressions a second
    recover_timeout_s: float = 180.0
    drain_timeout_s: float = 300.0
    seed: int = 1


@dataclass
class ChaosReport:
    result: dict
    lines: list[str]


def stack_config(base: Config, state_dir: Path, plan: ChaosPlan) -> Path:
    """The private stack's config file: free loopback ports, the ledger on, every checkpoint of
    the run kept (the audit walks their lineage)."""
    raw = {
        "paths": {"state_dir": str(state_dir), "cache_dir": str(base.paths.cache_dir)},
        "kafka": {"bootstrap_servers": f"127.0.0.1:{free_port()}"},
        "redis": {"port": free_port()},
        "ray": {"port": free_port()},
        "serving": {"ports": [free_port(), free_port()]},
        "metrics": {"base_port": free_port_block(12)},
        "exporter": {"version_interval_s": 10, "min_samples_per_version": 100},
        "source": {"rate": plan.source_rate, "malformed_rate": 0.01, "seed": plan.seed},
        "feature_job": {"attribution_window_s": 5, "checkpoint_interval_s": 5},
        "trainer": {"checkpoint": {"incremental_interval_s": 3, "full_interval_s": 60,
                                   "keep_full": 10_000, "ledger": True}},
    }
    path = state_dir / "odl.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _schedule(plan: ChaosPlan, rng: random.Random) -> list[tuple[float, str]]:
    """(offset into the window, kind) per fault: the window cut into one slot per fault, each
    fault at a uniformly random moment of its slot, the kinds in random order."""
    kinds = [k for k, n in plan.faults.items() for _ in range(n)]
    unknown = set(kinds) - set(FAULT_KINDS)
    if unknown:
        raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {sorted(FAULT_KINDS)}")
    rng.shuffle(kinds)
    slot = plan.window_s / max(1, len(kinds))
    return [(i * slot + rng.uniform(0, slot * 0.8), k) for i, k in enumerate(kinds)]


class Burner:
    """A core-burning neighbour process, started and ended by PID."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_chaos(base: Config, plan: ChaosPlan, progress: Callable[[str], None] = print,
              keep_dir: Path | None = None) -> ChaosReport:
    with tempfile.TemporaryDirectory(prefix="odl-chaos-") as tmp:
        state = keep_dir or Path(tmp)
        state.mkdir(parents=True, exist_ok=True)
        path = stack_config(base, state, plan)
        cfg = load_config(path, env={})
        stack = LocalStack(cfg, str(path))
        burner = Burner()
        previous = _exit_on_sigterm()
        try:
            stack.up(progress)
            return _run(cfg, stack, plan, burner, progress)
        finally:
            burner.stop()
            stack.down(progress)
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm():
    """SIGTERM ends the run through its ``finally`` (the private stack goes down with it)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, _frame):
        raise SystemExit(128 + signum)
    return signal.signal(signal.SIGTERM, stop)


def _run(cfg: Config, stack: LocalStack, plan: ChaosPlan, burner: Burner,
         progress: Callable[[str], None]) -> ChaosReport:
    rng = random.Random(plan.seed)
    cp = ControlPlane(cfg)
    probes = Probes(cfg, stack)
    t_up = time.monotonic()
    wait_until(probes.flowing, 300, "the stack to flow (samples trained, a version, replicas ready)", 2)
    progress(f"stack flowing after {time.monotonic() - t_up:.0f} s")

    urls = [f"http://127.0.0.1:{p}" for p in cfg.serving.ports]
    client = FleetClient(urls, seed=plan.seed)
    users, items = cfg.source.num_users, cfg.source.num_items

    def body(r: random.Random) -> dict:
        u = r.randrange(users)
        return {"instances": [{"user_id": u, "item_id": r.randrange(items)} for _ in range(5)]}

    stop_load = threading.Event()
    senders = run_load(client, "/v1/models/ctr:predict", body, plan.request_rate, stop_load)
    faults: list[Fault] = []
    t0 = time.monotonic()
    b_on, b_off = (plan.window_s * s for s in plan.burner)
    try:
        for at, kind in _schedule(plan, rng):
            while time.monotonic() - t0 < at:
                _burner_at(burner, time.monotonic() - t0, b_on, b_off, progress)
                time.sleep(0.2)
            busy = [f for f in faults if f.kind == kind and not f.settled]
            for f in busy:   # kill a component only once it is back from its previous fault
                f.wait(plan.recover_timeout_s)
            fault = FAULT_KINDS[kind](cfg, stack, probes, rng)
            fault.inject(time.monotonic() - t0)
            progress(f"t={fault.at_s:6.1f} s  {fault.describe()}")
            fault.watch(plan.recover_timeout_s)
            faults.append(fault)
        while time.monotonic() - t0 < plan.window_s:
            _burner_at(burner, time.monotonic() - t0, b_on, b_off, progress)
            time.sleep(0.2)
        burner.stop()
        for f in faults:
            f.wait(plan.recover_timeout_s)
            progress(f"{f.describe()}: " + (f"back after {f.recover_s:.1f} s" if f.recover_s is not None
                                            else f"NOT back ({f.error})"))
    finally:
        stop_load.set()
        for t in senders:
            t.join(timeout=10)
        client.close()
        burner.stop()
    restarts = _safe(cp.restarts, {})
    crashed = [name for name, *_ in stack.crashed() if name != "source"]
    drained = _drain(cfg, stack, plan, progress)
    audit, late, events = _audit(cfg, progress)
    return _report(plan, faults, client, audit, late, events, restarts, crashed, drained)


def _burner_at(burner: Burner, t: float, on: float, off: float, progress) -> None:
    if on <= t < off and burner.proc is None:
        burner.start()
        progress(f"t={t:6.1f} s  CPU burner on (pid {burner.proc.pid})")
    elif t >= off and burner.proc is not None and burner.proc.poll() is None:
        burner.stop()
        progress(f"t={t:6.1f} s  CPU burner off")


def _safe(fn, default):
    try:
        return fn()
    except Exception:  # noqa: BLE001 - a report field, not worth failing the run for
        return default


def _drain(cfg: Config, stack: LocalStack, plan: ChaosPlan, progress) -> float:
    """Stop the source, wait until the samples topic stops growing (the job's last windows
    close through watermark ticks), then until the trainer's newest checkpoint is past its end."""
    t0 = time.monotonic()
    src = stack._read_state().get("source")
    if src is not None:
        try:
            os.killpg(src.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    counter = TopicCounter(cfg)
    samples = names.topic(names.SAMPLES, cfg.kafka.topic_prefix)
    quiet_needed = cfg.feature_job.attribution_window_s + cfg.feature_job.idle_timeout_s + 15
    last, since = -1, time.monotonic()
    while time.monotonic() - since < quiet_needed:
        n = counter.count(samples)
        if n != last:
            last, since = n, time.monotonic()
        if time.monotonic() - t0 > plan.drain_timeout_s:
            raise RuntimeError("drain: the samples topic never stopped growing")
        time.sleep(1)
    counter.close()
    ends: dict[int, int] = {}
    for part, off, _ in read_topic(cfg, samples):     # the true ends (see read_topic)
        ends[part] = max(ends.get(part, 0), off + 1)
    from trainers.checkpoint import CheckpointStore
    from trainers.streaming import SOLO_SHARD, checkpoint_dir
    store = CheckpointStore(checkpoint_dir(cfg, SOLO_SHARD), keep_full=10_000)

    def covered() -> bool:
        cks = store.list()
        if not cks:
            return False
        pos = {int(p): o for p, o in cks[-1].meta.get("positions", {}).items()}
        return all(pos.get(p, 0) >= e for p, e in ends.items())
    wait_until(covered, plan.drain_timeout_s, "the trainer's checkpoint to cover the samples topic")
    took = time.monotonic() - t0
    progress(f"drained in {took:.0f} s: {last} sample records, trainer checkpointed past them")
    return took


def _audit(cfg: Config, progress):
    from trainers.audit import audit, committed_ledger, records_of
    from trainers.checkpoint import CheckpointStore
    from trainers.samples import codec_for_running_spec
    from trainers.streaming import SOLO_SHARD, checkpoint_dir
    p = cfg.kafka.topic_prefix
    records = read_topic(cfg, names.topic(names.SAMPLES, p))
    codec = codec_for_running_spec(cfg)
    ledger = committed_ledger(CheckpointStore(checkpoint_dir(cfg, SOLO_SHARD), keep_full=10_000))
    result = audit(codec, records, ledger, delayed=cfg.delayed_feedback and codec.labels_arrive_late)
    for key, part, off, value in records_of(codec, records, result.lost_keys):
        progress(f"lost key {key}: partition {part} offset {off}: {value[:400]!r}")
    late = 0
    for _, _, value in read_topic(cfg, names.topic(names.EVENTS_DLQ, p)):
        try:
            late += json.loads(value).get("reason") == "late_event"
        except (ValueError, AttributeError):
            pass
    from pipeline.watermark_ticks import TICK
    tick = TICK.encode()
    events = sum(v != tick for _, _, v in read_topic(cfg, names.topic(names.EVENTS, p)))
    progress(f"audit: {result.as_dict()}, late_event in the DLQ: {late}")
    return result, late, events


def _report(plan, faults, client, audit, late, events, restarts, crashed, drained) -> ChaosReport:
    s = client.stats
    recs = [f.recover_s for f in faults]
    back = [r for r in recs if r is not None]
    max_recover = max(back) if len(back) == len(recs) and back else float("inf")
    by_kind: dict[str, list[float | None]] = {}
    for f in faults:
        by_kind.setdefault(f.kind, []).append(f.recover_s)
    lines = ["faults (time to recover, s):"]
    lines += [f"  {k:<12} " + ", ".join("-" if r is None else f"{r:.1f}" for r in v) for k, v in by_kind.items()]
    lines += [f"events produced: {events}",
              f"sample records: {audit.records} ({audit.malformed} malformed); to train: {audit.expected}; "
              f"committed ledger: {audit.trained}",
              f"lost {audit.lost}, trained twice {audit.dup}, trained though not to be {audit.unexpected} "
              f"({audit.unexpected_in_topic} of them on rows the topic holds)",
              f"impressions the job sent with both labels: {audit.relabelled} "
              f"({audit.relabelled_negative_first} negative first)",
              f"valid events sent to the DLQ as late: {late}",
              f"requests: sent {s.sent}, ok {s.ok}, degraded {s.degraded}, retried {s.retried}, "
              f"failed {s.failed} {s.failures or ''}",
              f"restarts in the control plane: {restarts} (a Redis restart without persistence "
              f"clears the count; the keepers' log lines keep every one); components that gave up: "
              f"{crashed or 'none'}",
              f"drain: {drained:.0f} s"]
    result = {"lost": audit.lost, "dup": audit.dup, "late": late, "failed": s.failed,
              "max_recover_s": round(max_recover, 1), "goal_met": int(
                  audit.lost == 0 and audit.dup == 0 and late == 0 and s.failed == 0
                  and max_recover <= RECOVER_GOAL_S and not crashed),
              "faults": len(faults), "samples_expected": audit.expected, "samples_trained": audit.trained,
              "unexpected": audit.unexpected, "requests": s.sent, "degraded": s.degraded,
              "retried": s.retried, "gave_up": len(crashed)}
    return ChaosReport(result, lines)


def fault_counts(text: str, base: dict[str, int]) -> dict[str, int]:
    """``base`` with the counts of ``text`` ("feature-job=3,redis=0") in place of its own:
    ``--faults`` changes the kinds it names and keeps the others."""
    out = dict(base)
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, eq, n = part.partition("=")
        kind = kind.strip()
        if kind not in FAULT_KINDS:
            raise TypeError(f"--faults: unknown fault kind {kind!r} (known: {', '.join(FAULT_KINDS)})")
        if not eq or not n.strip().isdigit():
            raise TypeError(f"--faults: {part!r} wants kind=count, a count of 0 or more")
        out[kind] = int(n)
    if not any(out.values()):
        raise TypeError("--faults: the plan has no fault left")
    return out


def run(cfg: Config, seed: int | None = None, faults: str | None = None) -> BenchResult:
    """The default plan (``ChaosPlan``), or with another random seed and other fault counts."""
    plan = ChaosPlan()
    if seed is not None:
        plan.seed = seed
    if faults is not None:
        plan.faults = fault_counts(faults, plan.faults)
    rep = run_chaos(cfg, plan)
    return BenchResult(rep.result, rep.lines)
