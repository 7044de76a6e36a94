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
from operator import itemgetter
from typing import Any, Sequence

import numpy as np

from odl.spec.model import FeatureSpec, NumericFeature, SparseFeature

PAD = 0
_MASK63 = (1 << 63) - 1
CACHE_LIMIT = 1 << 20       # keys a stream's per-feature cache holds before it starts afresh


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


def sparse_keys(spec: FeatureSpec, feature: SparseFeature, rows: Sequence[dict[str, Any]],
                cache: dict[Any, int] | None = None,
                cols: dict[str, Sequence[Any]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """([n, width] int64 keys, [n, width] float32 mask) of one sparse feature over rows of
    typed values (``odl.spec.events``); an absent value is all padding.  ``cache`` (value ->
    key) may be kept across calls by a stream that encodes batch after batch: hashing is the
    costly part, and categorical values repeat.  ``cols``: the rows' columns by field
    (``columns``), where the caller has them.  Raises TypeError on a value that is not a
    scalar (a list for a list field), so a reader can find and refuse the record."""
    width = list_width(spec, feature)
    cache = _bounded(cache)
    names = tuple(feature.cross) if feature.cross is not None else (feature.field,)
    cols = cols if cols is not None and all(n in cols for n in names) else columns(rows, names)
    if feature.cross is not None:
        col = list(zip(*(cols[f] for f in names))) if rows else []
        keys = scalar_keys(names, col, cache, cross=True)[:, None]
    elif width == 1 and not spec.field(feature.field).type.startswith("list["):
        keys = scalar_keys(names, cols[feature.field], cache)[:, None]
    else:
        keys = list_keys(feature.field, [v if isinstance(v, list) or v is None else [v]
                                         for v in cols[feature.field]], width, cache)
    return keys, (keys != PAD).astype(np.float32)


def columns(rows: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, Sequence[Any]]:
    """Each named field's values over ``rows`` (absent -> None).  Why: the trainer's decoder
    reads every feature of every sample; taking all columns in one C-level pass
    (``itemgetter``) costs a fraction of a ``row.get`` per value and feature."""
    names = list(dict.fromkeys(names))
    if not names:
        return {}
    if not rows:
        return {n: () for n in names}
    get = itemgetter(*names)
    try:
        got = list(map(get, rows))
    except KeyError:        # a row without some field: the slow way
        return {n: [row.get(n) for row in rows] for n in names}
    if len(names) == 1:
        return {names[0]: got}
    return dict(zip(names, zip(*got)))


SCALARS = (str, int, float, bool)


def _bounded(cache: dict | None) -> dict:
    """A stream's key cache, emptied in place once it outgrows ``CACHE_LIMIT``."""
    if cache is None:
        return {}
    if len(cache) > CACHE_LIMIT:
        cache.clear()
    return cache


def scalar_keys(names: tuple[str, ...], col: Sequence[Any], cache: dict[Any, int],
                cross: bool = False) -> np.ndarray:
    """[n] keys of single values (tuples of the parts for a cross); None (any part None) -> PAD.
    Each distinct value is hashed once: the column goes through a lookup table at C speed."""
    try:
        fresh = set(col).difference(cache)
    except TypeError:
        raise TypeError(f"{'x'.join(names)}: a value is not a single value") from None
    for v in fresh:
        parts = v if cross else (v,)
        if any(x is None for x in parts):
            cache[v] = PAD
        elif not all(isinstance(x, SCALARS) for x in parts):
            raise TypeError(f"{'x'.join(names)}: {v!r} is not a single value")
        else:
            cache[v] = key_of(names, parts)
    return np.fromiter(map(cache.__getitem__, col), np.int64, len(col))


def list_keys(name: str, lists: Sequence[Sequence[Any] | None], width: int,
              cache: dict[Any, int]) -> np.ndarray:
    """[n, width] keys of each row's values (the first ``width``; padding after)."""
    keys = np.zeros((len(lists), width), np.int64)
    field = (name,)
    for r, vals in enumerate(lists):
        if vals is None:
            continue
        if not isinstance(vals, list):
            raise TypeError(f"{name}: {vals!r} is not a list")
        for c, v in enumerate(vals[:width]):
            k = cache.get(v)
            if k is None:
                if v is None or not isinstance(v, SCALARS):
                    raise TypeError(f"{name}: {v!r} is not a single value")
                k = cache[v] = key_of(field, (v,))
            keys[r, c] = k
    return keys


def moment_trail(raw: np.ndarray, start: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """[n, 3] float64: the running moments [count, sum, sum of squares] after each row, from
    ``start`` (the moments before the first); a missing value (``nan``) counts nothing.  Why
    per row: a trainer checkpoints the moments of the records it has *taken*, which may end
    anywhere in a decoded chunk (``Records.moments``)."""
    x = np.asarray(raw, np.float64)
    present = np.isfinite(x)
    v = np.where(present, x, 0.0)
    own = np.stack([present.astype(np.float64), v, v * v], axis=1)
    return np.asarray(start, np.float64) + np.cumsum(own, axis=0)


def numeric_values(feature: NumericFeature, raw: np.ndarray,
                   moments: list[float] | None = None, frozen: bool = False) -> np.ndarray:
    """[n] float32: the transform of one numeric column (``nan`` = missing).  ``standardize``
    uses the running moments of the rows *before* each row (what a stream knows then):
    ``moments`` ([count, sum, sum of squares] of earlier batches, updated in place to
    ``moment_trail``'s last row) carries them from one batch of a stream to the next.
    ``frozen``: every row on ``moments`` as given, which stay unchanged (serving scores with the
    moments of the version it serves)."""
    x = np.asarray(raw, np.float64)
    missing = ~np.isfinite(x)
    if feature.transform == "log1p":       # signed, so that -1 "unknown" codes stay finite
        x = np.sign(x) * np.log1p(np.abs(x))
    elif feature.transform == "clip":
        x = np.clip(x, *feature.clip)
    elif feature.transform == "standardize":
        start = list(moments) if moments is not None else [0.0, 0.0, 0.0]
        if frozen:
            seen, s1, s2 = (np.full(len(x), float(m)) for m in start)
        else:
            trail = moment_trail(x, start)
            v = np.where(missing, 0.0, x)
            seen, s1, s2 = trail[:, 0] - (~missing), trail[:, 1] - v, trail[:, 2] - v * v
            if moments is not None and len(x):
                moments[:] = trail[-1].tolist()
        mean = np.divide(s1, seen, out=np.zeros_like(s1), where=seen > 0)
        var = np.where(seen > 1, np.divide(s2, np.maximum(seen, 1)) - mean ** 2, 1.0)
        x = (x - mean) / np.sqrt(np.maximum(var, 1e-6))
    return np.where(missing | ~np.isfinite(x), feature.default, x).astype(np.float32)


def count_input(value: str, raw: np.ndarray) -> np.ndarray:
    """A real-time count as the model reads it: impressions and clicks as log1p of the count,
    a CTR (already smoothed, ``odl.features.smoothed_ctr``) as it is."""
    x = np.asarray(raw, np.float64)
    x = np.where(np.isfinite(x), x, 0.0)
    return (x.clip(0.0, 1.0) if value == "ctr" else np.log1p(np.maximum(x, 0.0))).astype(np.float32)


def count_inputs(spec: FeatureSpec) -> list[tuple[str, str]]:
    """The real-time count inputs in the model's order: (``<count>.<value>_<window>``, value)."""
    return [(f"{cname}.{v}_{w}", v) for cname, c in spec.realtime.counts.items()
            for w in c.windows for v in c.values]


def count_names(spec: FeatureSpec) -> list[str]:
    return [name for name, _ in count_inputs(spec)]


def sequence_keys(value_field: str, lists: Sequence[Sequence[Any] | None], length: int,
                  cache: dict[Any, int] | None = None) -> np.ndarray:
    """[n, length] keys of each row's last clicked values (newest first; padding after)."""
    cache = _bounded(cache)
    return list_keys(value_field, lists, length, cache)
