"""`odl demo`: the whole pipeline on the local stack for a bounded time, with live progress, a
report (terminal, JSON, Markdown and an SVG chart of progressive AUC) and a clean shutdown."""
from __future__ import annotations

import json
import math
import shutil
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import redis
import requests

from odl.embedding_store import EmbeddingReader
from odl.config import Config
from odl.control import ControlPlane
from odl.launcher import LocalStack, StackError
from odl.plot import svg_line_chart
from odl.spec import is_default, running_spec
from odl.spec.synth import request_rows


class LoadClient:
    """Sends requests to every serving replica, round robin, ~``rate`` per second: predict
    requests of ``instances`` rows and, every other one, a recommendation over ``candidates``
    items.  Under a declared spec: predict requests of the spec's request fields only
    (``odl.spec.synth.request_rows``)."""

    def __init__(self, cfg: Config, rate: float = 20.0, instances: int = 8, candidates: int = 50):
        self.cfg, self.rate, self.instances, self.candidates = cfg, rate, instances, candidates
        self.latency_ms: list[float] = []
        self.rec_latency_ms: list[float] = []
        self.degraded = 0
        self.codes: dict[int, int] = {}
        self.versions: dict[str, int] = {}
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="loadgen", daemon=True)
        spec = running_spec(cfg)
        self.spec_rows = None if is_default(spec) else request_rows(spec, 1000, seed=1)

    def start(self) -> "LoadClient":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(5)

    def _loop(self) -> None:
        s = self.cfg.serving
        bases = [f"http://{s.host}:{p}/v1/models/{s.model_name}" for p in s.ports]
        rng = random.Random(1)
        session = requests.Session()
        n = 0
        users, items = self.cfg.source.num_users, self.cfg.source.num_items
        while not self._stop.wait(1.0 / self.rate):
            recommend, base = n % 2 == 1, bases[(n // 2) % len(bases)]   # each kind on every replica
            if self.spec_rows is not None:
                recommend = False
                url, body = base + ":predict", {"instances": rng.sample(self.spec_rows, self.instances)}
            elif recommend:
                url, body = base + ":recommend", {
                    "user_id": rng.randrange(users), "top_k": 10,
                    "candidates": rng.sample(range(items), min(self.candidates, items))}
            else:
                url, body = base + ":predict", {"instances": [
                    {"user_id": rng.randrange(users), "item_id": rng.randrange(items),
                     "position": k, "hour": time.gmtime().tm_hour} for k in range(self.instances)]}
            t = time.perf_counter()
            try:
                resp = session.post(url, json=body, timeout=5)
            except requests.RequestException:
                self.errors += 1
                continue
            finally:
                n += 1
            self.codes[resp.status_code] = self.codes.get(resp.status_code, 0) + 1
            if resp.status_code == 200:
                (self.rec_latency_ms if recommend else self.latency_ms).append((time.perf_counter() - t) * 1000)
                self.degraded += "X-ODL-Degraded" in resp.headers
                v = resp.json()["model_version"]
                self.versions[v] = self.versions.get(v, 0) + 1


@dataclass
class Snapshot:
    t: float
    events: int = 0
    dlq: int = 0
    samples: int = 0
    trained: int = 0
    auc: float = float("nan")
    auc_frozen: float = float("nan")
    auc_live_vs_frozen: float = float("nan")     # the live model on the frozen copy's samples
    logloss: float = float("nan")
    calibration: float = float("nan")
    frozen_at_step: int | None = None
    version: str | None = None
    served_requests: int = 0
    metrics: dict = field(default_factory=dict)


def _num(metrics: dict, key: str) -> float:
    """A heartbeat figure as a float; NaN when absent or null (nothing scored yet)."""
    v = metrics.get(key)
    return math.nan if v is None else float(v)


def observe(cp: ControlPlane, t0: float) -> Snapshot:
    snap = Snapshot(time.time() - t0)
    for hb in cp.heartbeats():
        m = hb.metrics
        if hb.component == "source":
            snap.events = int(m.get("events", 0))
        elif hb.component == "feature-job":
            snap.samples, snap.dlq = int(m.get("samples", 0)), int(m.get("dlq", 0))
        elif hb.component == "trainer":
            snap.trained, snap.auc = int(m.get("samples_trained", 0)), _num(m, "auc")
            snap.auc_frozen = _num(m, "auc_frozen")
            snap.auc_live_vs_frozen = _num(m, "auc_live_vs_frozen")
            snap.frozen_at_step = m.get("frozen_at_step")
            snap.logloss, snap.calibration = _num(m, "logloss"), _num(m, "calibration")
        elif hb.component == "exporter":
            snap.version = hb.version
        elif hb.component == "serving":
            snap.served_requests += int(m.get("requests", 0))
    return snap


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else math.nan


def run_demo(cfg: Config, config_path: str | None, duration: float) -> int:
    stack = LocalStack(cfg, config_path)
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    out_dir = cfg.paths.state_dir / "demo"
    out_dir.mkdir(parents=True, exist_ok=True)
    timeline: list[Snapshot] = []
    crashes: list[str] = []
    load: LoadClient | None = None
    started = time.time()
    try:
        # The local broker keeps nothing across runs and the trainer starts from scratch, so a
        # previous run's models and checkpoints would only be served as stale versions.
        if not stack.running():
            for stale in (cfg.paths.model_store, cfg.paths.checkpoints):
                shutil.rmtree(stale, ignore_errors=True)
        print(f"== odl demo: bringing the stack up (logs in {cfg.paths.logs})", flush=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C during start-up aborts
        stack.up(lambda msg: print("   " + msg, flush=True))
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        cp = ControlPlane(cfg)
        t0 = time.time()
        print(f"== running for {duration:.0f}s (Ctrl-C ends early)", flush=True)
        print(f"{'t':>5} {'events':>8} {'dlq':>5} {'samples':>8} {'trained':>8} {'auc':>6} "
              f"{'version':>7} {'requests':>8}", flush=True)
        while not stop.wait(5.0) and time.time() - t0 < duration:
            if load is None and cp.latest_version():  # requests start once a model exists
                load = LoadClient(cfg).start()
            snap = observe(cp, t0)
            timeline.append(snap)
            print(f"{snap.t:5.0f} {snap.events:8d} {snap.dlq:5d} {snap.samples:8d} {snap.trained:8d} "
                  f"{snap.auc:6.3f} {snap.version or '-':>7} {len(load.latency_ms) if load else 0:8d}", flush=True)
            for name, code, log_tail in stack.crashed():
                if name not in crashes:
                    crashes.append(name)
                    print(f"!! {name} exited with code {code}:\n{log_tail}", flush=True)
        final = observe(cp, t0)
        # a bounded source's heartbeat goes once it has finished: keep what it reported
        final.events = max([final.events] + [s.events for s in timeline])
        r = redis.Redis(host=cfg.redis.host, port=cfg.redis.port, password=cfg.redis.password)
        reader = EmbeddingReader(r)
        spec = running_spec(cfg)
        emb_rows = {t: reader.count(t) for t in (("user", "item") if is_default(spec) else spec.tables)}
        versions = cp.versions()
        exporter = next((hb.metrics for hb in cp.heartbeats() if hb.component == "exporter"), {})
        if load is None:
            load = LoadClient(cfg)  # no model was ever published: report zero requests
        load.stop()
        report = {
            "duration_s": round(time.time() - t0, 1), "wall_s_total": None,
            "events_in": final.events, "dlq": final.dlq, "samples": final.samples,
            "samples_trained": final.trained, "progressive_auc": final.auc,
            "frozen_baseline_auc": final.auc_frozen, "frozen_at_step": final.frozen_at_step,
            "live_auc_vs_frozen": final.auc_live_vs_frozen,
            "progressive_logloss": final.logloss, "progressive_calibration": final.calibration,
            "auc_over_time": [(round(s.t), s.auc) for s in timeline],
            "versions_exported": max([int(final.version or 0)] + [int(m["version"]) for m in versions]),
            "versions_retained": len(versions), "latest_version": final.version,
            "embeddings_in_redis": emb_rows,
            "exporter": {k: exporter.get(k) for k in ("generation", "refresh_seq", "refused",
                                                      "evicted", "redis_used_memory_bytes")},
            "requests_ok": len(load.latency_ms) + len(load.rec_latency_ms), "request_errors": load.errors,
            "status_codes": load.codes, "versions_served": load.versions, "degraded": load.degraded,
            "latency_ms": {"p50": _pct(load.latency_ms, 50), "p95": _pct(load.latency_ms, 95),
                           "p99": _pct(load.latency_ms, 99)},
            "recommend_latency_ms": {"p50": _pct(load.rec_latency_ms, 50),
                                     "p99": _pct(load.rec_latency_ms, 99),
                                     "candidates": load.candidates},
            "replicas": {hb.instance: {k: hb.metrics.get(k) for k in
                                       ("requests", "mean_batch_rows", "cache_rows", "dense_refresh",
                                        "degraded")} | {"version": hb.version}
                         for hb in cp.heartbeats() if hb.component == "serving"},
            "crashed": crashes,
        }
    except StackError as exc:
        print(f"!! the stack did not come up: {exc}", flush=True)
        return 1
    except KeyboardInterrupt:
        print("!! interrupted during start-up", flush=True)
        return 130
    finally:
        if load:
            load.stop()
        print("== bringing the stack down", flush=True)
        stack.down(lambda msg: print("   " + msg, flush=True))
        signal.signal(signal.SIGINT, previous)
    report["wall_s_total"] = round(time.time() - started, 1)
    _write_report(report, out_dir)
    flowing = all([report["events_in"], report["samples"], report["samples_trained"],
                   report["versions_exported"], sum(emb_rows.values()), report["requests_ok"]])
    return 0 if flowing and not crashes else 1


def _write_report(rep: dict, out_dir: Path) -> None:
    lat, ex = rep["latency_ms"], rep["exporter"]
    lines = [
        "== ODL demo report",
        f"   ran {rep['duration_s']}s ({rep['wall_s_total']}s with start-up and shutdown)",
        f"   events in           {rep['events_in']:>10}",
        f"   DLQ (rejected)      {rep['dlq']:>10}",
        f"   samples             {rep['samples']:>10}   (topic end offsets: tansu may report short)",
        f"   samples trained     {rep['samples_trained']:>10}",
        f"   progressive AUC     {rep['progressive_auc']:>10.4f}   (last trainer.auc_window samples)",
        (f"   vs a frozen copy    {rep['live_auc_vs_frozen']:>10.4f}   live, against "
         f"{rep['frozen_baseline_auc']:.4f} for the copy frozen at step {rep['frozen_at_step']}, "
         "on the same samples" if rep["frozen_at_step"] is not None else
         f"   vs a frozen copy    {'-':>10}   none yet (taken after trainer.frozen_baseline_after "
         "samples)"),
        f"   log-loss, calib.    {rep['progressive_logloss']:>10.4f}   calibration "
        f"{rep['progressive_calibration']:.3f} (mean predicted / observed; `odl eval` reports the same)",
        f"   versions exported   {rep['versions_exported']:>10}   ({rep['versions_retained']} retained)",
        f"   embeddings in Redis {sum(rep['embeddings_in_redis'].values()):>10}   {rep['embeddings_in_redis']}",
        f"   exporter            generation {ex.get('generation')}, dense refreshes "
        f"{ex.get('refresh_seq')}, refused {ex.get('refused')}, Redis used_memory "
        f"{(ex.get('redis_used_memory_bytes') or 0) / 2**20:.1f} MiB",
        f"   requests served     {rep['requests_ok']:>10}   errors {rep['request_errors']}, "
        f"codes {rep['status_codes']}, versions {rep['versions_served']}",
        f"   predict ms          p50 {lat['p50']:.1f}  p95 {lat['p95']:.1f}  p99 {lat['p99']:.1f}   "
        f"(degraded answers: {rep['degraded']})",
        f"   recommend ms        p50 {rep['recommend_latency_ms']['p50']:.1f}  p99 "
        f"{rep['recommend_latency_ms']['p99']:.1f}   ({rep['recommend_latency_ms']['candidates']} candidates)",
        *(f"   {name:<19} {r}" for name, r in sorted(rep["replicas"].items())),
        "   AUC over time       " + "  ".join(f"{t}s:{a:.3f}" for t, a in rep["auc_over_time"][::4]
                                             if not math.isnan(a)),
    ]
    if rep["crashed"]:
        lines.append(f"   CRASHED: {', '.join(rep['crashed'])}")
    text = "\n".join(lines)
    print(text, flush=True)
    (out_dir / "report.json").write_text(json.dumps(rep, indent=1))
    (out_dir / "report.md").write_text("```\n" + text + "\n```\n\n![progressive AUC](auc.svg)\n")
    pts = [(t, a) for t, a in rep["auc_over_time"] if not math.isnan(a)]
    (out_dir / "auc.svg").write_text(svg_line_chart(pts, "progressive AUC (dashed: chance)", "seconds", "AUC",
                                                      reference=0.5))
    print(f"   report: {out_dir / 'report.md'}  chart: {out_dir / 'auc.svg'}", flush=True)
