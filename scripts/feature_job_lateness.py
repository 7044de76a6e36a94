"""Replay a pre-loaded backlog through the full feature job and count valid events it sent to
the DLQ as ``late_event`` (the watermark overtaking a partition that still had unread records).

    python scripts/feature_job_lateness.py [--events N] [--idle-timeout S] [--idleness ticks|flink]
                                           [--burners N] [--no-chaining]

Uses ``odl bench feature-job``'s pre-loaded event set and job (``bench.feature_job.preloaded``);
``--burners N`` runs N processes that each burn a core beside it, as a loaded machine has.
Prints one ``RESULT lateness ...`` line.  ``--no-chaining`` runs the job with ``feature_job.operator_chaining: false`` (the parse
UDF then runs outside the source's task thread; see docs/features.md#idleness-and-catch-up).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from contextlib import contextmanager

from bench.feature_job import preloaded
from odl.config import load_config

STALL_S = 25.0      # no new output for this long: the job has emitted what it will


@contextmanager
def burners(n: int):
    """``n`` processes spinning on a core each, ended by PID."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=240_000)
    ap.add_argument("--idle-timeout", type=int, default=None, help="seconds (default: config)")
    ap.add_argument("--no-chaining", action="store_true")
    ap.add_argument("--idleness", choices=["ticks", "flink"], default=None,
                    help="feature_job.idleness (default: config)")
    ap.add_argument("--timeout", type=float, default=400.0)
    ap.add_argument("--burners", type=int, default=0, help="CPU-burning neighbour processes")
    args = ap.parse_args()

    fj = {"operator_chaining": not args.no_chaining}
    if args.idle_timeout is not None:
        fj["idle_timeout_s"] = args.idle_timeout
    if args.idleness is not None:
        fj["idleness"] = args.idleness
    with preloaded(load_config(), args.events, **fj) as backlog, burners(args.burners):
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
        idle_s, idleness = backlog.cfg.feature_job.idle_timeout_s, backlog.cfg.feature_job.idleness
    late = sum(r.get("reason") == "late_event" for r in out)
    final = sum("sample_id" in r and not r.get("provisional") for r in out)
    span = times[-1] - times[0] if times else 0.0
    print(f"RESULT lateness late={late} events={args.events} expected_outputs={expected} "
          f"outputs={len(out)} final_samples={final} idle_timeout_s={idle_s} idleness={idleness} "
          f"chaining={not args.no_chaining} burners={args.burners} span_s={span:.1f}", flush=True)


if __name__ == "__main__":
    main()
