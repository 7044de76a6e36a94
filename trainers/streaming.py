"""The streaming training loop: consume samples, drop duplicates, score each batch before
training on it (progressive validation), train, commit offsets.

Kept free of Ray so it can be tested and benchmarked on its own; ``trainers.actor`` hosts it in a
Ray actor.  Delivery is at-least-once for now (offsets are committed after the batch is trained);
``sample_id`` de-duplication within a bounded window makes replays after a crash mostly harmless.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections import OrderedDict
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge

from odl import names
from odl.config import Config
from odl.kafka_util import consumer
from trainers.metrics import ProgressiveValidator
from trainers.model import Batch, CTRModel, FrozenModel

log = logging.getLogger("odl.trainer")

SAMPLES = Counter("odl_trainer_samples_total", "samples consumed", ["outcome"])
AUC = Gauge("odl_trainer_progressive_auc", "progressive AUC over the sliding window")
LOGLOSS = Gauge("odl_trainer_progressive_logloss", "progressive log-loss over the sliding window")
STEP = Gauge("odl_trainer_step", "training steps taken")


class DedupWindow:
    """Remembers the last ``capacity`` sample ids (LRU) to drop at-least-once duplicates."""

    def __init__(self, capacity: int = 500_000):
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def seen(self, sample_id: str) -> bool:
        if sample_id in self._ids:
            self._ids.move_to_end(sample_id)
            return True
        self._ids[sample_id] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return False


def parse_batch(values: list[bytes], dedup: DedupWindow) -> tuple[Batch | None, int, int]:
    """Decode sample records into a Batch; returns (batch, duplicates, malformed)."""
    rows, dup, bad = [], 0, 0
    for v in values:
        try:
            d = json.loads(v)
            row = (int(d["user_id"]), int(d["item_id"]), int(d["position"]), int(d.get("hour") or 0),
                   float(d["label"]))
            sid = str(d["sample_id"])
        except (ValueError, KeyError, TypeError):
            bad += 1
            continue
        if dedup.seen(sid):
            dup += 1
            continue
        rows.append(row)
    if not rows:
        return None, dup, bad
    a = np.asarray(rows, dtype=np.float64)
    return Batch(a[:, 0].astype(np.int64), a[:, 1].astype(np.int64), a[:, 2].astype(np.int64),
                 a[:, 3].astype(np.int64), a[:, 4].astype(np.float32)), dup, bad


class StreamingTrainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.model = CTRModel(cfg.trainer)
        self.validator = ProgressiveValidator(cfg.trainer.auc_window)
        # A copy frozen after `frozen_baseline_after` samples, scored on the same batches: the
        # measured value of continuing to learn on a drifting stream.
        self.frozen: FrozenModel | None = None
        self.frozen_validator = ProgressiveValidator(cfg.trainer.auc_window)
        self.dedup = DedupWindow()
        self.trained = 0
        self.duplicates = 0
        self.malformed = 0
        self.last_loss = float("nan")
        self.started = time.time()
        self._consumer = None
        self.offsets: dict[str, int] = {}

    def _ensure_consumer(self):
        if self._consumer is None:
            topic = names.topic(names.SAMPLES, self.cfg.kafka.topic_prefix)
            self._consumer = consumer(self.cfg, topic, self.cfg.trainer.group_id)
        return self._consumer

    def poll_batch(self, timeout_s: float | None = None) -> list[bytes]:
        """Collect up to batch_size record values, waiting at most max_batch_wait_ms."""
        c = self._ensure_consumer()
        want = self.cfg.trainer.batch_size
        deadline = time.monotonic() + (timeout_s if timeout_s is not None
                                       else self.cfg.trainer.max_batch_wait_ms / 1000.0)
        values: list[bytes] = []
        while len(values) < want:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            polled = c.poll(timeout_ms=max(1, int(left * 1000)), max_records=want - len(values))
            for recs in polled.values():
                values.extend(r.value for r in recs)
        return values

    def step(self, values: list[bytes]) -> int:
        """Progressive validation, then one training step; returns samples trained."""
        batch, dup, bad = parse_batch(values, self.dedup)
        self.duplicates += dup
        self.malformed += bad
        SAMPLES.labels("duplicate").inc(dup)
        SAMPLES.labels("malformed").inc(bad)
        if batch is None:
            return 0
        self.validator.add(self.model.predict(batch), batch.labels)
        if self.frozen is not None:
            self.frozen_validator.add(self.frozen.predict(batch), batch.labels)
        self.last_loss = self.model.train(batch)
        self.trained += len(batch)
        SAMPLES.labels("trained").inc(len(batch))
        after = self.cfg.trainer.frozen_baseline_after
        if self.frozen is None and after is not None and self.trained >= after:
            self.frozen = self.model.frozen_copy()
        summary = self.validator.summary()
        if not math.isnan(summary["auc"]):
            AUC.set(summary["auc"])
        LOGLOSS.set(summary["logloss"])
        STEP.set(self.model.step)
        return len(batch)

    def commit(self) -> None:
        """Commit the consumed position and remember it for the next manifest."""
        if self._consumer is not None:
            self._consumer.commit()
            self.offsets = {f"{tp.topic}:{tp.partition}": self._consumer.position(tp)
                            for tp in self._consumer.assignment()}

    def set_paused(self, paused: bool) -> None:
        c = self._ensure_consumer()
        parts = c.assignment()
        if paused:
            c.pause(*parts)
        else:
            c.resume(*parts)

    def metrics(self) -> dict[str, Any]:
        s = self.validator.summary()
        frozen = self.frozen_validator.summary() if self.frozen is not None else None
        return {"samples_trained": self.trained, "step": self.model.step,
                "duplicates": self.duplicates, "malformed": self.malformed,
                "auc": s["auc"], "logloss": s["logloss"], "ctr": s["ctr"], "loss": self.last_loss,
                "samples_per_s": round(self.trained / max(1e-3, time.time() - self.started), 1),
                "auc_frozen": frozen["auc"] if frozen else None,
                "frozen_at_step": self.frozen.step if self.frozen else None,
                "scored_since_frozen": self.frozen_validator.seen,
                **{f"rows_{k}": v for k, v in self.model.occupancy().items()}}

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
