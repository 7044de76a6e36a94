"""Replay a pre-loaded backlog through the full feature job and count valid events it sent to
the DLQ as ``late_event`` (the watermark overtaking a partition that still had unread records).

    python scripts/feature_job_lateness.py [--events N] [--idle-timeout S] [--no-chaining]

Uses ``odl bench feature-job``'s pre-loaded event set and job (``bench.feature_job.preloaded``); run it with a second,
CPU-busy process beside it to reproduce a loaded machine.  Prints one ``RESULT lateness ...``
line.  ``--no-chaining`` runs the job with ``feature_job.operator_chaining: false`` (the parse
UDF then runs outside the source's task thread; see docs/features.md#idleness-and-catch-up).
"""
from __future__ import annotations

import argparse
import time

from bench.feature_job import preloaded
from odl.config import load_config

STALL_S = 25.0      # no new output for this long: the job has emitted what it will


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=240_000)
    ap.add_argument("--idle-timeout", type=int, default=None, help="seconds (default: config)")
    ap.add_argument("--no-chaining", action="store_true")
    ap.add_argument("--timeout", type=float, default=400.0)
    args = ap.parse_args()

    fj = {"operator_chaining": not args.no_chaining}
    if args.idle_timeout is not None:
        fj["idle_timeout_s"] = args.idle_timeout
    with preloaded(load_config(), args.events, **fj) as backlog:
        expected = backlog.expected_outputs
        job = backlog.full_job()
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
        idle_s = backlog.cfg.feature_job.idle_timeout_s
    late = sum(r.get("reason") == "late_event" for r in out)
    final = sum("sample_id" in r and not r.get("provisional") for r in out)
    span = times[-1] - times[0] if times else 0.0
    print(f"RESULT lateness late={late} events={args.events} expected_outputs={expected} "
          f"outputs={len(out)} final_samples={final} idle_timeout_s={idle_s} "
          f"chaining={not args.no_chaining} span_s={span:.1f}", flush=True)


if __name__ == "__main__":
    main()
