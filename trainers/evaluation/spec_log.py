"""A log described by a feature spec, as arrays `odl eval` replays (``EvalLog``'s counterpart).

Rows come through ``odl.spec.logs.read_log`` (refused rows are counted by reason and left out),
in event-time order.  Each row's inputs are what a stream would know at its event time:

* sparse features: the row's own values (``odl.spec.encode`` keys);
* real-time counts: impressions, clicks and smoothed CTR of the key over each window, with the
  stream's tile semantics (``realtime.tile_s``: the window ends at the newest tile boundary at
  or before the row; events strictly before it), clicks counted at their own time;
* sequences: the key's last N clicked values strictly before the row;
* numeric features: their transforms (``standardize`` on the moments of earlier rows).

Logs whose rows carry their label (``label.field``) only: a click is the row itself, known
when the row is -- or, with a click delay (``odl eval --delay``), a moment later.  Logs that join impressions with clicks replay through the
default shape (`odl eval` without ``--spec``).
"""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from odl.config import TrainerConfig
from odl.features import smoothed_ctr
from odl.spec import FeatureSpec
from odl.spec.encode import count_input, count_names, key_of, numeric_values, sparse_keys
from odl.spec.logs import read_log
from trainers.evaluation.features import _window_counts
from odl.spec.net import spec_inputs
from trainers.spec_model import SpecBatch, SpecModel


@dataclass(frozen=True)
class SpecLog:
    name: str
    spec: FeatureSpec
    ts_ms: np.ndarray                 # int64 [n], non-decreasing
    label: np.ndarray                 # float32 [n]
    click_ts_ms: np.ndarray           # int64 [n]: the row's time for a click, else -1
    keys: dict[str, np.ndarray]       # model input -> [n, width] int64
    numeric: np.ndarray               # [n, k] float32
    item: np.ndarray                  # int64 [n]: what the popularity baseline counts
    refused: dict[str, int] = field(default_factory=dict)
    numeric_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.ts_ms)

    @property
    def span_ms(self) -> int:
        return int(self.ts_ms[-1] - self.ts_ms[0]) if len(self) else 0

    def head(self, n: int) -> "SpecLog":
        return replace(self, ts_ms=self.ts_ms[:n], label=self.label[:n],
                       click_ts_ms=self.click_ts_ms[:n], item=self.item[:n],
                       keys={k: v[:n] for k, v in self.keys.items()}, numeric=self.numeric[:n])

    def batch(self, rows: np.ndarray, labels: np.ndarray | None = None,
              provisional: np.ndarray | None = None) -> SpecBatch:
        return SpecBatch({k: v[rows] for k, v in self.keys.items()}, self.numeric[rows],
                         labels if labels is not None else np.zeros(len(rows), np.float32),
                         self.ts_ms[rows], provisional)

    def make_model(self, cfg: TrainerConfig) -> SpecModel:
        return SpecModel(self.spec, cfg)

    def tokens(self, r: int) -> tuple[dict[str, list[str]], dict[str, float]]:
        """The row for the linear peers: a namespace of key tokens per input, numeric values."""
        ns = {name: [str(k) for k in keys[r] if k] for name, keys in self.keys.items()}
        return ns, dict(zip(self.numeric_names, self.numeric[r].tolist()))


def load_spec_log(spec: FeatureSpec, path: str | Path, columns: dict[str, str] | None = None,
                  click_delay_s: tuple[float, float] | None = None, seed: int = 7) -> SpecLog:
    """The log as arrays.  With ``click_delay_s`` each click is taken to arrive that long after
    its row (uniform, seeded, as ``movielens_log`` does): ``odl eval --delay`` then releases
    labels with the stream's timing, and counts and sequences see a click only from then on."""
    if spec.label.field is None:
        raise ValueError(f"spec {spec.name}: odl eval --spec needs a log whose rows carry their "
                         "label (label.field); impression/click logs replay through the default "
                         "shape (odl eval without --spec)")
    refused: Counter[str] = Counter()
    rows = []
    for row in read_log(spec, path, columns):
        if row.reason is not None:
            refused[row.reason] += 1
        else:
            rows.append(row.values)
    if not rows:
        raise ValueError(f"{path}: no valid row under spec {spec.name} (refused: {dict(refused)})")
    tf_name = spec.events.time_field
    rows.sort(key=lambda v: v[tf_name])                       # stable: file order within a ms
    ts = np.array([v[tf_name] for v in rows], np.int64)
    lab = spec.label
    label = np.array([lab.positive(v[lab.field]) for v in rows], np.float32)
    delay = np.zeros(len(ts), np.int64)
    if click_delay_s is not None:
        rng = np.random.default_rng(seed)
        delay = (1000 * rng.uniform(*click_delay_s, size=len(ts))).astype(np.int64)
    click_ts = np.where(label > 0, ts + delay, -1)
    keys = {n: sparse_keys(spec, f, rows)[0] for n, f in spec.sparse.items()}
    keys.update(_sequences(spec, rows, ts, click_ts))
    cols, names = [], []
    for n, f in spec.numeric.items():
        cols.append(numeric_values(f, np.array([np.nan if v[f.field] is None else float(v[f.field])
                                                for v in rows])))
        names.append(n)
    for n, col in _counts(spec, rows, ts, click_ts).items():
        cols.append(col)
        names.append(n)
    numeric = np.stack(cols, axis=1) if cols else np.zeros((len(rows), 0), np.float32)
    assert [i.name for i in spec_inputs(spec)] == list(keys)
    return SpecLog(Path(path).stem, spec, ts, label, click_ts, keys, numeric,
                   _popularity_key(spec, keys), dict(refused), tuple(names))


def _entity(spec: FeatureSpec, rows: list[dict], key: list[str]) -> np.ndarray:
    """Dense entity numbers of a count's key (a field or a cross); -1 when a part is absent."""
    ids: dict[tuple, int] = {}
    out = np.empty(len(rows), np.int64)
    for r, v in enumerate(rows):
        k = tuple(v.get(f) for f in key)
        out[r] = -1 if None in k else ids.setdefault(k, len(ids))
    return out


def _counts(spec: FeatureSpec, rows: list[dict], ts: np.ndarray,
            click_ts: np.ndarray) -> dict[str, np.ndarray]:
    rt = spec.realtime
    tile = rt.tile_s * 1000
    end = ts - ts % tile
    clicked = click_ts >= 0
    out: dict[str, np.ndarray] = {}
    for cname, c in rt.counts.items():
        ent = _entity(spec, rows, c.key)
        has = ent >= 0
        for w in c.windows:
            lo = end - rt.windows[w] * 1000
            imps = _window_counts(ent[has], ts[has], ent, lo, end).astype(np.float64)
            clicks = _window_counts(ent[has & clicked], click_ts[has & clicked], ent, lo, end
                                    ).astype(np.float64)
            imps[~has], clicks[~has] = 0, 0
            values = {"impressions": imps, "clicks": clicks, "ctr": smoothed_ctr(imps, clicks)}
            for v in c.values:
                out[f"{cname}.{v}_{w}"] = count_input(v, values[v])
    assert list(out) == count_names(spec)
    return out


def _sequences(spec: FeatureSpec, rows: list[dict], ts: np.ndarray,
               click_ts: np.ndarray) -> dict[str, np.ndarray]:
    """Each row's key's last N clicked values, newest first: clicks whose own time is strictly
    before the row's."""
    clicks = np.nonzero(click_ts >= 0)[0]
    clicks = clicks[np.argsort(click_ts[clicks], kind="stable")]
    out = {}
    for sname, s in spec.realtime.sequences.items():
        keys = np.zeros((len(rows), s.length), np.int64)
        recent: dict = {}
        cache: dict = {}
        c = 0
        for r in range(len(rows)):
            while c < len(clicks) and click_ts[clicks[c]] < ts[r]:
                row = rows[clicks[c]]
                k, v = row.get(s.key), row.get(s.value)
                if k is not None and v is not None:
                    kv = cache.get(v) or cache.setdefault(v, key_of((s.value,), (v,)))
                    recent.setdefault(k, deque(maxlen=s.length)).appendleft(kv)
                c += 1
            q = recent.get(rows[r].get(s.key))
            if q:
                keys[r, :len(q)] = list(q)
        out[sname] = keys
    return out


def _popularity_key(spec: FeatureSpec, keys: dict[str, np.ndarray]) -> np.ndarray:
    """The popularity baseline counts the last serving entity that a sparse feature reads (the
    item of a user-item log), else the first sparse feature."""
    by_field = {f.field: n for n, f in spec.sparse.items() if f.field is not None}
    for e in reversed(spec.serving.entities):
        if e in by_field:
            return keys[by_field[e]][:, 0]
    return next(iter(keys.values()))[:, 0]
