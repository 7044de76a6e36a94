"""How declared features become model inputs: embedding keys and numeric values.

One definition for every stage that encodes a row (``odl eval --spec`` today; the trainer and
serving as they come to derive from the spec):

* **keys**: a sparse value's row key in its table is a stable 63-bit hash of the *field name(s)*
  and the value(s), so two features that read the same field (a movie and the user's last liked
  movies) meet on the same rows of a shared table, while different fields sharing one table
  (app and channel in ``small``) never collide by accident.  Key 0 is padding.
* **sparse inputs**: ``[n, width]`` keys and a ``[n, width]`` mask -- width 1 for a field or a
  cross, the field's ``max_len`` for a list (pooled by the model as the spec says).
* **numeric inputs**: each numeric feature's transform, then ``nan`` / missing -> its default.
"""
from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np

from odl.spec.model import FeatureSpec, NumericFeature, SparseFeature

PAD = 0
_MASK63 = (1 << 63) - 1


def key_of(fields: Sequence[str], values: Sequence[Any]) -> int:
    """The table key of ``values`` of ``fields`` (one field, or a cross): never PAD."""
    text = "\x1f".join(f"{f}={v}" for f, v in zip(fields, values))
    k = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & _MASK63
    return k or 1


def list_width(spec: FeatureSpec, feature: SparseFeature) -> int:
    """Columns of a sparse input: 1, or a list field's ``max_len`` (default 8)."""
    if feature.field is None:
        return 1
    f = spec.field(feature.field)
    return (f.max_len or 8) if f.type.startswith("list[") else 1


def sparse_keys(spec: FeatureSpec, feature: SparseFeature,
                rows: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """([n, width] int64 keys, [n, width] float32 mask) of one sparse feature over rows of
    typed values (``odl.spec.events``); an absent value is all padding."""
    width = list_width(spec, feature)
    keys = np.zeros((len(rows), width), np.int64)
    if feature.cross is not None:
        names = tuple(feature.cross)
        for r, row in enumerate(rows):
            vals = [row.get(f) for f in names]
            if all(v is not None for v in vals):
                keys[r, 0] = key_of(names, vals)
    else:
        name = (feature.field,)
        cache: dict[Any, int] = {}
        for r, row in enumerate(rows):
            v = row.get(feature.field)
            if v is None:
                continue
            for c, x in enumerate(v[:width] if isinstance(v, list) else (v,)):
                k = cache.get(x)
                if k is None:
                    k = cache[x] = key_of(name, (x,))
                keys[r, c] = k
    return keys, (keys != PAD).astype(np.float32)


def numeric_values(feature: NumericFeature, raw: np.ndarray) -> np.ndarray:
    """[n] float32: the transform of one numeric column (``nan`` = missing).  ``standardize``
    uses the running moments of the rows *before* each row (what a stream knows then)."""
    x = np.asarray(raw, np.float64)
    missing = ~np.isfinite(x)
    if feature.transform == "log1p":       # signed, so that -1 "unknown" codes stay finite
        x = np.sign(x) * np.log1p(np.abs(x))
    elif feature.transform == "clip":
        x = np.clip(x, *feature.clip)
    elif feature.transform == "standardize":
        v = np.where(missing, 0.0, x)
        seen = np.cumsum(~missing) - (~missing)
        s1, s2 = np.cumsum(v) - v, np.cumsum(v * v) - v * v
        mean = np.divide(s1, seen, out=np.zeros_like(s1), where=seen > 0)
        var = np.where(seen > 1, np.divide(s2, np.maximum(seen, 1)) - mean ** 2, 1.0)
        x = (x - mean) / np.sqrt(np.maximum(var, 1e-6))
    return np.where(missing | ~np.isfinite(x), feature.default, x).astype(np.float32)
