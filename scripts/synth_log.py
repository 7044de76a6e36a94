"""Write a synthetic log of a feature spec whose rows carry their label (``odl.spec.synth``):
the log a spec's demo replays (``source.kind: log``) when no real one is at hand.

    python scripts/synth_log.py specs/adlog.yaml var/adlog-log.csv --rows 50000
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from odl.spec import load_spec  # noqa: E402
from odl.spec.logs import write_log  # noqa: E402
from odl.spec.synth import synthetic_rows  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("out")
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gap-ms", type=int, default=40, help="most milliseconds between rows")
    a = ap.parse_args()
    spec = load_spec(a.spec)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    n = write_log(spec, synthetic_rows(spec, a.rows, seed=a.seed, gap_ms=(0, a.gap_ms)), a.out)
    print(f"{n} rows of spec {spec.name} -> {a.out}")


if __name__ == "__main__":
    main()
