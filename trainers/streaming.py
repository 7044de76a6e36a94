"""The streaming training loop: consume samples, drop duplicates, hold each until its label is
final, score each batch before training on it (progressive validation), train, checkpoint.

**Exactly-once on an at-least-once stream.**  Every consumed record is, at any moment, in exactly
one of four places: trained into the model, held for its label (``LabelAligner``), waiting for a
full batch, or dropped (duplicate / malformed).  A checkpoint stores all four together with the
consumer positions -- model weights, optimiser slots, held and waiting samples, the duplicate
window -- in one atomic write.  A restart restores it and seeks to its positions, so a record
consumed after the checkpoint is trained once, and one before it never again.  Offsets are
committed to the consumer group only after a checkpoint holds them (for lag monitoring).

Batches are full (``batch_size``) except when the stream is quiet for ``max_batch_wait_ms`` with
the trainer caught up (``_quiet``): a replay of the same records cuts the same batches, which is
what makes a restored run train the same model as an uninterrupted one.  Kept free of Ray so it
can be tested and benchmarked on its own; ``trainers.actor`` hosts it in a Ray actor.
"""
from __future__ import annotations

import logging
import math
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from odl import names
from odl.config import Config
from odl.spec import check_spec
from trainers import rollback
from trainers.align import LabelAligner
from trainers.embedding import EXPIRE_EVERY_STEPS
from trainers.gauges import (AUC, CALIBRATION, CKPT_BYTES, CKPT_SECONDS, LOGLOSS, SAMPLES, STEP,
                             publish_occupancy)
from trainers.checkpoint import CheckpointInfo, CheckpointStore, due_kind
from trainers.metrics import PairedValidator, ProgressiveValidator
from trainers.model import FrozenModel
from trainers.kafka_source import SampleSource
from trainers.prefetch import Prefetcher, ProcessPrefetcher
from trainers.delayed_feedback import ProvisionalScores
from trainers.samples import (PROVISIONAL_MASK, DedupWindow, Records, SampleCodec, codec_for_running_spec,
                              dedup_keys, trained_mask)

log = logging.getLogger("odl.trainer")

SOLO_SHARD = "trainer-0"   # a trainer alone (not in a group) checkpoints as this shard


def checkpoint_dir(cfg: Config, shard: str) -> Path:
    return cfg.paths.checkpoints / "trainer" / shard


class StreamingTrainer:
    """One trainer.  Alone it owns its tables and checkpoints on its own schedule; in a training
    group (``model`` a ``ShardedCTRModel``, ``group=True``) the group decides when it checkpoints
    and which epoch it restores (``group_epoch``; None = the group has committed nothing).

    ``codec`` is the sample shape (``trainers.samples.SampleCodec``): the running spec's by
    default.  The loop itself reads only the layout's label, time, id and provisional columns."""

    def __init__(self, cfg: Config, partitions: list[int] | None = None, shard: str = SOLO_SHARD,
                 model=None, group: bool = False, group_epoch: int | None = None,
                 codec: SampleCodec | None = None):
        self.cfg = cfg
        tc = cfg.trainer
        self.codec = codec if codec is not None else codec_for_running_spec(cfg)
        self.layout = lay = self.codec.layout
        self.topic = names.topic(names.SAMPLES, cfg.kafka.topic_prefix)
        self.partitions = partitions
        self.shard = shard
        self.group = group
        self.model = model if model is not None else self.codec.new_model(tc)
        self.validator = ProgressiveValidator(tc.auc_window)
        # A copy frozen after `frozen_baseline_after` samples, scored on the same batches and
        # compared with the live model on exactly those samples: the measured value of
        # continuing to learn on a drifting stream.  Not checkpointed.
        self.frozen: FrozenModel | None = None
        self.vs_frozen = PairedValidator(tc.auc_window, other="frozen")
        # The served model's shadow: the dense weights of the snapshot the exporter published
        # last (a version or a refresh: ``mark_candidate`` / ``track_served``) over this model's
        # live rows -- what serving runs -- scored on every batch beside the live model, so the
        # gate compares both on the same samples.  Not checkpointed.
        self.shadow_pending: tuple[int, dict[str, np.ndarray]] | None = None
        self.served_step: int | None = None
        self.paired = PairedValidator(tc.auc_window)
        self.dedup = DedupWindow(tc.dedup_window)
        # rows that carry their own label are final at once: nothing to align or hold
        late = self.codec.labels_arrive_late
        self.aligner = LabelAligner(cfg.label_hold_ms, lay) if cfg.label_alignment and late else None
        # delayed feedback: provisional negatives trained at once, positives importance-weighted,
        # final negatives only settle the figures (their impression was trained already)
        self.provisional = (ProvisionalScores(tc.dedup_window) if cfg.delayed_feedback and late
                            else None)
        self.settled_negatives = 0
        self.waiting = lay.empty()   # released, not yet a full batch
        self.positions: dict[int, int] = {}    # partition -> next offset to consume
        # the running moments of standardised inputs as of those positions (the decoder's run
        # ahead, by what is prefetched): what checkpoints and versions carry
        self.numeric_moments = self.codec.numeric_moments()
        self.ledger: list[int] = []            # sample hashes trained since the last checkpoint
        self.store = CheckpointStore(checkpoint_dir(cfg, shard), tc.checkpoint.keep_full)
        self.last_ckpt: CheckpointInfo | None = None
        self._last_ckpt_step = 0
        self._ckpt_dedup_mark = 0
        self._last_full = self._last_incr = time.monotonic()
        self._last_data = time.monotonic()
        self._gauges_at = 0.0
        self.trained = 0
        self.duplicates = 0
        self.malformed = 0
        self.last_loss: float | None = None   # none yet in this process (e.g. just restored)
        self.restored_from: str | None = None
        self.started = time.time()
        self._prefetch: Prefetcher | None = None
        if group:
            self.restore(group_epoch, group=True)
        elif tc.checkpoint.restore:
            self.restore()

    # --- consuming ---------------------------------------------------------------------------
    def _source(self) -> Callable[[], SampleSource]:
        """How to open this trainer's partitions at the checkpoint's positions (else the group's
        committed offsets, else the beginning); it runs where the prefetcher keeps the source,
        so it pickles."""
        return partial(SampleSource, self.cfg, self.topic, self.cfg.trainer.group_id,
                       self.partitions, dict(self.positions))

    def prefetcher(self) -> Prefetcher:
        if self._prefetch is None:
            if self.cfg.trainer.decode_process:
                self._prefetch = ProcessPrefetcher(self._source(), self.codec.process_decoder(),
                                                   width=self.layout.width,
                                                   absorb=self.codec.absorb)
            else:
                self._prefetch = Prefetcher(self._source(), decode=self.codec.decode_records,
                                            width=self.layout.width)
        return self._prefetch

    def poll_batch(self, timeout_s: float | None = None) -> Records:
        """Up to batch_size records, waiting at most max_batch_wait_ms."""
        wait = timeout_s if timeout_s is not None else self.cfg.trainer.max_batch_wait_ms / 1000.0
        return self.prefetcher().take(self.cfg.trainer.batch_size, wait)

    # --- training ----------------------------------------------------------------------------
    def step(self, recs: Records | None, flush: bool = False) -> int:
        """Take consumed records in; train every batch they complete.  Returns samples trained."""
        n = len(recs) if recs is not None else 0
        if n:
            for p, o in recs.next_offsets().items():
                self.positions[p] = max(self.positions.get(p, 0), o)
            if recs.moments is not None and recs.moments.shape[1]:
                self.numeric_moments = self.codec.moments_at(recs.moments[-1])
            bad = int(n - recs.valid.sum())
            rows = recs.rows[recs.valid]
            fresh = self.dedup.first_sightings(
                dedup_keys(rows, self.layout, delayed=self.provisional is not None))
            dup = int(len(rows) - fresh.sum())
            rows = rows[fresh]
            self.duplicates += dup
            self.malformed += bad
            SAMPLES.labels("duplicate").inc(dup)
            SAMPLES.labels("malformed").inc(bad)
            rows = self._route(rows)
        else:
            rows = self.waiting[:0]
        now = time.monotonic()
        still = 0.0 if n else now - self._last_data     # how long no record has come
        if n:
            self._last_data = now
        quiet, idle = self._quiet(still)
        if self.aligner is None:
            self._enqueue(rows)
        else:
            self.aligner.add(rows)
            self._enqueue(self.aligner.release(flush=flush))
        trained = self._train_waiting(partial=flush)
        # The cuts a quiet stream makes, in the order their waits run out: a check that finds
        # both due cuts the same batches as two checks that find them one after the other (a
        # restarted trainer's first check comes later after the last record than an
        # uninterrupted trainer's does).
        wait_s = self.cfg.trainer.max_batch_wait_ms / 1000.0
        if quiet and not (idle and self.aligner.hold_ms / 1000.0 < wait_s):
            trained += self._train_waiting(partial=True)
        if idle:   # no newer impression moves the aligner's clock: release what it holds
            self._enqueue(self.aligner.release(flush=True))
            trained += self._train_waiting(partial=quiet)
        return trained

    def _quiet(self, still: float) -> tuple[bool, bool]:
        """Whether the stream has been quiet long enough for a partial batch (``quiet``) and for
        the aligner to release what it holds (``idle``), after ``still`` seconds without a
        record.  Quiet means caught up: a consumer that is only slow (a loaded machine, a gap
        the broker has yet to fill) leaves records behind, and cutting on a pause there would
        cut batches that a replay does not.  A backlog that never drains (say, a transaction
        marker at a partition's end) stops counting after ``kafka.offset_gap_wait_ms`` more."""
        wait_s = self.cfg.trainer.max_batch_wait_ms / 1000.0
        hold_s = self.aligner.hold_ms / 1000.0 if self.aligner is not None else math.inf
        if still <= min(wait_s, hold_s):
            return False, False
        if still <= min(wait_s, hold_s) + self.cfg.kafka.offset_gap_wait_ms / 1000.0:
            if self._backlog() > 0:
                return False, False
        return still > wait_s, still > hold_s

    def _backlog(self) -> int:
        """Records the broker holds past this trainer's positions; 0 when it cannot say."""
        if self._prefetch is None:
            return 0
        taken = dict(self.positions)
        try:
            return self._prefetch.call("backlog", taken, timeout_s=5.0)
        except Exception as exc:  # noqa: BLE001 - a broker away holds no records to wait for
            log.debug("backlog unknown (%s): taking the stream for quiet", exc)
            return 0

    def _enqueue(self, released: np.ndarray) -> None:
        if len(released):
            self.waiting = np.concatenate([self.waiting, released]) if len(self.waiting) else released

    def _train_waiting(self, partial: bool) -> int:
        """Train every full batch waiting, and with ``partial`` the rest as a last, short one."""
        size = self.cfg.trainer.batch_size
        trained = 0
        while len(self.waiting) >= size or (len(self.waiting) and partial):
            batch, self.waiting = self.waiting[:size], self.waiting[size:]
            trained += self._train(batch)
        return trained

    def _route(self, rows: np.ndarray) -> np.ndarray:
        """The rows to train (``trainers.samples.trained_mask``).  Without delayed feedback a
        provisional sample, which the job sends only in that mode, is dropped and counted; with
        it a final negative settles its impression's figures."""
        lay = self.layout
        keep = trained_mask(rows, lay, delayed=self.provisional is not None)
        if self.provisional is None:
            if not keep.all():
                SAMPLES.labels("provisional_ignored").inc(int((~keep).sum()))
            return rows[keep]
        self._settle(rows[~keep])
        self.settled_negatives += int((~keep).sum())
        SAMPLES.labels("settled_negative").inc(int((~keep).sum()))
        return rows[keep]

    def _settle(self, finals: np.ndarray) -> None:
        scores, frozen, served, labels = self.provisional.settle(finals[:, self.layout.sid],
                                                                 finals[:, self.layout.label])
        self.validator.add(scores, labels)
        self.vs_frozen.add(scores, frozen, labels)
        self.paired.add(scores, served, labels)

    # --- the served version's shadow ----------------------------------------------------------
    def mark_candidate(self) -> None:
        """The exporter is taking a snapshot that may be published: keep its dense weights
        (call under the model lock, with the snapshot).  Needs the tables in-process."""
        if self.model.tables:
            self.shadow_pending = (self.model.step, self.model.dense_weights())

    def track_served(self, step: int) -> bool:
        """The snapshot of ``step`` was published: from now on its dense weights are scored
        beside the live model.  False if that step's weights are not kept (a group; a restart)."""
        pending = self.shadow_pending
        if pending is None or pending[0] != step:
            return False
        self.model.set_shadow(pending[1])
        self.served_step, self.shadow_pending = step, None
        self.paired.reset()
        return True

    def _train(self, rows: np.ndarray) -> int:
        delayed = self.provisional is not None
        lay = self.layout
        batch = self.codec.to_batch(rows, delayed=delayed)
        frozen = self.frozen.predict(batch) if self.frozen is not None else None
        served = self.model.predict_shadow(batch) if self.served_step is not None else None
        scores, self.last_loss = self.model.score_and_train(batch)
        if delayed:   # score at the impression now, judge it when its label is final
            prov = rows[:, lay.provisional] == 1
            none = np.full(int(prov.sum()), np.nan, np.float32)
            self.provisional.remember(rows[prov, lay.sid] ^ PROVISIONAL_MASK, scores[prov],
                                      frozen[prov] if frozen is not None else none,
                                      served[prov] if served is not None else none)
            self._settle(rows[~prov])
        else:
            if frozen is not None:
                self.vs_frozen.add(scores, frozen, batch.labels)
            if served is not None:
                self.paired.add(scores, served, batch.labels)
            self.validator.add(scores, batch.labels)
        if self.model.step % EXPIRE_EVERY_STEPS == 0:
            self.model.expire()
        if self.cfg.trainer.checkpoint.ledger:
            self.ledger.extend(rows[:, lay.sid].tolist())
        self.trained += len(batch)
        SAMPLES.labels("trained").inc(len(batch))
        after = self.cfg.trainer.frozen_baseline_after
        # (a baseline needs the tables in-process: not in a training group)
        if self.frozen is None and after is not None and self.trained >= after and self.model.tables:
            self.frozen = self.model.frozen_copy()
        if time.monotonic() - self._gauges_at >= 1.0:  # the window's AUC is a sort: once a second
            self._gauges_at = time.monotonic()
            summary = self.validator.summary()
            if not math.isnan(summary["auc"]):
                AUC.set(summary["auc"])
            LOGLOSS.set(summary["logloss"])
            if not math.isnan(summary["calibration"]):
                CALIBRATION.set(summary["calibration"])
        STEP.set(self.model.step)
        return len(batch)

    # --- checkpoints -------------------------------------------------------------------------
    def due_checkpoint(self) -> str | None:
        ck = self.cfg.trainer.checkpoint
        return due_kind(ck.full_interval_s, ck.incremental_interval_s, self.last_ckpt is not None,
                        self._last_full, self._last_incr, time.monotonic())

    def _stream_state(self, incremental: bool) -> dict[str, np.ndarray]:
        return {"held_rows": self.aligner.snapshot() if self.aligner is not None
                else self.layout.empty(),
                "aligner_clock_ms": np.array(self.aligner.clock_ms if self.aligner else 0, np.int64),
                "waiting_rows": self.waiting,
                # an increment stores the ids added since the previous checkpoint only
                "dedup": self.dedup.state(self._ckpt_dedup_mark if incremental else None),
                "dedup_added": np.array(self.dedup.added, np.int64),
                "ledger": np.array(self.ledger, np.int64),
                "val_scores": np.array(self.validator.scores, np.float64),
                "val_labels": np.array(self.validator.labels, np.float64),
                "counters": np.array([self.trained, self.duplicates, self.malformed,
                                      self.validator.seen], np.int64)}

    def checkpoint(self, kind: str | None = None, epoch: int | None = None) -> CheckpointInfo:
        """Write a checkpoint of everything consumed so far (see the module docstring); in a
        group, as this trainer's part of ``epoch``."""
        kind = kind or ("full" if self.last_ckpt is None else "incr")
        if self.last_ckpt is None:
            kind = "full"   # an increment needs a base
        t0 = time.perf_counter()
        with self.model.lock:
            since = None if kind == "full" else self._last_ckpt_step
            groups = {k: v for k, v in self.model.state(since).items()}
            groups["stream"] = self._stream_state(incremental=kind == "incr")
            step = self.model.step
        meta = {"step": step, "since_step": since, "positions": {str(p): o for p, o in self.positions.items()},
                "topic": self.topic, "trained": self.trained,
                "previous": self.last_ckpt.seq if self.last_ckpt else None,
                "spec": self.codec.spec_hash, "numeric_moments": self.numeric_moments}
        if epoch is not None:
            meta["epoch"] = epoch
        info = self.store.write(kind, groups, meta, base=None if kind == "full" else self.last_ckpt.seq)
        self.last_ckpt, self._last_ckpt_step = info, step
        self._ckpt_dedup_mark = self.dedup.added
        self.ledger = []
        now = time.monotonic()
        self._last_incr = now
        if kind == "full":
            self._last_full = now
        CKPT_SECONDS.labels(kind).set(time.perf_counter() - t0)
        CKPT_BYTES.labels(kind).set(info.size_bytes)
        self._commit_offsets()
        return info

    def restore(self, epoch: int | None = None, group: bool = False) -> bool:
        """Restore the newest checkpoint chain; in a group, the group's committed ``epoch``
        exactly, after deleting what was written later (never committed)."""
        if group:
            self.store.discard_after(epoch)
            if epoch is None:
                return False
        chain = self.store.restore_chain(epoch if group else None)
        if not chain:
            return False
        self.apply_chain(chain)
        return True

    def apply_chain(self, chain) -> None:
        """Model, stream state and position as of the chain's last checkpoint."""
        for k, (info, groups) in enumerate(chain):
            check_spec(info.meta.get("spec"), f"checkpoint {info.path}",
                       f"Move {self.store.root} aside to start afresh under this spec, or run "
                       "the spec it was written under", expected=self.codec.spec_hash)
            try:
                self.model.load({g: a for g, a in groups.items() if g != "stream"}, increment=k > 0)
            except (ValueError, KeyError, tf.errors.InvalidArgumentError) as exc:
                raise RuntimeError(
                    f"checkpoint {info.path} does not fit this model (was the network or a table's "
                    f"dim changed?): {exc}. Move {self.store.root} aside to start afresh, or set "
                    "trainer.checkpoint.restore: false") from exc
            st = groups["stream"]
            self.dedup.load(st["dedup"], int(st["dedup_added"]), append=k > 0)
        info, groups = chain[-1]
        s = groups["stream"]
        self.positions = {int(p): int(o) for p, o in info.meta["positions"].items()}
        self.codec.set_numeric_moments(info.meta.get("numeric_moments"))
        self.numeric_moments = self.codec.numeric_moments()
        if self.aligner is not None:
            self.aligner.restore(s["held_rows"], int(s["aligner_clock_ms"]))
        self.waiting = s["waiting_rows"]
        self._ckpt_dedup_mark = self.dedup.added
        self.validator.scores.extend(s["val_scores"].tolist())
        self.validator.labels.extend(s["val_labels"].tolist())
        self.trained, self.duplicates, self.malformed, self.validator.seen = (int(x) for x in s["counters"])
        self.last_ckpt, self._last_ckpt_step = info, int(info.meta["step"])
        self.restored_from = info.path.name
        log.info("restored %s (+%d increments): step %d, positions %s", chain[0][0].path.name,
                 len(chain) - 1, self.model.step, self.positions)

    def rollback_to(self, checkpoint: str, skip_ahead: bool = False) -> dict[str, Any]:
        """Roll the live trainer back to ``checkpoint`` (``trainers.rollback``)."""
        return rollback.rollback_to(self, checkpoint, skip_ahead)

    def skip_ahead(self) -> dict[int, int]:
        """Go on from the newest offsets (``trainers.rollback``)."""
        return rollback.skip_ahead(self)

    def drop_stream(self) -> None:
        """Forget what was fetched from the old positions and what waits for a batch (a
        rollback or skip-ahead moves the positions); the next decoder starts from the moments
        of the records taken."""
        self.waiting = self.layout.empty()
        if self._prefetch is not None:
            self._prefetch.close()
            self._prefetch = None
        self.codec.set_numeric_moments(self.numeric_moments)

    def _commit_offsets(self) -> None:
        """Tell the group where the checkpoint stands (monitoring; restore uses the checkpoint)."""
        if self._prefetch is None or not self.positions:
            return
        positions = dict(self.positions)
        try:
            self._prefetch.call("commit", positions, timeout_s=10)
        except Exception as exc:  # noqa: BLE001 - monitoring only
            log.warning("offset commit failed: %s", exc)

    # --- control -----------------------------------------------------------------------------
    def set_paused(self, paused: bool) -> None:
        """Stop (or restart) fetching; records already fetched stay queued, the position kept."""
        self.prefetcher().call("set_paused", paused)

    def metrics(self) -> dict[str, Any]:
        s = self.validator.summary()
        frozen = self.vs_frozen.summary()      # {"n": 0} until the copy has scored
        # in a group the tables are the shards': the coordinator asks them once for all members
        occ = {} if self.group else publish_occupancy(self.model.occupancy())
        return {"samples_trained": self.trained, "step": self.model.step,
                "duplicates": self.duplicates, "malformed": self.malformed,
                "auc": s["auc"], "logloss": s["logloss"], "calibration": s["calibration"],
                "ctr": s["ctr"], "loss": self.last_loss,
                "samples_per_s": round(self.trained / max(1e-3, time.time() - self.started), 1),
                # both on the same samples: those the frozen copy scored (its last auc_window)
                "auc_frozen": frozen.get("auc_frozen"),
                "auc_live_vs_frozen": frozen.get("auc_live"),
                "held_for_labels": len(self.aligner) if self.aligner is not None else 0,
                "delayed_feedback": self.provisional is not None,
                "settled_negatives": self.settled_negatives,
                "awaiting_labels": len(self.provisional) if self.provisional is not None else 0,
                "waiting_for_batch": len(self.waiting),
                "frozen_at_step": self.frozen.step if self.frozen else None,
                "scored_since_frozen": self.vs_frozen.seen,
                "shadow": {**self.paired.summary(), "served_step": self.served_step},
                "checkpoint": self.last_ckpt.path.name if self.last_ckpt else None,
                "restored_from": self.restored_from,
                "positions": {str(p): o for p, o in sorted(self.positions.items())},
                **{f"rows_{k}": v["rows"] for k, v in occ.items()},
                "tables": occ}

    def close(self) -> None:
        if self._prefetch is not None:
            self._prefetch.close()
            self._prefetch = None
