"""A feature spec's sample records as the trainer's int64 rows (layout: ``trainers.spec_samples``).

Kept free of TensorFlow so that a decode process (``trainers.decode_process``) can run it: the
model's input widths come in from the parent (``spec_samples.SpecCodec``), which knows them.
"""
from __future__ import annotations

import numpy as np

from odl.spec import FeatureSpec
from odl.spec.sample import SampleReader
from trainers.decode_process import Decoded
from trainers.samples import RowLayout, row_key


class SpecRows:
    """Records -> ``Decoded``; keeps the reader's stream state (key caches, moments)."""

    def __init__(self, spec: FeatureSpec, spans: dict[str, slice], numeric_at: int,
                 layout: RowLayout):
        self.reader = SampleReader(spec)
        self.spans, self.numeric_at, self.layout = spans, numeric_at, layout

    def decode(self, values: list[bytes]) -> Decoded:
        b = self.reader.read(list(values))
        lay = self.layout
        rows = np.zeros((len(b.valid), lay.width), np.int64)
        rows[:, lay.label], rows[:, lay.ts], rows[:, lay.provisional] = b.labels, b.ts_ms, b.provisional
        rows[:, lay.sid] = [row_key(s, p) if ok else 0
                            for s, p, ok in zip(b.sample_ids, b.provisional.tolist(), b.valid)]
        for name, span in self.spans.items():
            rows[:, span] = b.keys[name]
        rows[:, self.numeric_at:] = b.numeric.view(np.int32)
        rows[~b.valid] = 0
        return Decoded(rows, b.valid, b.errors, self.reader.moments, b.moments_after)
