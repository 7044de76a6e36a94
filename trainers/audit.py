"""The ledger audit: did the trainer learn from every sample exactly once?

With ``trainer.checkpoint.ledger`` on, each checkpoint stores the keys (``row_key``) of the rows
trained since the checkpoint before it (``meta.previous``).  The *committed* ledger is the union
along the lineage that ends at the newest checkpoint (or a group's committed epoch): what the
model's state really contains.  Rows trained after the last checkpoint of a killed incarnation
are not in it -- the restore rolled them back and they were trained again from the restored
position, which is why a kill costs nothing here.

Compared with the samples topic read back whole (decoded by the running spec's codec, filtered
by the trainer's own routing rule, ``trainers.samples.trained_mask``): ``lost`` are keys the
topic holds that the ledger lacks, ``dup`` the ledger's keys beyond their first.  The samples
topic is written at least once, so it may carry a record twice; the trainer's duplicate window
must absorb those, and a duplicate that got through shows up as ``dup``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from trainers.checkpoint import CheckpointInfo, CheckpointStore
from trainers.samples import SampleCodec, trained_mask


def committed_ledger(store: CheckpointStore, epoch: int | None = None) -> np.ndarray:
    """Ledger keys along the lineage ending at the newest checkpoint, or at the one of group
    ``epoch``.  ValueError if the lineage is broken (a link retired: keep ``keep_full`` high
    enough for an audit) or a checkpoint carries no ledger."""
    by_seq = {c.seq: c for c in store.list()}
    if not by_seq:
        return np.zeros(0, np.int64)
    if epoch is None:
        end: CheckpointInfo = by_seq[max(by_seq)]
    else:
        end = next((c for c in by_seq.values() if c.meta.get("epoch") == epoch), None)
        if end is None:
            raise ValueError(f"{store.root}: no checkpoint of epoch {epoch}")
    parts, seq = [], end.seq
    while seq is not None:
        info = by_seq.get(seq)
        if info is None:
            raise ValueError(f"{store.root}: checkpoint {seq} of the lineage is gone (retired?)")
        stream = store.read(info).get("stream", {})
        if "ledger" not in stream:
            raise ValueError(f"{info.path}: no ledger (trainer.checkpoint.ledger is off)")
        parts.append(np.asarray(stream["ledger"], np.int64))
        seq = info.meta.get("previous")
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


@dataclass
class Audit:
    records: int        # sample records in the topic (duplicates from job restarts included)
    malformed: int      # records the codec refused (the trainer counts and skips them too)
    expected: int       # distinct keys the trainer should have trained
    trained: int        # ledger entries along the committed lineage
    lost: int           # expected keys missing from the ledger
    dup: int            # ledger entries beyond each key's first
    unexpected: int     # ledger keys the trainer should not have trained (should be 0)
    unexpected_in_topic: int   # of those, keys the topic does hold, on rows routed out

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def expected_keys(codec: SampleCodec, records: list[tuple[int, int, bytes]], delayed: bool
                  ) -> tuple[np.ndarray, np.ndarray, int]:
    """(distinct row keys the trainer trains out of ``records``, every distinct row key there,
    records refused as malformed)."""
    if not records:
        empty = np.zeros(0, np.int64)
        return empty, empty, 0
    parts, offs, vals = zip(*records)
    decoded = codec.decode_records(list(parts), list(offs), list(vals))
    rows = decoded.rows[decoded.valid]
    keep = trained_mask(rows, codec.layout, delayed)
    sid = codec.layout.sid
    return np.unique(rows[keep, sid]), np.unique(rows[:, sid]), int((~decoded.valid).sum())


def audit(codec: SampleCodec, records: list[tuple[int, int, bytes]], ledger: np.ndarray,
          delayed: bool) -> Audit:
    expected, present, malformed = expected_keys(codec, records, delayed)
    keys, counts = np.unique(ledger, return_counts=True)
    unexpected = np.setdiff1d(keys, expected, assume_unique=True)
    return Audit(records=len(records), malformed=malformed, expected=len(expected),
                 trained=len(ledger), lost=int(len(np.setdiff1d(expected, keys, assume_unique=True))),
                 dup=int((counts - 1).sum()), unexpected=len(unexpected),
                 unexpected_in_topic=int(np.isin(unexpected, present).sum()))
