"""Click -> positive sample latency of the full feature job under Flink settings, side by side.

    python scripts/feature_job_latency.py [--events N] [--live-s S]
        --variant 'execution.buffer-timeout.interval=100 ms;pipeline.auto-watermark-interval=200 ms'
        --variant ''   # the config's own settings (10 ms, 50 ms)

Each variant runs ``odl bench feature-job``'s full job (``bench.feature_job``) on its own
private broker: a pre-loaded backlog of N events (small by default, so the figure is of the
job live, not of its catch-up), drained, then live events at the benchmark's rate for S seconds,
each positive sample's arrival compared with its click's event time.  The settings given are
applied over the job's own, as ``feature_job.flink_settings``.  Prints one ``RESULT`` line per
variant and the ratio of each variant's p95 to the first's.
"""
from __future__ import annotations

import argparse

import numpy as np

from bench import feature_job as bench
from odl.config import load_config


def _settings(text: str) -> dict[str, str]:
    pairs = [p.split("=", 1) for p in text.split(";") if p.strip()]
    if any(len(p) != 2 for p in pairs):
        raise SystemExit(f"--variant wants 'key=value;key=value', got {text!r}")
    return {k.strip(): v.strip() for k, v in pairs}


def latency(extra: dict[str, str], events: int, live_s: float) -> np.ndarray:
    """Click -> positive latencies (ms) of one run with ``extra`` Flink settings."""
    cfg = load_config()
    with bench.preloaded(cfg, events,
                         flink_settings={**cfg.feature_job.flink_settings, **extra}) as bl:
        job = bl.full_job(decode=False)
        try:
            expected = bl.expected_outputs
            job.rate(expected, len(bl.events), 300)
            bench._drain(bl, job.arrivals, expected, bench.DRAIN_TIMEOUT_S)
            return bl.live_latency(live_s)
        finally:
            job.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--live-s", type=float, default=40.0)
    ap.add_argument("--variant", action="append", default=None,
                    help="'key=value;...' Flink settings; repeat for several ('' = the config's)")
    args = ap.parse_args()
    first = None
    for text in args.variant or [""]:
        lat = latency(_settings(text), args.events, args.live_s)
        p50, p95 = (float(np.percentile(lat, q)) for q in (50, 95))
        first = first or p95
        print(f"RESULT latency variant={text or 'config'!r} positives={len(lat)} "
              f"p50_ms={p50:.0f} p95_ms={p95:.0f} p95_vs_first={p95 / first:.3f}", flush=True)


if __name__ == "__main__":
    main()
