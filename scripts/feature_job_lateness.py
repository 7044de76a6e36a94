"""Replay a pre-loaded backlog through the full feature job and count valid events it sent to
the DLQ as ``late_event`` (the watermark overtaking a partition that still had unread records).

    python scripts/feature_job_lateness.py [--events N] [--idle-timeout S] [--no-chaining]

Uses ``odl bench feature-job``'s event set and job on a private broker; run it with a second,
CPU-busy process beside it to reproduce a loaded machine.  Prints one ``RESULT lateness ...``
line.  ``--no-chaining`` runs the job with ``feature_job.operator_chaining: false`` (the parse
UDF then runs outside the source's task thread; see docs/features.md#idleness-and-catch-up).
"""
from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

from bench import feature_job as fjb
from bench.common import private_broker
from odl.config import load_config
from odl.kafka_util import ensure_topics
from pipeline import feature_sql

STALL_S = 25.0      # no new output for this long: the job has emitted what it will


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=240_000)
    ap.add_argument("--idle-timeout", type=int, default=None, help="seconds (default: config)")
    ap.add_argument("--no-chaining", action="store_true")
    ap.add_argument("--timeout", type=float, default=400.0)
    args = ap.parse_args()

    cfg = load_config()
    fj = {"restore": False, "operator_chaining": not args.no_chaining}
    if args.idle_timeout is not None:
        fj["idle_timeout_s"] = args.idle_timeout
    with private_broker(cfg) as bootstrap, tempfile.TemporaryDirectory() as tmp:
        prefix = f"l{uuid.uuid4().hex[:6]}."
        bcfg = cfg.model_copy(update={
            "kafka": cfg.kafka.model_copy(update={"bootstrap_servers": bootstrap, "topic_prefix": prefix}),
            "paths": cfg.paths.model_copy(update={"state_dir": Path(tmp)}),
            "feature_job": cfg.feature_job.model_copy(update=fj)})
        ensure_topics(bcfg)
        recs = fjb._events(int(time.time() * 1000) - 600_000, args.events, fjb.LIVE_RATE)
        # later impressions on every partition close the last attribution windows
        tail = [r for r in fjb._events(recs[-1].ts_ms + 60_000, 400, fjb.LIVE_RATE)
                if r.kind == "impression"]
        fjb._produce(bcfg, prefix + "events", recs + tail, paced=False)
        topics = feature_sql.JobTopics(prefix + "events", prefix + "samples", prefix + "events.dlq",
                                       prefix + "features")
        ddl, inserts = feature_sql.statements(bcfg, topics)
        expected = sum(r.kind in ("impression", "malformed") for r in recs)
        job = fjb._start(bcfg, bootstrap, ddl, inserts, [topics.samples, topics.dlq], decode=True)
        t0, last, stalled_at = time.time(), -1, time.time()
        try:
            while time.time() - t0 < args.timeout:
                time.sleep(2)
                n = len(job.arrivals.records)
                if n != last:
                    last, stalled_at = n, time.time()
                if n >= expected or time.time() - stalled_at > STALL_S:
                    break
            out, times = list(job.arrivals.records), list(job.arrivals.times)
        finally:
            job.close()
    late = sum(r.get("reason") == "late_event" for r in out)
    final = sum("sample_id" in r and not r.get("provisional") for r in out)
    span = times[-1] - times[0] if times else 0.0
    print(f"RESULT lateness late={late} events={args.events} expected_outputs={expected} "
          f"outputs={len(out)} final_samples={final} idle_timeout_s={bcfg.feature_job.idle_timeout_s} "
          f"chaining={not args.no_chaining} span_s={span:.1f}", flush=True)


if __name__ == "__main__":
    main()
