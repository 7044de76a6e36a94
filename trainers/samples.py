"""Sample records as the trainer sees them: decoding, the duplicate window, batches.

A decoded sample is a ``Row`` of int64s (so ids above 2**53 survive a round trip through a
checkpoint): user, item, position, hour, label, impression time, a 64-bit hash of its
``sample_id`` -- the key of the duplicate window and of the checkpoint ledger -- whether it is a
provisional negative (``trainer.delayed_feedback``), and the model's real-time features
(``odl.features.Features.dense``) as float32 bit patterns, so one int64 array still carries a
whole sample through the aligner, the group and checkpoints.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import orjson

from odl.features import NUM_DENSE, dense_of_json
from trainers.decode_process import Decoded

if TYPE_CHECKING:     # TensorFlow stays out of a decode process (``trainers.decode_process``)
    from trainers.model import Batch

Row = tuple[int, ...]   # user, item, position, hour, label, ts_ms, sid, provisional, *feature bits
SID, PROVISIONAL = 6, 7
ID_COLUMNS = 8
ROW_WIDTH = ID_COLUMNS + NUM_DENSE


@dataclass(frozen=True)
class RowLayout:
    """Where the columns the stream itself reads sit in a row of some sample shape: the label,
    the impression time (label alignment), the sample-id hash (duplicate window, ledger) and
    the provisional flag (delayed feedback).  Every other column is the model's business."""
    width: int
    label: int
    ts: int
    sid: int
    provisional: int

    def empty(self) -> np.ndarray:
        return np.zeros((0, self.width), np.int64)


def trained_mask(rows: np.ndarray, layout: RowLayout, delayed: bool) -> np.ndarray:
    """Which rows the trainer trains (the rest are dropped or only settle figures): without
    delayed feedback the final samples; with it provisional negatives and positives, a final
    negative only settling its impression's figures (its impression was trained already).
    The one rule the trainer's routing and the ledger audit (``trainers.audit``) share."""
    provisional = rows[:, layout.provisional] == 1
    if not delayed:
        return ~provisional
    return provisional | (rows[:, layout.label] != 0)


def dedup_keys(rows: np.ndarray, layout: RowLayout, delayed: bool) -> np.ndarray:
    """Each row's key in the trainer's duplicate window: its row key, except that with delayed
    feedback a final negative gets a key of its own (``FINAL_NEGATIVE_MASK``).  Such a negative
    only settles figures; should the job ever send the same impression's positive after it (no
    run has shown one: the ledger audit counts them as ``relabelled``), the click happened and
    must still be trained, not dropped as a repeat of the negative."""
    keys = rows[:, layout.sid]
    if not delayed:
        return keys
    negative = (rows[:, layout.provisional] == 0) & (rows[:, layout.label] == 0)
    return np.where(negative, keys ^ FINAL_NEGATIVE_MASK, keys)


DEFAULT_LAYOUT = RowLayout(ROW_WIDTH, label=4, ts=5, sid=SID, provisional=PROVISIONAL)
# A provisional sample shares its impression's sample_id with the final sample that follows; its
# key in the duplicate window (and the ledger) is the id's hash with this mask applied, so the
# two are told apart, and ``sid ^ PROVISIONAL_MASK`` leads from either to the other.
PROVISIONAL_MASK = 0x5A5A_5A5A_5A5A_5A5A
# A final negative's key in the duplicate window under delayed feedback (``dedup_keys``).
FINAL_NEGATIVE_MASK = 0x3C3C_3C3C_3C3C_3C3C


def feature_bits(values) -> list[int]:
    """float32 feature values as the int64 columns of a row (their bit patterns)."""
    return np.asarray(values, np.float32).view(np.int32).astype(np.int64).tolist()


def sample_hash(sample_id: str) -> int:
    """A stable signed 64-bit hash of a sample id (collisions ~ n^2 / 2^65: none in practice)."""
    return int.from_bytes(hashlib.blake2b(sample_id.encode(), digest_size=8).digest(), "little",
                          signed=True)


class DedupWindow:
    """The last ``capacity`` distinct sample-id hashes, first sighting first out, to drop
    at-least-once repeats.  FIFO, not LRU: the window is then a function of the sequence of new
    ids alone, so a checkpoint can store just the ids added since the previous one and a restore
    rebuilds exactly the same window."""

    def __init__(self, capacity: int = 200_000):
        self.capacity = capacity
        self._ids: OrderedDict[int, None] = OrderedDict()
        self.added = 0   # ids ever added (the checkpoint's mark)

    def __len__(self) -> int:
        return len(self._ids)

    def seen(self, sid: int) -> bool:
        if sid in self._ids:
            return True
        self._ids[sid] = None
        self.added += 1
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return False

    def first_sightings(self, sids: np.ndarray) -> np.ndarray:
        """Mask of the ids not seen before (a repeat within ``sids`` counts as seen); adds them."""
        seen = self.seen
        return np.fromiter((not seen(s) for s in sids.tolist()), bool, len(sids))

    def state(self, since_added: int | None = None) -> np.ndarray:
        """All ids in the window, or those added after the mark ``since_added``."""
        n = len(self._ids) if since_added is None else min(len(self._ids), self.added - since_added)
        ids = np.fromiter(self._ids, np.int64, len(self._ids))
        return ids[len(ids) - n:]

    def load(self, ids: np.ndarray, added: int, append: bool = False) -> None:
        if not append:
            self._ids = OrderedDict()
        for i in ids.tolist():   # added after the mark: evicted meanwhile if also older
            self._ids.pop(i, None)
            self._ids[i] = None
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        self.added = added


@dataclass(frozen=True)
class Records:
    """Consumed sample records, columnar (a chunk of them costs one numpy op, not a Python loop
    per record): partition and offset of each, its decoded row, and whether it decoded.
    ``moments``: the decoder's running moments after each record (a spec's standardised inputs,
    ``odl.spec.sample.SampleBatch.moments_after``), so that a trainer knows them as of the last
    record it took, not the last one decoded ahead; None for a shape without."""
    partitions: np.ndarray   # int32 [n]
    offsets: np.ndarray      # int64 [n]
    rows: np.ndarray         # int64 [n, ROW_WIDTH]; rows of malformed records are zeros
    valid: np.ndarray        # bool [n]
    moments: np.ndarray | None = None   # float64 [n, k]

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, s: slice) -> "Records":
        return Records(self.partitions[s], self.offsets[s], self.rows[s], self.valid[s],
                       None if self.moments is None else self.moments[s])

    @staticmethod
    def empty(width: int = ROW_WIDTH) -> "Records":
        return Records(np.zeros(0, np.int32), np.zeros(0, np.int64),
                       np.zeros((0, width), np.int64), np.zeros(0, bool))

    @staticmethod
    def concat(parts: list["Records"]) -> "Records":
        if not parts:   # the width would be unknown: callers make their own empty Records
            raise ValueError("Records.concat needs at least one part")
        if len(parts) == 1:
            return parts[0]
        moments = [p.moments for p in parts]
        return Records(np.concatenate([p.partitions for p in parts]),
                       np.concatenate([p.offsets for p in parts]),
                       np.concatenate([p.rows for p in parts]),
                       np.concatenate([p.valid for p in parts]),
                       None if any(m is None for m in moments) else np.concatenate(moments))

    def next_offsets(self) -> dict[int, int]:
        """partition -> the offset after its last record here."""
        out = {}
        for p in np.unique(self.partitions).tolist():
            out[p] = int(self.offsets[self.partitions == p].max()) + 1
        return out


def _decode_bulk(values: list[bytes]) -> np.ndarray | None:
    """All values as one JSON array (one orjson call, columns built by comprehension); None if
    any record is malformed -- then each is decoded on its own to find which."""
    try:
        docs = orjson.loads(b"[" + b",".join(values) + b"]")
        if len(docs) != len(values):   # a value that was not exactly one JSON document
            return None
        ids = np.array([(d["user_id"], d["item_id"], d["position"], d.get("hour") or 0,
                         d["label"], d["impression_ts_ms"], *_sid_and_kind(d))
                        for d in docs], dtype=np.int64).reshape(-1, ID_COLUMNS)
        feats = np.array([dense_of_json(d.get("features")) for d in docs],
                         dtype=np.float32).reshape(-1, NUM_DENSE)
        cols = np.concatenate([ids, feats.view(np.int32).astype(np.int64)], axis=1)
    except (ValueError, KeyError, TypeError, OverflowError, AttributeError):
        return None
    labels = cols[:, 4]
    if not ((labels == 0) | (labels == 1)).all() or (labels[cols[:, PROVISIONAL] == 1] != 0).any():
        return None
    return cols


def decode_records(partitions: list[int], offsets: list[int], values: list[bytes]) -> Records:
    """Decode raw records; a malformed one keeps its place (``valid`` False) so its offset counts."""
    bulk = _decode_bulk(list(values))
    if bulk is not None:
        return Records(np.asarray(partitions, np.int32), np.asarray(offsets, np.int64), bulk,
                       np.ones(len(bulk), bool))
    rows, valid = [], []
    zero = (0,) * ROW_WIDTH
    for v in values:
        try:
            rows.append(decode(v))
            valid.append(True)
        except (ValueError, KeyError, TypeError, OverflowError):
            rows.append(zero)
            valid.append(False)
    return Records(np.asarray(partitions, np.int32), np.asarray(offsets, np.int64),
                   rows_array(rows), np.asarray(valid, bool))


INT64 = (-(1 << 63), (1 << 63) - 1)


def _sid_and_kind(d: dict) -> tuple[int, int]:
    """(the row's key, 1 if provisional else 0)."""
    sid = d["sample_id"]
    if not isinstance(sid, str) or not sid:
        raise TypeError(f"sample_id must be a non-empty string, not {sid!r}")
    provisional = d.get("provisional") or False
    if not isinstance(provisional, bool):
        raise TypeError(f"provisional must be a boolean, not {provisional!r}")
    return row_key(sid, provisional), int(provisional)


def row_key(sample_id: str, provisional: bool) -> int:
    """A sample's key in the duplicate window and the ledger (``PROVISIONAL_MASK``)."""
    h = sample_hash(sample_id)
    return h ^ PROVISIONAL_MASK if provisional else h


def decode(value: bytes) -> Row:
    """One sample record -> Row; raises ValueError/KeyError/TypeError when malformed."""
    d = orjson.loads(value)
    label = int(d["label"])
    if label not in (0, 1):
        raise ValueError(f"label {label} is not 0 or 1")
    if label and d.get("provisional"):
        raise ValueError("a provisional sample is a negative: label must be 0")
    row = (int(d["user_id"]), int(d["item_id"]), int(d["position"]), int(d.get("hour") or 0),
           label, int(d["impression_ts_ms"]), *_sid_and_kind(d))
    if not all(INT64[0] <= x <= INT64[1] for x in row):
        raise ValueError("a field is outside the 64-bit integer range")
    return row + tuple(feature_bits(dense_of_json(d.get("features"))))


def rows_array(rows) -> np.ndarray:
    return np.asarray(rows, dtype=np.int64).reshape(-1, ROW_WIDTH)


def to_batch(rows: np.ndarray, delayed: bool = False) -> Batch | None:
    """int64 rows [n, ROW_WIDTH] -> a model Batch (None if empty); ``delayed``: every row is a
    delayed-feedback sample (importance-weighted, ``trainers.delayed_feedback``)."""
    from trainers.model import Batch
    a = rows_array(rows)
    if not len(a):
        return None
    delayed_mask = np.ones(len(a), np.float32) if delayed else None
    feats = a[:, ID_COLUMNS:].astype(np.int32).view(np.float32)
    return Batch(a[:, 0], a[:, 1], a[:, 2], a[:, 3], a[:, 4].astype(np.float32), a[:, 5], feats,
                 delayed=delayed_mask)


class SampleCodec(Protocol):
    """What the streaming trainer needs to know about a sample shape: how records become int64
    rows (``layout``), rows a model batch, and which model learns from them.  The default shape
    is ``DefaultCodec``; a feature spec's is ``trainers.spec_samples.SpecCodec``."""
    layout: RowLayout
    spec_hash: str
    labels_arrive_late: bool      # an impression-click join: provisional samples, alignment


    def decode_records(self, partitions: list[int], offsets: list[int],
                       values: list[bytes]) -> Records: ...

    # what a decode process runs instead (``trainers.decode_process``: ``decode(values)`` ->
    # ``Decoded``) when ``trainer.decode_process`` is on; ``absorb`` takes each chunk's
    # ``Decoded`` back (refusals, moments)
    def process_decoder(self) -> Any: ...

    def absorb(self, decoded: Any) -> None: ...

    def to_batch(self, rows: np.ndarray, delayed: bool = False) -> Any: ...

    def new_model(self, cfg: Any) -> Any: ...

    # the running moments of standardised numeric inputs ({} for a shape without), as of the
    # newest record decoded; the trainer checkpoints those of the newest record it took
    # (``moments_at`` of its ``Records.moments``) and the exporter writes them into each version
    def numeric_moments(self) -> dict[str, list[float]]: ...

    def moments_at(self, after: np.ndarray) -> dict[str, list[float]]: ...

    def set_numeric_moments(self, moments: dict[str, list[float]] | None) -> None: ...


class DefaultCodec:
    """The default shape (``specs/default.yaml``): ``Row``s, ``trainers.model.CTRModel``."""
    layout = DEFAULT_LAYOUT
    labels_arrive_late = True

    def __init__(self) -> None:
        from odl.spec import default_spec
        self.spec_hash = default_spec().hash

    decode_records = staticmethod(decode_records)
    to_batch = staticmethod(to_batch)

    @staticmethod
    def process_decoder() -> "DefaultRows":
        return DefaultRows()

    @staticmethod
    def absorb(decoded: Any) -> None:
        pass     # no stream state: refusals are counted from ``valid``

    @staticmethod
    def new_model(cfg):
        from trainers.model import CTRModel
        return CTRModel(cfg)

    @staticmethod
    def numeric_moments() -> dict[str, list[float]]:
        return {}      # the default shape standardises nothing

    @staticmethod
    def moments_at(after: np.ndarray) -> dict[str, list[float]]:
        return {}

    @staticmethod
    def set_numeric_moments(moments: dict[str, list[float]] | None) -> None:
        pass


class DefaultRows:
    """The default shape's decode as a decode process runs it (``trainers.decode_process``)."""

    @staticmethod
    def decode(values: list[bytes]) -> Decoded:
        r = decode_records([0] * len(values), [0] * len(values), values)
        return Decoded(r.rows, r.valid)


def codec_for_running_spec(cfg: Any = None) -> SampleCodec:
    """The sample shape of the spec the pipeline runs (``odl.spec.running_spec``)."""
    from odl.spec import is_default, running_spec
    spec = running_spec(cfg)
    if is_default(spec):
        return DefaultCodec()
    from trainers.spec_samples import SpecCodec
    return SpecCodec(spec)
