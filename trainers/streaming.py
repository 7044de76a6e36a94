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
from dataclasses import dataclass
from typing import Any

import numpy as np
from kafka.structs import OffsetAndMetadata
from prometheus_client import Counter, Gauge

from odl import names
from odl.config import Config
from odl.kafka_util import consumer
from trainers.align import LabelAligner
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


@dataclass(frozen=True)
class Rec:
    """What the trainer keeps of a consumed sample record."""
    partition: Any
    offset: int
    value: bytes


def parse_records(recs: list[Rec], dedup: DedupWindow) -> tuple[list[tuple[int, Rec, tuple]], int, int]:
    """Decode sample records; returns ([(impression_ts_ms, rec, row)], duplicates, malformed)."""
    out, dup, bad = [], 0, 0
    for rec in recs:
        try:
            d = json.loads(rec.value)
            row = (int(d["user_id"]), int(d["item_id"]), int(d["position"]), int(d.get("hour") or 0),
                   float(d["label"]))
            sid, ts = str(d["sample_id"]), int(d["impression_ts_ms"])
        except (ValueError, KeyError, TypeError):
            bad += 1
            continue
        if dedup.seen(sid):
            dup += 1
            continue
        out.append((ts, rec, row))
    return out, dup, bad


def to_batch(rows: list[tuple]) -> Batch | None:
    if not rows:
        return None
    a = np.asarray(rows, dtype=np.float64)
    return Batch(a[:, 0].astype(np.int64), a[:, 1].astype(np.int64), a[:, 2].astype(np.int64),
                 a[:, 3].astype(np.int64), a[:, 4].astype(np.float32))


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
        hold_ms = None
        if cfg.trainer.align_labels:
            fj = cfg.feature_job
            hold_ms = 1000 * (fj.attribution_window_s + fj.idle_timeout_s) + fj.watermark_delay_ms
        self.aligner = LabelAligner(hold_ms) if hold_ms is not None else None
        self._last_data = time.monotonic()
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

    def poll_batch(self, timeout_s: float | None = None) -> list[Rec]:
        """Collect up to batch_size records, waiting at most max_batch_wait_ms."""
        c = self._ensure_consumer()
        want = self.cfg.trainer.batch_size
        deadline = time.monotonic() + (timeout_s if timeout_s is not None
                                       else self.cfg.trainer.max_batch_wait_ms / 1000.0)
        out: list[Rec] = []
        while len(out) < want:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            polled = c.poll(timeout_ms=max(1, int(left * 1000)), max_records=want - len(out))
            for tp, recs in polled.items():
                out.extend(Rec(tp, r.offset, r.value) for r in recs)
        return out

    def step(self, recs: list[Rec]) -> int:
        """Align labels, then progressive validation and one training step per released batch.
        Returns the samples trained."""
        parsed, dup, bad = parse_records(recs, self.dedup)
        self.duplicates += dup
        self.malformed += bad
        SAMPLES.labels("duplicate").inc(dup)
        SAMPLES.labels("malformed").inc(bad)
        if self.aligner is None:
            return self._train(to_batch([row for _, _, row in parsed]))
        now = time.monotonic()
        for ts, rec, row in parsed:
            self.aligner.add(ts, rec.partition, rec.offset, row)
        if recs:
            self._last_data = now
        # a quiet stream sends no newer impressions to move the clock: flush what is held
        idle = now - self._last_data > self.aligner.hold_ms / 1000.0
        released = self.aligner.release(flush=idle)
        trained = 0
        size = self.cfg.trainer.batch_size
        for k in range(0, len(released), size):
            trained += self._train(to_batch(released[k:k + size]))
        return trained

    def _train(self, batch: Batch | None) -> int:
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
        """Commit, per partition, the consumed position or the oldest still-held record, whichever
        is earlier (held samples are not trained yet), and remember it for the next manifest."""
        if self._consumer is None:
            return
        held = self.aligner.min_held_offsets() if self.aligner is not None else {}
        offsets = {tp: min(self._consumer.position(tp), held.get(tp, 1 << 62))
                   for tp in self._consumer.assignment()}
        self._consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()})
        self.offsets = {f"{tp.topic}:{tp.partition}": o for tp, o in offsets.items()}

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
                "held_for_labels": len(self.aligner) if self.aligner is not None else 0,
                "frozen_at_step": self.frozen.step if self.frozen else None,
                "scored_since_frozen": self.frozen_validator.seen,
                **{f"rows_{k}": v for k, v in self.model.occupancy().items()}}

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
