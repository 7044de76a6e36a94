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
from trainers.samples import Records, RowLayout, SampleCodec, trained_mask

MAX_LOST_SHOWN = 10


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
    relabelled: int = 0        # impressions the job sent as final negative and positive both
    relabelled_negative_first: int = 0   # of those, the negative first
    lost_keys: tuple[int, ...] = ()   # the first few lost keys, to look up (``records_of``)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "lost_keys"}


def _decode(codec: SampleCodec, records: list[tuple[int, int, bytes]]) -> Records:
    if not records:
        return Records.empty(codec.layout.width)
    parts, offs, vals = zip(*records)
    return codec.decode_records(list(parts), list(offs), list(vals))


def _valid_rows(codec: SampleCodec, records: list[tuple[int, int, bytes]]) -> tuple[np.ndarray, int]:
    """(the decoded rows of the valid records in topic order, records refused as malformed)."""
    decoded = _decode(codec, records)
    return decoded.rows[decoded.valid], int((~decoded.valid).sum())


def relabelled(rows: np.ndarray, layout: RowLayout) -> tuple[int, int]:
    """(impressions whose final samples carry both labels, those of them whose negative came
    first).  The samples topic is keyed by sample id, so one impression's samples share a
    partition and their topic order is the order the job wrote them."""
    final = rows[rows[:, layout.provisional] == 0]
    keys, first, inverse = np.unique(final[:, layout.sid], return_index=True, return_inverse=True)
    labels = final[:, layout.label] != 0
    positives = np.bincount(inverse, weights=labels, minlength=len(keys))
    counts = np.bincount(inverse, minlength=len(keys))
    both = (positives > 0) & (positives < counts)
    return int(both.sum()), int((both & ~labels[first]).sum())


def audit(codec: SampleCodec, records: list[tuple[int, int, bytes]], ledger: np.ndarray,
          delayed: bool) -> Audit:
    rows, malformed = _valid_rows(codec, records)
    sid = codec.layout.sid
    expected = np.unique(rows[trained_mask(rows, codec.layout, delayed), sid])
    present = np.unique(rows[:, sid])
    keys, counts = np.unique(ledger, return_counts=True)
    unexpected = np.setdiff1d(keys, expected, assume_unique=True)
    lost = np.setdiff1d(expected, keys, assume_unique=True)
    flips, negative_first = relabelled(rows, codec.layout)
    return Audit(records=len(records), malformed=malformed, expected=len(expected),
                 trained=len(ledger), lost=len(lost),
                 dup=int((counts - 1).sum()), unexpected=len(unexpected),
                 unexpected_in_topic=int(np.isin(unexpected, present).sum()),
                 relabelled=flips, relabelled_negative_first=negative_first,
                 lost_keys=tuple(int(k) for k in lost[:MAX_LOST_SHOWN]))


def records_of(codec: SampleCodec, records: list[tuple[int, int, bytes]], keys: tuple[int, ...]
               ) -> list[tuple[int, int, int, bytes]]:
    """(key, partition, offset, value) of every record whose row key is one of ``keys``: what
    a lost key looked like in the topic (repeats, labels, provisional or final)."""
    if not keys:
        return []
    decoded = _decode(codec, records)
    hit = decoded.valid & np.isin(decoded.rows[:, codec.layout.sid], np.array(keys, np.int64))
    return [(int(decoded.rows[i, codec.layout.sid]), *records[i][:2], records[i][2])
            for i in np.flatnonzero(hit)]
