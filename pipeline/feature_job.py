"""The PyFlink feature job: validate events, route rejects to the DLQ, join impressions with
clicks into labelled samples.

All joins and routing are Flink SQL (DESIGN.md: Python DataStream windows are 25-50x slower
here); Python only provides the validation UDF, whose rules live in ``odl.schemas`` so that the
job, the generator and the tests share one definition.

Label join: an event-time interval LEFT JOIN of impressions with clicks on (request_id, item_id)
within the attribution window.  Flink emits the joined (positive) row as soon as the click
arrives and the unmatched (negative) row when the watermark passes the window's end, which is
exactly the samples contract.  A duplicated click yields a duplicated positive with the same
``sample_id``; consumers deduplicate by it (at-least-once end to end).
"""
from __future__ import annotations

import json
import os
import site
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Counter

from odl import names
from odl.config import Config
from odl.kafka_util import TopicCounter, consumer
from odl.runtime import Component
from pipeline.flink_metrics import FlinkJobMetrics, port_range

DLQ_REASONS = Counter("odl_feature_job_dlq_total", "events rejected to the DLQ", ["reason"])


@dataclass(frozen=True)
class JobTopics:
    events: str
    samples: str
    dlq: str


def _kafka_opts(cfg: Config, topic: str) -> str:
    return (f"'connector' = 'kafka', 'topic' = '{topic}', "
            f"'properties.bootstrap.servers' = '{cfg.kafka.bootstrap_servers}'")


def source_ddl(cfg: Config, topic: str, group_id: str, table: str = "events_raw") -> str:
    """The events source: raw payloads, event time from the Kafka record timestamp."""
    return f"""CREATE TABLE {table} (
              payload STRING,
              `partition` INT METADATA VIRTUAL,
              `offset` BIGINT METADATA VIRTUAL,
              ts TIMESTAMP_LTZ(3) METADATA FROM 'timestamp',
              WATERMARK FOR ts AS ts - INTERVAL '{cfg.feature_job.watermark_delay_s}' SECOND
            ) WITH ({_kafka_opts(cfg, topic)},
              'properties.group.id' = '{group_id}',
              'scan.startup.mode' = 'group-offsets',
              'properties.auto.offset.reset' = 'earliest',
              'format' = 'raw')"""


def statements(cfg: Config, topics: JobTopics) -> tuple[list[str], list[str]]:
    """(DDL, INSERTs) of the job; split out so tests can check the SQL without a cluster."""
    fj = cfg.feature_job
    ddl = [
        source_ddl(cfg, topics.events, fj.group_id),
        f"""CREATE TABLE samples_sink (
              sample_id STRING, request_id STRING, user_id BIGINT, item_id BIGINT,
              `position` INT, `hour` INT, label INT, impression_ts_ms BIGINT, label_ts_ms BIGINT
            ) WITH ({_kafka_opts(cfg, topics.samples)},
              'key.format' = 'raw', 'key.fields' = 'sample_id',
              'value.format' = 'json', 'value.fields-include' = 'ALL',
              'sink.delivery-guarantee' = 'at-least-once')""",
        f"""CREATE TABLE dlq_sink (
              reason STRING, payload STRING, source_partition INT, source_offset BIGINT, ts_ms BIGINT
            ) WITH ({_kafka_opts(cfg, topics.dlq)},
              'format' = 'json', 'sink.delivery-guarantee' = 'at-least-once')""",
        """CREATE TEMPORARY VIEW checked AS
            SELECT payload, `partition`, `offset`, ts, odl_validate(payload) AS reason FROM events_raw""",
        """CREATE TEMPORARY VIEW valid AS
            SELECT JSON_VALUE(payload, '$.type') AS etype,
                   JSON_VALUE(payload, '$.request_id') AS request_id,
                   CAST(JSON_VALUE(payload, '$.user_id') AS BIGINT) AS user_id,
                   CAST(JSON_VALUE(payload, '$.item_id') AS BIGINT) AS item_id,
                   JSON_VALUE(payload, '$.position' RETURNING INT) AS `position`,
                   COALESCE(JSON_VALUE(payload, '$.context.hour' RETURNING INT), 0) AS `hour`,
                   CAST(JSON_VALUE(payload, '$.ts_ms') AS BIGINT) AS ts_ms,
                   ts
            FROM checked WHERE reason IS NULL""",
        "CREATE TEMPORARY VIEW imps AS SELECT * FROM valid WHERE etype = 'impression'",
        "CREATE TEMPORARY VIEW clicks AS SELECT * FROM valid WHERE etype = 'click'",
    ]
    inserts = [
        f"""INSERT INTO samples_sink
            SELECT CONCAT(i.request_id, ':', CAST(i.item_id AS STRING)) AS sample_id,
                   i.request_id, i.user_id, i.item_id, i.`position`, i.`hour`,
                   CASE WHEN c.request_id IS NULL THEN 0 ELSE 1 END AS label,
                   i.ts_ms AS impression_ts_ms,
                   COALESCE(c.ts_ms, i.ts_ms + {fj.attribution_window_s * 1000}) AS label_ts_ms
            FROM imps i LEFT JOIN clicks c
              ON i.request_id = c.request_id AND i.item_id = c.item_id
             AND c.ts BETWEEN i.ts AND i.ts + INTERVAL '{fj.attribution_window_s}' SECOND""",
        """INSERT INTO dlq_sink
            SELECT reason, payload, `partition`, `offset`, UNIX_TIMESTAMP() * 1000 FROM checked
            WHERE reason IS NOT NULL""",
    ]
    return ddl, inserts


def _validate_udf():
    from pyflink.table import DataTypes
    from pyflink.table.udf import udf

    @udf(result_type=DataTypes.STRING())
    def odl_validate(payload):
        from odl.schemas import validate_event
        return validate_event(payload)

    return odl_validate


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint (one with ``_metadata``) of any earlier run under root."""
    done = [m.parent for m in root.glob("*/chk-*/_metadata")]
    return max(done, key=lambda p: p.stat().st_mtime) if done else None


def build_table_env(cfg: Config):
    from pyflink.table import EnvironmentSettings, TableEnvironment

    for jar in cfg.paths.flink_jars:
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
    ckpt = cfg.paths.checkpoints / "flink"
    ckpt.mkdir(parents=True, exist_ok=True)
    settings = {
        "pipeline.name": "odl-feature-job",
        "pipeline.jars": ";".join(p.resolve().as_uri() for p in cfg.paths.flink_jars),
        "python.executable": sys.executable,
        "python.client.executable": sys.executable,
        "parallelism.default": str(cfg.feature_job.parallelism),
        "execution.checkpointing.interval": f"{cfg.feature_job.checkpoint_interval_s} s",
        "execution.checkpointing.storage": "filesystem",
        "execution.checkpointing.dir": ckpt.resolve().as_uri(),
        # keep the newest checkpoint when the job is cancelled or killed: it is the restart point
        "execution.checkpointing.externalized-checkpoint-retention": "RETAIN_ON_CANCELLATION",
        "execution.checkpointing.num-retained": "2",
        "table.exec.source.idle-timeout": f"{cfg.feature_job.idle_timeout_s} s",
        "table.local-time-zone": "UTC",
        # Python UDFs in-process (PEMJA): no Beam gRPC servers, no worker processes.
        "python.execution-mode": "thread",
        # Every Flink listener on loopback only.
        "rest.bind-address": "127.0.0.1",
        "rest.port": cfg.feature_job.rest_ports,
        "jobmanager.bind-host": "127.0.0.1",
        "taskmanager.bind-host": "127.0.0.1",
        "rest.address": "127.0.0.1",
        "taskmanager.host": "127.0.0.1",
        "jobmanager.rpc.address": "127.0.0.1",
    }
    restore = latest_checkpoint(ckpt) if cfg.feature_job.restore else None
    if restore is not None:
        settings["execution.state-recovery.path"] = restore.resolve().as_uri()
        print(f"restoring feature job state from {restore}", flush=True)
    for k, v in settings.items():
        conf.set(k, v)
    t_env.create_temporary_function("odl_validate", _validate_udf())
    return t_env


def submit(cfg: Config):
    """Build and submit the job; returns the TableResult of the statement set."""
    p = cfg.kafka.topic_prefix
    topics = JobTopics(names.topic(names.EVENTS, p), names.topic(names.SAMPLES, p),
                       names.topic(names.EVENTS_DLQ, p))
    t_env = build_table_env(cfg)
    ddl, inserts = statements(cfg, topics)
    for stmt in ddl:
        t_env.execute_sql(stmt)
    stmt_set = t_env.create_statement_set()
    for ins in inserts:
        stmt_set.add_insert_sql(ins)
    return stmt_set.execute(), topics


def _reason(value: bytes) -> str:
    try:
        return str(json.loads(value)["reason"])
    except (ValueError, KeyError, TypeError):
        return "unreadable_dlq_record"


def run(cfg: Config) -> int:
    comp = Component(cfg, "feature-job")
    comp.install_signal_handlers()
    result, topics = submit(cfg)
    client = result.get_job_client()
    job_id = str(client.get_job_id()) if client else "?"
    comp.log.info("feature job %s submitted", job_id)
    state: dict = {"status": "RUNNING", "samples": 0, "dlq": 0, "dlq_reasons": {}}
    started = time.time()

    def observe() -> None:
        # Flink's own counters stay inside the JVM; the topics' end offsets are what downstream
        # sees, and the DLQ (small by nature) is read to count rejects per reason.
        counter = TopicCounter(cfg)
        dlq = consumer(cfg, topics.dlq, group_id=None, client_id="odl-dlq-reasons")
        flink = FlinkJobMetrics("127.0.0.1", port_range(cfg.feature_job.rest_ports), job_id)
        try:
            while not comp.stop.is_set():
                try:
                    state["status"] = client.get_job_status().result().name if client else "?"
                    state["samples"] = counter.count(topics.samples)
                    state["dlq"] = counter.count(topics.dlq)
                    state.update(flink.sample())
                    for recs in dlq.poll(timeout_ms=0, max_records=10_000).values():
                        for rec in recs:
                            reason = _reason(rec.value)
                            state["dlq_reasons"][reason] = state["dlq_reasons"].get(reason, 0) + 1
                            DLQ_REASONS.labels(reason).inc()
                except Exception as exc:  # noqa: BLE001
                    comp.log.warning("observe failed: %s", exc)
                comp.stop.wait(cfg.control.heartbeat_interval_s)
        finally:
            counter.close()
            dlq.close()

    threading.Thread(target=observe, daemon=True).start()
    comp.start_heartbeat(lambda: ("running" if state["status"] == "RUNNING" else state["status"].lower(),
                                  job_id, {**state, "samples_per_s": round(
                                      state["samples"] / max(1e-3, time.time() - started), 1)}))
    try:
        while not comp.stop.is_set():
            if state["status"] in ("FAILED", "CANCELED", "FINISHED"):
                comp.log.error("job ended with status %s", state["status"])
                return 1
            comp.stop.wait(1.0)
        if client:
            try:
                client.cancel().result()
            except Exception as exc:  # noqa: BLE001
                comp.log.warning("cancel failed: %s", exc)
        return 0
    finally:
        comp.close()
