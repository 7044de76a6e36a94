"""`odl bench feature-job`: the full feature job vs a plain SQL pass-through job, same events,
same private broker, same run.

Throughput: a fixed event set is pre-loaded; each job reads it from the start and the rate is
events / (time of the 95%-of-expected-output record - time of the first output record), which
leaves out the ~5 s job start.  Outputs are counted from the broker's end offsets
(``OutputCount``), not read: a Python consumer decoding every output took CPU from the job it
measured, on the same two cores.  The full job's expected outputs count the provisional sample
each impression also makes under delayed feedback (on by default): counted as one, the 95% mark
came when about half the events were through.  Latency: once the full job has caught up with the
backlog, live events are produced at ``LIVE_RATE`` events/s and each positive sample's arrival
is compared with its click's event time (= its produce time).
"""
from __future__ import annotations

import json
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from kafka import KafkaConsumer, TopicPartition

from bench.common import private_broker
from bench.registry import BenchResult
from odl.config import Config
from odl.kafka_util import create_topics, ensure_topics, producer, read_topic
from pipeline import feature_job, feature_sql
from pipeline.generator import SyntheticSource

DESCRIPTION = "feature job vs SQL pass-through: events/s and click-to-positive latency"
# Enough events for the steady state: with 120,000 the full job spent its run warming up (the
# JIT compiler thread alone took 126 us of CPU per event, 38 us with 480,000)
EVENTS = 480_000
LIVE_RATE = 2000.0
LIVE_SECONDS = 20.0
DRAIN_TIMEOUT_S = 180.0


@dataclass
class Arrivals:
    times: list[float]
    records: list[dict]


class OutputCount:
    """How many records ``topics`` hold, from the broker's end offsets every ``every_s``
    (a ListOffsets request each time, no record read): ``arrivals.times[k]`` is when the
    (k+1)-th output was first seen, to within ``every_s``."""

    def __init__(self, bootstrap: str, topics: list[str], every_s: float = 0.05):
        # a job's own output topic (the copies) may not exist before its first write
        create_topics(bootstrap, topics, partitions=1)
        self._c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
        self._tps = []
        deadline = time.monotonic() + 30
        for t in topics:
            while not self._c.partitions_for_topic(t):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"topic {t} has no partitions")
                time.sleep(0.1)
            self._tps += [TopicPartition(t, p) for p in sorted(self._c.partitions_for_topic(t))]
        self.base = self.total()   # what the topics held before: not this job's outputs
        self.every_s = every_s

    def total(self) -> int:
        return sum(self._c.end_offsets(self._tps).values())

    def run(self, stop: threading.Event, out: Arrivals) -> None:
        try:
            while not stop.is_set():
                n, now = self.total() - self.base, time.time()
                out.times.extend([now] * (n - len(out.times)))
                stop.wait(self.every_s)
        finally:
            self._c.close()


def _consume(bootstrap: str, topics: list[str], stop: threading.Event, out: Arrivals,
             from_end: threading.Event | None = None) -> None:
    """Read and decode ``topics`` into ``out`` from their beginning; with ``from_end``, from
    their end as of the start, and set it once the positions are fixed (what is produced after
    that is read)."""
    c = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                      enable_auto_commit=False, group_id=None, max_poll_records=5000)
    if from_end is None:
        c.subscribe(topics)
    else:
        tps = [TopicPartition(t, p) for t in topics for p in sorted(c.partitions_for_topic(t))]
        c.assign(tps)
        c.seek_to_end(*tps)
        for tp in tps:
            c.position(tp)
        from_end.set()
    try:
        while not stop.is_set():
            for recs in c.poll(timeout_ms=200).values():
                now = time.time()
                for r in recs:
                    out.times.append(now)
                    out.records.append(json.loads(r.value))
    finally:
        c.close()


def _events(start_ms: int, n: int, rate: float) -> list:
    cfg_src = Config().source.model_copy(update={"rate": rate / 1.2, "max_events": None})
    out = []
    for rec in SyntheticSource(cfg_src, start_ms).records():
        out.append(rec)
        if len(out) >= n:
            break
    return out


def _produce(bootstrap_cfg: Config, topic: str, records, paced: bool) -> None:
    prod = producer(bootstrap_cfg, linger_ms=20, batch_size=256 * 1024)
    t0 = time.time()
    base = records[0].due_ms if records else 0
    for rec in records:
        ts = rec.ts_ms
        value = rec.value
        if paced:  # live: event time is the moment of producing
            wait = t0 + (rec.due_ms - base) / 1000.0 - time.time()
            if wait > 0:
                time.sleep(wait)
            ts = int(time.time() * 1000)
            if rec.kind != "malformed":
                d = json.loads(value)
                d["ts_ms"] = ts
                value = json.dumps(d, separators=(",", ":")).encode()
        prod.send(topic, key=rec.key, value=value, timestamp_ms=ts)
    prod.flush()
    prod.close()


def _rate(arr: Arrivals, expected: int, events: int) -> tuple[float, float]:
    """events/s between the first output and the 95%-of-expected output; and that duration."""
    k = int(0.95 * expected)
    if len(arr.times) <= k:
        raise RuntimeError(f"only {len(arr.times)} of {expected} outputs arrived")
    dt = max(1e-3, arr.times[k] - arr.times[0])
    return 0.95 * events / dt, dt


def _wait_for(arr: Arrivals, n: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while len(arr.times) < n and time.monotonic() < deadline:
        time.sleep(0.2)


def _drain(bl: "Backlog", arr: Arrivals, n: int, timeout_s: float,
           quiet_s: float = 2.0) -> tuple[float, list[str]]:
    """Wait until the full job has written ``n`` outputs and none for ``quiet_s``: (seconds
    waited, the reason of each DLQ record).  The count from end offsets says when to look; the
    records themselves say whether all are there, as tansu can report end offsets a few records
    short of the log's end (``odl.kafka_util.read_topic``: 56 of 34,412 and 63 of 814,540 in
    two runs)."""
    start = time.monotonic()
    while True:
        while time.time() - arr.times[-1] < quiet_s and time.monotonic() - start < timeout_s:
            time.sleep(0.2)
        samples = len(read_topic(bl.cfg, bl.topics.samples))
        reasons = bl.dlq_reasons()
        if samples + len(reasons) >= n:
            return time.monotonic() - start, reasons
        if time.monotonic() - start > timeout_s:
            raise RuntimeError(f"the job did not catch up: {samples + len(reasons):,} of {n:,} "
                               f"outputs {timeout_s:.0f}s after the 95% mark")
        time.sleep(1.0)


def _run_job(cfg: Config, inserts_for, ddl_extra: list[str]):
    t_env = feature_job.build_table_env(cfg)
    for stmt in ddl_extra:
        t_env.execute_sql(stmt)
    return feature_job.statement_set(t_env, inserts_for).execute().get_job_client()


@dataclass
class Running:
    """A job started on the pre-loaded events, with a consumer recording what it emits."""
    client: object
    stop: threading.Event
    consumer: threading.Thread
    arrivals: Arrivals

    def rate(self, expected: int, events: int, timeout_s: float) -> tuple[float, float]:
        _wait_for(self.arrivals, int(0.95 * expected) + 1, timeout_s)
        try:
            return _rate(self.arrivals, expected, events)
        except RuntimeError:
            self.close()      # a job that fell short must not keep the benchmark alive
            raise

    def close(self) -> None:
        self.client.cancel().result()
        self.stop.set()
        self.consumer.join()


def _start(cfg: Config, bootstrap: str, ddl: list[str], inserts: list[str], out: list[str],
           decode: bool = False) -> Running:
    """The job, with its outputs on ``out`` read and decoded as they arrive (``decode``), or
    only counted (``OutputCount``: the throughput phases)."""
    stop, arr = threading.Event(), Arrivals([], [])
    if decode:
        th = threading.Thread(target=_consume, args=(bootstrap, out, stop, arr))
    else:
        th = threading.Thread(target=OutputCount(bootstrap, out).run, args=(stop, arr))
    th.start()
    try:
        client = _run_job(cfg, inserts, ddl)
    except BaseException:
        stop.set()   # the reader must not outlive a job that never started
        th.join()
        raise
    return Running(client, stop, th, arr)


def _copy_sink(name: str, topic: str, bootstrap: str) -> str:
    return (f"CREATE TABLE {name} (v STRING) WITH ('connector' = 'kafka', 'topic' = '{topic}', "
            f"'properties.bootstrap.servers' = '{bootstrap}', 'format' = 'raw')")


@dataclass
class Backlog:
    """A private broker holding a pre-loaded event set (``preloaded``), and how to start jobs
    on it: the benchmark's three jobs and ``scripts/feature_job_lateness.py``'s replay."""
    cfg: Config                 # the broker, a private prefix and state dir, never restored
    bootstrap: str
    topics: feature_sql.JobTopics
    events: list
    produce_s: float

    @property
    def impressions(self) -> int:
        return sum(r.kind == "impression" for r in self.events)

    @property
    def malformed(self) -> int:
        return sum(r.kind == "malformed" for r in self.events)

    @property
    def expected_outputs(self) -> int:
        """What the full job emits for the pre-loaded events: a sample per impression, and a
        provisional one too with delayed feedback (``Config.delayed_feedback``, on by default),
        a DLQ record per malformed event (clicks make positives of impressions' samples)."""
        per_impression = 2 if self.cfg.delayed_feedback else 1
        return per_impression * self.impressions + self.malformed

    def with_group(self, name: str) -> Config:
        """The config of a job that reads the events from the start under its own group."""
        return self.cfg.model_copy(update={"feature_job": self.cfg.feature_job.model_copy(
            update={"group_id": f"bench-{name}"})})

    def full_job(self, cfg: Config | None = None, decode: bool = True) -> Running:
        """The feature job itself, its samples and DLQ records decoded as they arrive (or only
        counted: ``OutputCount``)."""
        ddl, inserts = feature_sql.statements(cfg or self.cfg, self.topics)
        return _start(cfg or self.cfg, self.bootstrap, ddl, inserts,
                      [self.topics.samples, self.topics.dlq], decode=decode)

    def live_latency(self, seconds: float) -> np.ndarray:
        """With the full job running and caught up: live events at ``LIVE_RATE`` for
        ``seconds``, event time = produce time; the latency (ms) of each positive sample
        from its click's event time to its arrival."""
        arr, stop, ready = Arrivals([], []), threading.Event(), threading.Event()
        tail = threading.Thread(target=_consume, args=(self.bootstrap, [self.topics.samples],
                                                       stop, arr, ready))
        tail.start()
        try:
            ready.wait(30)
            live = _events(int(time.time() * 1000), int(LIVE_RATE * seconds), LIVE_RATE)
            _produce(self.cfg, self.topics.events, live, paced=True)
            time.sleep(5)
        finally:
            stop.set()
            tail.join()
        return np.asarray([arrived * 1000 - rec["label_ts_ms"]
                           for rec, arrived in zip(arr.records, arr.times)
                           if rec.get("label") == 1 and rec["label_ts_ms"] >= live[0].ts_ms])

    def dlq_reasons(self) -> list[str]:
        """The reason of every record on the DLQ so far."""
        return [json.loads(v).get("reason") for _, _, v in read_topic(self.cfg, self.topics.dlq)]


@contextmanager
def preloaded(cfg: Config, n_events: int, records=None,
              **feature_job_overrides) -> Iterator[Backlog]:
    """``n_events`` synthetic events (10 min in the past) on a private broker, plus later
    impressions on every partition that close the last attribution windows; the feature-job
    settings given override the config's (``restore`` is always off: a stack's or an earlier
    run's state must not leak into the measurement).  ``records(start_ms) -> (events, tail)``
    replaces the default shape's events (a spec's rows)."""
    with private_broker(cfg) as bootstrap, tempfile.TemporaryDirectory(prefix="odl-bench-fj-") as tmp:
        prefix = f"b{uuid.uuid4().hex[:6]}."
        bcfg = cfg.model_copy(update={
            "kafka": cfg.kafka.model_copy(update={"bootstrap_servers": bootstrap, "topic_prefix": prefix}),
            "paths": cfg.paths.model_copy(update={"state_dir": Path(tmp)}),
            "feature_job": cfg.feature_job.model_copy(update={**feature_job_overrides,
                                                              "restore": False})})
        ensure_topics(bcfg)
        topics = feature_sql.JobTopics(prefix + "events", prefix + "samples",
                                       prefix + "events.dlq", prefix + "features")
        start_ms = int(time.time() * 1000) - 600_000
        if records is not None:
            recs, tail = records(start_ms)
        else:
            recs = _events(start_ms, n_events, LIVE_RATE)
            tail = [r for r in _events(recs[-1].ts_ms + 60_000, 400, LIVE_RATE)
                    if r.kind == "impression"]
        # they stay in the past so that a live phase's events are not behind the watermark
        assert tail[0].ts_ms < time.time() * 1000 - 60_000, "pre-loaded events must lie in the past"
        t = time.time()
        _produce(bcfg, topics.events, recs + tail, paced=False)
        yield Backlog(bcfg, bootstrap, topics, recs, time.time() - t)


def _pass_through(bl: Backlog) -> tuple[float, float]:
    """A plain SQL job copying every event to a topic: (events/s, seconds for 95%)."""
    prefix = bl.cfg.kafka.topic_prefix
    job = _start(bl.with_group("pass"), bl.bootstrap,
                 [feature_sql.source_ddl(bl.cfg, bl.topics.events, "bench-pass"),
                  _copy_sink("copy_sink", prefix + "copy", bl.bootstrap)],
                 ["INSERT INTO copy_sink SELECT payload FROM events_raw"], [prefix + "copy"])
    try:
        return job.rate(len(bl.events), len(bl.events), 120)
    finally:
        job.close()


def _validation(bl: Backlog, ddl: list[str], outcome: str = "COALESCE(e.reason, e.etype)") -> float:
    """The job's parse stage alone (its ``checked`` view, one row out per event, ``outcome``
    of it): events/s."""
    prefix = bl.cfg.kafka.topic_prefix
    job = _start(bl.with_group("validate"), bl.bootstrap,
                 [*ddl, _copy_sink("checked_sink", prefix + "checked", bl.bootstrap)],
                 [f"INSERT INTO checked_sink SELECT {outcome} FROM checked"],
                 [prefix + "checked"])
    try:
        return job.rate(len(bl.events), len(bl.events), 120)[0]
    finally:
        job.close()


def run(cfg: Config, spec: str | None = None) -> BenchResult:
    if spec is not None:
        return run_spec(cfg, spec)
    with preloaded(cfg, EVENTS) as bl:
        topics, recs = bl.topics, bl.events
        n_imp, n_bad, produce_s = bl.impressions, bl.malformed, bl.produce_s
        group = bl.with_group

        # 1) plain SQL pass-through: every event copied to a topic
        pass_rate, pass_dt = _pass_through(bl)
        # 2) the job's validation stage alone (the parse UDF on every event, one row out per
        # event): the ceiling of any job that validates every event in Python
        val_rate = _validation(bl, feature_sql.statements(group("validate"), topics)[0])

        # 3) the full feature job on the same events
        job = bl.full_job(decode=False)
        expected = bl.expected_outputs
        full_rate, full_dt = job.rate(expected, len(recs), 300)
        # 4) latency at LIVE_RATE while the full job runs, once it has caught up with the
        # backlog (else the live events queue behind its last 5 %: the latency of a catch-up)
        try:
            drain_s, reasons = _drain(bl, job.arrivals, expected, DRAIN_TIMEOUT_S)
            late = reasons.count("late_event")
            if late:   # they would count as outputs, and are samples the job failed to make
                raise RuntimeError(f"{late:,} pre-loaded events went to the DLQ as late_event: "
                                   "the watermark overtook a partition (feature_job.idleness, "
                                   "idle_timeout_s)")
            lat = bl.live_latency(LIVE_SECONDS)
        finally:
            job.close()
        lat = lat if len(lat) else np.asarray([np.nan])

    ratio = full_rate / pass_rate
    lines = [f"{len(recs):,} events pre-loaded ({n_imp:,} impressions, {n_bad} malformed) in {produce_s:.1f}s",
             f"pass-through SQL job: {pass_rate:,.0f} events/s ({pass_dt:.2f}s for 95%)",
             f"validation stage:     {val_rate:,.0f} events/s (ratio {val_rate / pass_rate:.3f}): "
             f"source, parse UDF, sink only -- the ceiling of a job that parses in Python",
             f"full feature job:     {full_rate:,.0f} events/s ({full_dt:.2f}s for 95%)",
             f"backlog drained {drain_s:.1f}s after the 95% mark; then "
             f"click -> positive sample at {LIVE_RATE:.0f} events/s for {LIVE_SECONDS:.0f}s: "
             f"p50 {np.percentile(lat, 50):.0f} ms, p95 {np.percentile(lat, 95):.0f} ms ({len(lat)} positives)"]
    return BenchResult({"ratio": round(ratio, 3), "full_events_per_s": round(full_rate),
                        "passthrough_events_per_s": round(pass_rate),
                        "validation_events_per_s": round(val_rate),
                        "validation_ratio": round(val_rate / pass_rate, 3),
                        "p50_positive_latency_ms": round(float(np.percentile(lat, 50)), 1),
                        "p95_positive_latency_ms": round(float(np.percentile(lat, 95)), 1),
                        "live_rate": LIVE_RATE, "events": len(recs)}, lines)


SPEC_ROWS = 200_000


def run_spec(cfg: Config, spec_path: str) -> BenchResult:
    """The job a feature spec generates (``pipeline.spec_sql``) vs the pass-through, on a
    synthetic log of the spec's shape (``odl.spec.synth``; a spec whose rows carry their label)."""
    from odl.spec import load_spec
    from odl.spec.synth import synthetic_rows
    from pipeline.generator import Record
    from pipeline.spec_sql import spec_statements

    spec = load_spec(spec_path)
    tf = spec.events.time_field

    def records(start_ms: int):
        def rec(row: dict, key: int) -> Record:
            return Record(row[tf], str(key).encode(), json.dumps(row).encode(), row[tf], "event")
        rows = synthetic_rows(spec, SPEC_ROWS, seed=1, gap_ms=(0, 2), start_ms=start_ms)
        tail = synthetic_rows(spec, 16, seed=2, gap_ms=(1, 1), start_ms=rows[-1][tf] + 60_000)
        return [rec(r, k) for k, r in enumerate(rows)], [rec(r, k) for k, r in enumerate(tail)]

    scfg = cfg.model_copy(update={"spec": Path(spec_path).resolve()})
    with preloaded(scfg, SPEC_ROWS, records=records) as bl:
        pass_rate, pass_dt = _pass_through(bl)
        # the parse stage alone, every column of ``checked`` used as the job uses them (with
        # feature_job.sql_parse the planner then keeps one parse for both of its branches)
        val_rate = _validation(bl, spec_statements(bl.with_group("validate"), spec, bl.topics)[0],
                               "CONCAT_WS('|', COALESCE(reason, etype), fields, CAST(`offset` AS "
                               "STRING), CAST(ts AS STRING), CAST(CHAR_LENGTH(payload) AS STRING), "
                               "CAST(late AS STRING))")
        ddl, inserts = spec_statements(bl.cfg, spec, bl.topics)
        job = _start(bl.cfg, bl.bootstrap, ddl, inserts, [bl.topics.samples, bl.topics.dlq])
        try:
            full_rate, full_dt = job.rate(len(bl.events), len(bl.events), 600)
            refused = len(bl.dlq_reasons())
        finally:
            job.close()
    if refused:
        raise RuntimeError(f"{refused:,} synthetic rows went to the DLQ: every row is valid")
    ratio = full_rate / pass_rate
    lines = [f"spec {spec.name}: {len(bl.events):,} synthetic rows pre-loaded in {bl.produce_s:.1f}s "
             f"({len(spec.realtime.counts)} counts, {len(spec.realtime.sequences)} sequences)",
             f"pass-through SQL job: {pass_rate:,.0f} events/s ({pass_dt:.2f}s for 95%)",
             f"validation stage:     {val_rate:,.0f} events/s (ratio {val_rate / pass_rate:.3f})",
             f"spec feature job:     {full_rate:,.0f} events/s ({full_dt:.2f}s for 95%), "
             f"sql_parse={cfg.feature_job.sql_parse} (SQL vs Python parse: odl bench spec-parse)"]
    return BenchResult({"ratio": round(ratio, 3), "full_events_per_s": round(full_rate),
                        "passthrough_events_per_s": round(pass_rate),
                        "validation_events_per_s": round(val_rate),
                        "validation_ratio": round(val_rate / pass_rate, 3),
                        "events": len(bl.events), "spec": spec.name}, lines)
