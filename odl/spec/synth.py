"""A synthetic log for any spec whose rows carry their label: valid rows with a learnable label.

For benchmarks and tests that need a log of a spec's shape at a chosen size (``odl bench trainer
--spec``).  Categorical values follow a Zipf law over a vocabulary per field (a few values are
frequent, most rare, as ids in click logs are); numbers are log-normal within the field's
bounds.  The label is drawn from a hidden logistic model: every (field, value) of a sparse
feature and every numeric feature carries a fixed weight, so a model that learns per-value
weights can beat the base rate, and one that does not cannot.
"""
from __future__ import annotations

import math
import random
from typing import Any

from odl.spec.encode import key_of
from odl.spec.model import FeatureSpec, FieldSpec
from odl.spec.sample import sample_fields

START_MS = 1_700_000_000_000


def _zipf_index(rng: random.Random, vocab: int, s: float = 1.1) -> int:
    """Approximately Zipf(s) over [0, vocab): inverse transform of the continuous power law."""
    u = rng.random()
    return min(vocab - 1, int(((vocab ** (1 - s) - 1) * u + 1) ** (1 / (1 - s))) - 1)


def _value(name: str, f: FieldSpec, rng: random.Random, vocab: int) -> Any:
    lo, hi = f.bounds
    kind = f.type[5:-1] if f.type.startswith("list[") else f.type
    if f.type.startswith("list["):
        inner = f.model_copy(update={"type": kind})
        return [_value(name, inner, rng, vocab) for _ in range(rng.randint(1, min(4, f.max_len or 4)))]
    if kind in ("id", "int"):
        low = int(lo) if lo is not None else 0
        high = int(hi) if hi is not None else low + vocab
        span = min(vocab, high - low + 1)
        return low + _zipf_index(rng, span)
    if kind == "float":
        x = math.exp(rng.gauss(1.0, 1.2))
        return round(min(max(x, lo if lo is not None else -math.inf), hi if hi is not None else math.inf), 3)
    if kind == "bool":
        return rng.random() < 0.5
    return f"{name}-{_zipf_index(rng, vocab)}"


def _weight(name: str, value: Any) -> float:
    """The hidden model's fixed weight of one value of one field, in [-1, 1)."""
    return (key_of((name,), (value,)) % 2001) / 1000.0 - 1.0


def synthetic_rows(spec: FeatureSpec, n: int, seed: int = 0, vocab: int = 5000,
                   gap_ms: tuple[int, int] = (0, 40), start_ms: int = START_MS,
                   base_ctr: float = 0.2) -> list[dict[str, Any]]:
    """``n`` rows in time order, each an event of ``spec`` with its label field set."""
    if spec.label.field is None:
        raise ValueError(f"spec {spec.name}: synthetic rows need a label field (label.field); an "
                         "impression/click spec replays through the stream generator")
    rng = random.Random(seed)
    ev, lab = spec.events, spec.label
    inputs = set(sample_fields(spec))
    numeric = {nf.field for nf in spec.numeric.values()}
    skip = {ev.time_field, lab.field, ev.type_field, ev.version_field}
    bias = math.log(base_ctr / (1 - base_ctr))
    scale = 1.5 / math.sqrt(max(1, len(inputs)))
    lo, hi = spec.field(lab.field).bounds
    pos = lab.threshold if lab.threshold is not None else (hi if hi is not None else 1)
    neg = (lo if lo is not None else 0) if lab.threshold is not None else 0
    cast = {"bool": bool, "int": int}.get(spec.field(lab.field).type, float)
    # a field feeding a small table draws from a vocabulary that fits it (genres: 64 rows)
    vocabs = {name: vocab for name in ev.fields}
    for f in spec.sparse.values():
        if f.field is not None:
            cap = spec.tables[f.table].capacity
            vocabs[f.field] = min(vocabs[f.field], max(2, cap // 2))
    for sq in spec.realtime.sequences.values():
        vocabs[sq.value] = min(vocabs[sq.value], max(2, spec.tables[sq.table].capacity // 2))
    ts, rows = start_ms, []
    for _ in range(n):
        ts += rng.randint(*gap_ms)
        row: dict[str, Any] = {ev.time_field: ts}
        if ev.version_field:
            row[ev.version_field] = ev.version
        logit = bias
        for name, f in ev.fields.items():
            if name in skip or f.path or f.type == "object":
                continue
            if not (f.required or name in inputs) and rng.random() < 0.5:
                continue
            v = row[name] = _value(name, f, rng, vocabs[name])
            if name in numeric:
                logit += scale * _weight(name, "") * math.log1p(abs(float(v)))
            elif name in inputs:
                for x in (v if isinstance(v, list) else [v]):
                    logit += scale * 2.0 * _weight(name, x)
        clicked = rng.random() < 1 / (1 + math.exp(-logit))
        row[lab.field] = cast(pos if clicked else neg)
        rows.append(row)
    return rows


def request_rows(spec: FeatureSpec, n: int, seed: int = 0, vocab: int = 5000) -> list[dict[str, Any]]:
    """``n`` serving request instances of ``spec`` (its ``serving.request`` fields, drawn as the
    synthetic log draws them): the demo's load under a declared spec."""
    rng = random.Random(seed)
    fields = spec.serving.request
    return [{f: _value(f, spec.field(f), rng, vocab) for f in fields
             if spec.field(f).type != "object" and not spec.field(f).path}
            for _ in range(n)]
