"""Write a source's event stream as a log in specs/default.yaml's layout, for `source.kind: log`.

    python scripts/events_log.py [--source movielens|synthetic] [--events N] [OUT_CSV]
    ODL__SOURCE__KIND=log ODL__SOURCE__LOG_PATH=OUT_CSV odl demo

One row per impression or click (type, request_id, user_id, item_id, position, ts_ms, hour,
category), in the order the source emits them; malformed synthetic events are left out.  With
``--source movielens`` the rows keep the ratings' own times (1996-2018), so the replay
compresses history onto now.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from odl.config import Config
from pipeline.source import build_source

COLUMNS = ["type", "request_id", "user_id", "item_id", "position", "ts_ms", "hour", "category"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="var/events-log.csv")
    ap.add_argument("--source", choices=["movielens", "synthetic"], default="movielens")
    ap.add_argument("--events", type=int, default=None, help="impressions at most")
    args = ap.parse_args()
    src = Config().source.model_copy(update={"kind": args.source, "max_events": args.events})
    cfg = Config().model_copy(update={"source": src})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, shown = [], {}     # (request, item) -> (original ms, replay ms) of its impression
    for rec in build_source(cfg, 0).records():
        if rec.kind == "malformed":
            continue
        ev = json.loads(rec.value)
        ctx = ev.get("context") or {}
        key = (ev["request_id"], ev["item_id"])
        ts = rec.ts_ms
        if "orig_ts" in ctx:            # a MovieLens impression: the rating's own time
            ts = ctx["orig_ts"] * 1000
            shown[key] = (ts, rec.ts_ms)
        elif key in shown:              # its click: the same delay after it
            ts = shown[key][0] + rec.ts_ms - shown[key][1]
        rows.append({"type": ev["type"], "request_id": ev["request_id"], "user_id": ev["user_id"],
                     "item_id": ev["item_id"], "position": ev.get("position", ""),
                     "ts_ms": ts, "hour": ctx.get("hour", ""), "category": ctx.get("category", "")})
    rows.sort(key=lambda r: r["ts_ms"])      # a log in time order, as history is kept
    with out.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    print(f"{len(rows):,} events -> {out}")


if __name__ == "__main__":
    main()
