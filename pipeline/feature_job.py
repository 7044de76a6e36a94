"""The PyFlink feature job: its environment (jars, checkpoints, loopback listeners, restore)
and the driver process that submits it and reports its metrics.

The job itself -- validation, dedup, label join, point-in-time features -- is Flink SQL in
``pipeline.feature_sql`` (DESIGN.md: Python DataStream windows are 25-50x slower here); Python
only provides the UDFs in ``pipeline.udfs``.
"""
from __future__ import annotations

import json
import os
import site
import sys
import threading
import time
from pathlib import Path

from kafka import KafkaConsumer
from prometheus_client import Counter

from odl import names
from odl.config import Config
from odl.runtime import Component
from odl.spec import is_default, running_spec
from pipeline import spec_udfs, udfs
from pipeline.feature_sql import JobTopics, one_insert_per_sink, statements
from pipeline.spec_sql import spec_statements
from pipeline.flink_metrics import FlinkJobMetrics, port_range
from pipeline.watermark_ticks import WatermarkTicker

DLQ_REASONS = Counter("odl_feature_job_dlq_total", "events rejected to the DLQ", ["reason"])
SAMPLES = Counter("odl_feature_job_samples_total", "samples emitted by the label join", ["label"])
# Per-key state (dedup ids, temporal-join versions) expires this long after its last use; the
# longest window must fit, or a quiet entity would lose state that a feature still needs.
STATE_TTL_S = 2 * 3600
TICK_EVERY_S = 1.0    # how often the driver looks for quiet partitions to tick


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint (one with ``_metadata``) of any earlier run under root."""
    done = [m.parent for m in root.glob("*/chk-*/_metadata")]
    return max(done, key=lambda p: p.stat().st_mtime) if done else None


def build_table_env(cfg: Config):
    from pyflink.table import EnvironmentSettings, TableEnvironment

    fj = cfg.feature_job
    local = fj.deployment == "local"
    for jar in cfg.paths.flink_jars if local else ():   # a cluster image carries them in lib/
        if not jar.is_file():
            raise FileNotFoundError(f"Flink Kafka connector jar missing: {jar} (run `make setup`)")
    # In a local deployment PyFlink otherwise starts Beam's loopback worker pool on [::]:0, a
    # listener on every interface; UDFs run in thread mode (below), so that pool is not needed.
    os.environ["_python_worker_execution_mode"] = "process"
    # Thread mode embeds CPython in the JVM (PEMJA), which ignores the venv: hand it the venv's
    # site-packages and the repository through PYTHONPATH, inherited by the gateway JVM.
    paths = [str(Path(__file__).resolve().parent.parent), *site.getsitepackages()]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    t_env = TableEnvironment.create(EnvironmentSettings.in_streaming_mode())
    conf = t_env.get_config()
    settings = flink_settings(cfg)
    if "execution.state-recovery.path" in settings:
        print(f"restoring feature job state from {settings['execution.state-recovery.path']}",
              flush=True)
    for k, v in settings.items():
        conf.set(k, v)
    spec = running_spec(cfg)
    if is_default(spec):
        udfs.register(t_env)
    else:
        spec_udfs.register(t_env, spec)
    return t_env


def flink_settings(cfg: Config) -> dict[str, str]:
    """The Flink configuration of the job: ODL's settings, the local mini-cluster's where the
    deployment is local, the newest retained checkpoint to restore from, and last the
    operator's ``feature_job.flink_settings``, which replace any of them.  Creates the local
    checkpoint directory."""
    fj = cfg.feature_job
    local = fj.deployment == "local"
    ckpt = cfg.paths.checkpoints / "flink"
    if fj.checkpoint_dir is None:
        ckpt.mkdir(parents=True, exist_ok=True)
    settings = {
        "pipeline.name": "odl-feature-job",
        "parallelism.default": str(fj.parallelism),
        "execution.checkpointing.interval": f"{fj.checkpoint_interval_s} s",
        "execution.checkpointing.storage": "filesystem",
        "execution.checkpointing.dir": fj.checkpoint_dir or ckpt.resolve().as_uri(),
        # keep the newest checkpoint when the job is cancelled or killed: it is the restart point
        "execution.checkpointing.externalized-checkpoint-retention": "RETAIN_ON_CANCELLATION",
        "execution.checkpointing.num-retained": "2",
        # no source idleness by default: it can pass a partition with unread records
        # (FLINK-40234); quiet partitions get watermark ticks from the driver instead
        # (pipeline.watermark_ticks)
        "table.exec.source.idle-timeout": (f"{fj.idle_timeout_s} s" if fj.idleness == "flink"
                                           else "0 ms"),
        "table.local-time-zone": "UTC",
        "table.exec.state.ttl": f"{STATE_TTL_S} s",
        # Python UDFs in-process (PEMJA): no Beam gRPC servers, no worker processes.
        "python.execution-mode": "thread",
        # chained SQL operators hand rows on without a defensive deep copy each (they do not keep
        # or mutate their inputs): 6.5k -> 8.1k events/s in one side-by-side pair of the full
        # job (docs/features.md#throughput)
        "pipeline.object-reuse": "true",
        "pipeline.operator-chaining.enabled": str(fj.operator_chaining).lower(),
        "execution.buffer-timeout.interval": f"{fj.buffer_timeout_ms} ms",
        "pipeline.auto-watermark-interval": f"{fj.watermark_interval_ms} ms",
    }
    if local:
        settings.update(_local_settings(cfg))
    restore = latest_checkpoint(ckpt) if fj.restore and fj.checkpoint_dir is None else None
    if restore is not None:
        settings["execution.state-recovery.path"] = restore.resolve().as_uri()
    settings.update(fj.flink_settings)    # the operator's own, over ODL's
    return settings


def _local_settings(cfg: Config) -> dict[str, str]:
    """The mini-cluster's: this venv's Python, the connector jars, every listener on loopback.
    (A cluster restores from its own checkpoints -- the operator's upgrade mode -- and its
    image carries the jars and Python.)"""
    return {
        "pipeline.jars": ";".join(p.resolve().as_uri() for p in cfg.paths.flink_jars),
        "python.executable": sys.executable,
        "python.client.executable": sys.executable,
        # Every Flink listener on loopback only.
        "rest.bind-address": "127.0.0.1",
        "rest.port": cfg.feature_job.rest_ports,
        "jobmanager.bind-host": "127.0.0.1",
        "taskmanager.bind-host": "127.0.0.1",
        "rest.address": "127.0.0.1",
        "taskmanager.host": "127.0.0.1",
        "jobmanager.rpc.address": "127.0.0.1",
    }


def submit(cfg: Config):
    """Build and submit the job; returns the TableResult of the statement set."""
    p = cfg.kafka.topic_prefix
    topics = JobTopics(names.topic(names.EVENTS, p), names.topic(names.SAMPLES, p),
                       names.topic(names.EVENTS_DLQ, p), names.topic(names.FEATURES, p))
    t_env = build_table_env(cfg)
    spec = running_spec(cfg)
    ddl, inserts = statements(cfg, topics) if is_default(spec) else spec_statements(cfg, spec, topics)
    for stmt in ddl:
        t_env.execute_sql(stmt)
    return statement_set(t_env, inserts).execute(), topics


def statement_set(t_env, inserts: list[str]):
    """The job's INSERTs as Flink runs them: one per sink table (``one_insert_per_sink``).
    The benchmarks build their jobs through this too, so they measure the same plan."""
    stmt_set = t_env.create_statement_set()
    for ins in one_insert_per_sink(inserts):
        stmt_set.add_insert_sql(ins)
    return stmt_set


def _reason(value: bytes) -> str:
    try:
        return str(json.loads(value)["reason"])
    except (ValueError, KeyError, TypeError):
        return "unreadable_dlq_record"


class JobObserver:
    """What the job emitted, for the heartbeat and Prometheus: samples by label and DLQ records
    by reason (read back from the topics: Flink's own counters stay inside the JVM), plus input
    rate and watermark lag from Flink's REST API."""

    def __init__(self, cfg: Config, topics: JobTopics, job_id: str):
        self.state: dict = {"positives": 0, "negatives": 0, "dlq": 0, "dlq_reasons": {}}
        self._c = KafkaConsumer(topics.samples, topics.dlq, bootstrap_servers=cfg.kafka.bootstrap_servers,
                                group_id=None, auto_offset_reset="earliest", enable_auto_commit=False,
                                client_id="odl-feature-job-observer", max_poll_records=20_000)
        self._dlq_topic = topics.dlq
        self._flink = FlinkJobMetrics("127.0.0.1", port_range(cfg.feature_job.rest_ports), job_id)

    def poll(self) -> None:
        s = self.state
        for tp, recs in self._c.poll(timeout_ms=0, max_records=20_000).items():
            if tp.topic == self._dlq_topic:
                for rec in recs:
                    reason = _reason(rec.value)
                    s["dlq_reasons"][reason] = s["dlq_reasons"].get(reason, 0) + 1
                    DLQ_REASONS.labels(reason).inc()
                s["dlq"] += len(recs)
                continue
            pos = sum(b'"label":1' in rec.value for rec in recs)  # no JSON parse on this path
            s["positives"] += pos
            s["negatives"] += len(recs) - pos
            SAMPLES.labels("1").inc(pos)
            SAMPLES.labels("0").inc(len(recs) - pos)
        s["samples"] = s["positives"] + s["negatives"]
        s.update(self._flink.sample())

    def close(self) -> None:
        self._c.close()


def run(cfg: Config) -> int:
    """``odl run feature-job``: submit the job to a local mini-cluster and supervise it; on
    stop, cancel it (its newest checkpoint is the restart point)."""
    return _supervise(cfg, cancel_on_stop=True)


def main() -> int:
    """``python -m pipeline.feature_job``: the job as a Flink cluster runs it (application mode
    through PythonDriver: docker-compose's JobManager, the operator's FlinkDeployment).  Config
    from ``ODL_CONFIG`` / ``ODL__`` variables, with ``feature_job.deployment: cluster``.  This
    process lives as long as the job, on the JobManager, and reports it as the local driver does:
    heartbeat, ``odl_feature_job_*`` on the feature job's metrics port, Flink's figures from the
    REST API of the JobManager it runs beside."""
    from odl.config import load_config
    cfg = load_config()
    if cfg.feature_job.deployment != "cluster":
        raise SystemExit("python -m pipeline.feature_job runs on a Flink cluster: set "
                         "ODL__FEATURE_JOB__DEPLOYMENT=cluster (locally use `odl run feature-job`)")
    return _supervise(cfg, cancel_on_stop=False)


def _supervise(cfg: Config, cancel_on_stop: bool) -> int:
    """Submit, then observe until the job ends (exit 1: it failed or was cancelled) or this
    process is stopped."""
    comp = Component(cfg, "feature-job")
    comp.install_signal_handlers()
    result, topics = submit(cfg)
    client = result.get_job_client()
    job_id = str(client.get_job_id()) if client else "?"
    comp.log.info("feature job %s submitted", job_id)
    state: dict = {"status": "RUNNING", "samples": 0, "dlq": 0, "dlq_reasons": {}}
    started = time.time()

    def observe() -> None:
        obs = JobObserver(cfg, topics, job_id)
        try:
            while not comp.stop.is_set():
                try:
                    state["status"] = client.get_job_status().result().name if client else "?"
                    obs.poll()
                    state.update(obs.state)
                    comp.work.beat("observe", waiting=None if state["status"] == "RUNNING"
                                   else f"job {state['status'].lower()}")
                except Exception as exc:  # noqa: BLE001
                    comp.log.warning("observe failed: %s", exc)
                    comp.work.beat("observe", waiting=f"job status unknown ({exc})")
                comp.stop.wait(cfg.control.heartbeat_interval_s)
        finally:
            obs.close()

    def tick() -> None:   # idleness in-band (pipeline.watermark_ticks): the job has none itself
        ticker = None
        while not comp.stop.is_set():
            try:
                ticker = ticker or WatermarkTicker(cfg.kafka.bootstrap_servers, topics.events,
                                                   cfg.feature_job.idle_timeout_s)
                ticker.step()
                state["watermark_ticks"] = ticker.ticks
                comp.work.beat("watermark-ticks")
            except Exception as exc:  # noqa: BLE001 - the broker may be away; try again
                comp.log.warning("watermark ticks: %s", exc)
                comp.work.beat("watermark-ticks", waiting=f"the broker ({exc})")
            comp.stop.wait(TICK_EVERY_S)
        if ticker is not None:
            ticker.close()

    comp.work.expect("observe")
    threading.Thread(target=observe, daemon=True).start()
    if cfg.feature_job.idleness == "ticks":
        threading.Thread(target=tick, name="odl-watermark-ticks", daemon=True).start()
    comp.start_heartbeat(lambda: ("running" if state["status"] == "RUNNING" else state["status"].lower(),
                                  job_id, {**state, "samples_per_s": round(
                                      state["samples"] / max(1e-3, time.time() - started), 1)}))
    try:
        while not comp.stop.is_set():
            if state["status"] in ("FAILED", "CANCELED", "FINISHED"):
                comp.log.error("job ended with status %s", state["status"])
                comp.work.fail(f"job ended with status {state['status']}")
                return 1
            comp.stop.wait(1.0)
        if client and cancel_on_stop:
            try:
                client.cancel().result()
            except Exception as exc:  # noqa: BLE001
                comp.log.warning("cancel failed: %s", exc)
        return 0
    finally:
        comp.close()


if __name__ == "__main__":
    sys.exit(main())
