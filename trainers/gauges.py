"""The trainer's Prometheus metrics: defined once here, set by the streaming trainer and by a
training group's coordinator (which publishes the shards' table occupancy for all its members)."""
from __future__ import annotations

from prometheus_client import Counter, Gauge

SAMPLES = Counter("odl_trainer_samples_total", "samples consumed", ["outcome"])
AUC = Gauge("odl_trainer_progressive_auc", "progressive AUC over the sliding window")
LOGLOSS = Gauge("odl_trainer_progressive_logloss", "progressive log-loss over the sliding window")
CALIBRATION = Gauge("odl_trainer_progressive_calibration",
                    "mean predicted / observed click rate over the sliding window")
STEP = Gauge("odl_trainer_step", "training steps taken")
ROWS = Gauge("odl_trainer_embedding_rows", "rows with their own embedding", ["table"])
ADMITTED = Gauge("odl_trainer_embedding_admitted", "ids admitted to a table so far", ["table"])
EVICTED = Gauge("odl_trainer_embedding_evicted", "rows evicted so far", ["table", "why"])
CKPT_SECONDS = Gauge("odl_trainer_checkpoint_seconds", "duration of the last checkpoint", ["kind"])
CKPT_BYTES = Gauge("odl_trainer_checkpoint_bytes", "size of the last checkpoint", ["kind"])


def publish_occupancy(occ: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Set the table gauges from an occupancy report; returns it."""
    for t, o in occ.items():
        ROWS.labels(t).set(o["rows"])
        ADMITTED.labels(t).set(o["admitted"])
        EVICTED.labels(t, "ttl").set(o["evicted_ttl"])
        EVICTED.labels(t, "lfu").set(o["evicted_lfu"])
    return occ
