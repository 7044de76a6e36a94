"""The sample shape of a feature spec for the streaming trainer (``trainers.samples.SampleCodec``).

Records (``odl.spec.sample``) become int64 rows, as the default shape's do, so that the duplicate
window, label alignment, waiting batches and checkpoints handle them unchanged::

    label | ts_ms | sample-id hash | provisional | keys of each input (its width) | numeric bits

numeric inputs as float32 bit patterns.  ``to_batch`` cuts a row block back into a
``SpecBatch`` for ``trainers.spec_model.SpecModel``.
"""
from __future__ import annotations

import numpy as np

from odl.spec import FeatureSpec
from odl.spec.encode import count_names
from odl.spec.sample import SampleReader
from trainers.samples import Records, RowLayout, row_key
from trainers.spec_model import SpecBatch, SpecModel, spec_inputs

HEADER = 4


class SpecCodec:
    def __init__(self, spec: FeatureSpec):
        self.spec = spec
        self.spec_hash = spec.hash
        self.labels_arrive_late = spec.label.join is not None
        self.inputs = spec_inputs(spec)
        self.reader = SampleReader(spec)
        self.num_numeric = len(spec.numeric) + len(count_names(spec))
        self.spans: dict[str, slice] = {}
        at = HEADER
        for i in self.inputs:
            self.spans[i.name] = slice(at, at + i.width)
            at += i.width
        self.numeric_at = at
        self.layout = RowLayout(at + self.num_numeric, label=0, ts=1, sid=2, provisional=3)
        self.rejected: list[str] = []      # the latest malformed records' reasons (a few)

    def decode_records(self, partitions, offsets, values) -> Records:
        b = self.reader.read(list(values))
        n = len(b.valid)
        rows = np.zeros((n, self.layout.width), np.int64)
        lay = self.layout
        rows[:, lay.label], rows[:, lay.ts], rows[:, lay.provisional] = b.labels, b.ts_ms, b.provisional
        rows[:, lay.sid] = [row_key(s, p) if ok else 0
                            for s, p, ok in zip(b.sample_ids, b.provisional.tolist(), b.valid)]
        for name, span in self.spans.items():
            rows[:, span] = b.keys[name]
        rows[:, self.numeric_at:] = b.numeric.view(np.int32)
        rows[~b.valid] = 0
        if b.errors:
            self.rejected = (self.rejected + b.errors)[-10:]
        return Records(np.asarray(partitions, np.int32), np.asarray(offsets, np.int64), rows,
                       b.valid)

    def to_batch(self, rows: np.ndarray, delayed: bool = False) -> SpecBatch | None:
        a = np.asarray(rows, np.int64).reshape(-1, self.layout.width)
        if not len(a):
            return None
        keys = {name: a[:, span] for name, span in self.spans.items()}
        numeric = a[:, self.numeric_at:].astype(np.int32).view(np.float32)
        lay = self.layout
        return SpecBatch(keys, numeric, a[:, lay.label].astype(np.float32), a[:, lay.ts],
                         np.ones(len(a), np.float32) if delayed else None)

    def new_model(self, cfg) -> SpecModel:
        return SpecModel(self.spec, cfg)

    def numeric_moments(self) -> dict[str, list[float]]:
        """As of the newest *decoded* record: up to the prefetch depth ahead of training."""
        return self.reader.moments

    def set_numeric_moments(self, moments: dict[str, list[float]] | None) -> None:
        self.reader.set_moments(moments)
