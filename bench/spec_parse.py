"""A spec's parse stage: events proven valid in SQL (``pipeline.spec_parse_sql``, the job's
``feature_job.sql_parse``) vs every event through the Python parse UDF, and a pass-through.

Each variant runs in a process of its own (a fresh JVM: PyFlink's planner state does not carry
over, and JIT warm-up is the same for each), twice, interleaved, on the same synthetic rows of
the spec read from a file source, parallelism 1; the ``checked`` view's every column goes to a
blackhole sink, as the job uses them.  A run's time includes its job's start (the same for
each variant: it narrows the ratios a little).  The file source costs a JSON decode per record that a
Kafka source does not: ratios here compare the parses, `odl bench feature-job` the jobs."""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.registry import BenchResult
from odl.config import Config

DESCRIPTION = "a spec's parse stage: SQL-proven events vs the Python parse UDF (--spec FILE)"
ROWS = 200_000
VARIANTS = ("pass", "python", "sql")


def _measure(variant: str, spec_path: str, src: Path, state: Path) -> float:
    """events/s of one variant, in this process."""
    from odl.config import load_config
    from odl.spec import load_spec
    from pipeline import feature_job, spec_udfs
    from pipeline.feature_sql import ltz_epoch_ms
    from pipeline.spec_parse_sql import checked_views

    spec = load_spec(spec_path)
    cfg = load_config(None, env={})
    cfg = cfg.model_copy(update={"paths": cfg.paths.model_copy(update={"state_dir": state})})
    t_env = feature_job.build_table_env(cfg)
    spec_udfs.register(t_env, spec)
    t_env.execute_sql(f"""CREATE TABLE events_raw (
        payload STRING, `partition` INT, `offset` BIGINT, ts_ms BIGINT,
        ts AS TO_TIMESTAMP_LTZ(ts_ms, 3), pt AS PROCTIME(), WATERMARK FOR ts AS ts
      ) WITH ('connector' = 'filesystem', 'path' = '{src}', 'format' = 'json')""")
    t_env.execute_sql("CREATE TABLE sink (v STRING) WITH ('connector' = 'blackhole')")
    if variant == "pass":
        query = "INSERT INTO sink SELECT payload FROM events_raw"
    else:
        for stmt in checked_views(spec, ltz_epoch_ms("ts"), sql=variant == "sql"):
            t_env.execute_sql(stmt)
        query = ("INSERT INTO sink SELECT CONCAT_WS('|', COALESCE(reason, etype), fields, "
                 "CAST(`offset` AS STRING), CAST(ts AS STRING), CAST(CHAR_LENGTH(payload) AS "
                 "STRING), CAST(late AS STRING)) FROM checked")
    t = time.perf_counter()
    t_env.execute_sql(query).wait()
    with src.open() as f:
        n = sum(1 for _ in f)
    return n / (time.perf_counter() - t)


def run(cfg: Config, spec: str | None = None) -> BenchResult:
    from odl.spec import SPECS_DIR, load_spec
    from odl.spec.synth import synthetic_rows
    from pipeline.spec_parse_sql import sql_parse_gap

    spec = str(Path(spec or SPECS_DIR / "adlog.yaml").resolve())
    s = load_spec(spec)
    gap = sql_parse_gap(s)
    if gap is not None:
        raise RuntimeError(f"spec {s.name} parses in Python only: {gap}")
    tf = s.events.time_field
    with tempfile.TemporaryDirectory(prefix="odl-bench-parse-") as tmp:
        src = Path(tmp) / "events.json"
        with src.open("w") as f:
            for k, row in enumerate(synthetic_rows(s, ROWS, seed=1, gap_ms=(0, 2))):
                f.write(json.dumps({"payload": json.dumps(row), "partition": 0, "offset": k,
                                    "ts_ms": row[tf]}) + "\n")
        rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for _ in range(2):
            for v in VARIANTS:
                out = subprocess.run([sys.executable, "-m", "bench.spec_parse", v, spec, str(src),
                                      tmp], capture_output=True, text=True, timeout=600)
                lines = [x for x in out.stdout.splitlines() if x.startswith("RATE ")]
                if out.returncode or not lines:
                    raise RuntimeError(f"{v} parse run failed: {out.stderr[-2000:]}")
                rates[v].append(float(lines[-1].split()[1]))
    med = {v: statistics.median(r) for v, r in rates.items()}
    lines = [f"spec {s.name}: {ROWS:,} synthetic rows from a file source, each variant twice, "
             "interleaved, each in its own JVM",
             *(f"{v:<7} {med[v]:>9,.0f} events/s (runs: {', '.join(f'{x:,.0f}' for x in rates[v])})"
               for v in VARIANTS)]
    return BenchResult({"sql_over_python": round(med["sql"] / med["python"], 3),
                        "python_over_pass": round(med["python"] / med["pass"], 3),
                        "sql_events_per_s": round(med["sql"]),
                        "python_events_per_s": round(med["python"]),
                        "pass_events_per_s": round(med["pass"]), "rows": ROWS, "spec": s.name},
                       lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    for a in ("variant", "spec", "src", "state"):
        ap.add_argument(a)
    args = ap.parse_args()
    print(f"RATE {_measure(args.variant, args.spec, Path(args.src), Path(args.state)):.1f}",
          flush=True)
