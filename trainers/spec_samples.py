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
from trainers.samples import Records, RowLayout
from odl.spec.net import spec_inputs
from trainers.spec_model import SpecBatch, SpecModel
from trainers.spec_rows import Decoded, SpecRows

HEADER = 4


class SpecCodec:
    def __init__(self, spec: FeatureSpec):
        self.spec = spec
        self.spec_hash = spec.hash
        self.labels_arrive_late = spec.label.join is not None
        self.inputs = spec_inputs(spec)
        self.num_numeric = len(spec.numeric) + len(count_names(spec))
        self.spans: dict[str, slice] = {}
        at = HEADER
        for i in self.inputs:
            self.spans[i.name] = slice(at, at + i.width)
            at += i.width
        self.numeric_at = at
        self.layout = RowLayout(at + self.num_numeric, label=0, ts=1, sid=2, provisional=3)
        self.rows = SpecRows(spec, self.spans, self.numeric_at, self.layout)
        self.rejected: list[str] = []      # the latest malformed records' reasons (a few)

    @property
    def reader(self):
        return self.rows.reader

    def decode_records(self, partitions, offsets, values) -> Records:
        d = self.rows.decode(values)
        self._note_errors(d)
        return Records(np.asarray(partitions, np.int32), np.asarray(offsets, np.int64), d.rows,
                       d.valid, d.moments_after)

    def process_decoder(self) -> SpecRows:
        """What a decode process runs (``trainers.decode_process``): the rows encoder with its
        stream state as of now (a fresh prefetcher, e.g. after a restore, takes the restored
        moments with it)."""
        return self.rows

    def absorb(self, decoded: Decoded) -> None:
        """A chunk decoded in a decode process: its refusals, and the moments after it."""
        self._note_errors(decoded)
        if decoded.moments:
            self.rows.reader.set_moments(decoded.moments)

    def _note_errors(self, decoded: Decoded) -> None:
        if decoded.errors:
            self.rejected = (self.rejected + decoded.errors)[-10:]

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
        """As of the newest *decoded* record: up to the prefetch depth ahead of training (the
        trainer keeps its own, ``moments_at`` the last record it took)."""
        return self.reader.moments

    def moments_at(self, after: np.ndarray) -> dict[str, list[float]]:
        return self.reader.moments_at(after)

    def set_numeric_moments(self, moments: dict[str, list[float]] | None) -> None:
        self.reader.set_moments(moments)
