"""The quality gate: whether a trainer snapshot may become a served version (or dense refresh).

A candidate passes when
1. every dense weight, and every embedding row it brings, is finite (rows also no longer than
   ``exporter.gate_max_row_norm``) -- and so is every row of every sparse delta, checked
   before it is written (``check_rows``);
2. its last training loss is finite (once it has trained at all);
3. on the same recent samples -- the trainer scores every batch with the live model and with
   the last published dense weights over its live rows (the *shadow*: what serving runs, since
   deltas keep Redis's rows equal to the trainer's), each before training on it --
   its AUC is not worse than the served version's by more than ``auc_margin`` and its log-loss
   not higher by more than ``logloss_margin`` (relative), once ``min_paired`` samples were
   scored by both;
4. without such a comparison (a training group keeps no shadow; a trainer restart loses it;
   too few paired samples yet) its progressive AUC window is compared with the one recorded in
   the served version's manifest -- different samples, so under drift a fresh window can be
   harder than the served one was.  A candidate without a measurable AUC passes only while the
   served version has none either: losing a measured figure is a regression too.

A refusal for integrity (non-finite or over-long values) -- of a version, a delta or an
embedding set -- *freezes* the exporter
(``ControlPlane.freeze``): sparse deltas and dense refreshes are held, as under a pin, so
nothing of the refused model reaches serving through the per-second paths either; versions are
still tried on schedule, and the first that passes lifts the freeze.  A version refused for
quality (3, 4) freezes only with ``exporter.freeze_on_regression``; otherwise it is not
published and serving keeps the served weights while the rows flow.  A refused dense refresh is
only skipped: the next one, five seconds later, is judged afresh.  ``odl publish --skip-gate`` (a version without the AUC test) and
``odl resume exporter`` are the operator's overrides.  No override writes a non-finite row:
deltas are checked again after it, and freeze again if they must.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str | None = None
    integrity: bool = False   # non-finite or over-long values: never served, always frozen on

    @staticmethod
    def refuse(reason: str, integrity: bool = False) -> "Verdict":
        return Verdict(False, reason, integrity)


PASS = Verdict(True)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def check_rows(rows: Iterable[tuple[str, np.ndarray]], max_norm: float | None = None) -> Verdict:
    """Embedding rows (``(table, [n, dim] vectors)``): every value finite and, with
    ``max_norm``, no row longer than it.  Checked before any row is written to Redis."""
    for table, vectors in rows:
        if not len(vectors):
            continue
        finite = np.isfinite(vectors).all(axis=1)
        if not finite.all():
            return Verdict.refuse(f"{int((~finite).sum())} non-finite embedding rows in table {table}",
                                  integrity=True)
        if max_norm is not None:
            long = np.linalg.norm(vectors, axis=1) > max_norm
            if long.any():
                return Verdict.refuse(f"{int(long.sum())} embedding rows in table {table} longer "
                                      f"than exporter.gate_max_row_norm={max_norm:g}", integrity=True)
    return PASS


def check_finite(weights: dict[str, np.ndarray],
                 rows: Iterable[tuple[str, np.ndarray]] = (), max_norm: float | None = None) -> Verdict:
    for k, v in weights.items():
        if not np.all(np.isfinite(v)):
            return Verdict.refuse(f"non-finite values in dense weight {k}", integrity=True)
    return check_rows(rows, max_norm)


def check(snapshot: dict[str, Any], served_metrics: dict[str, Any] | None, auc_margin: float,
          rows: Iterable[tuple[str, np.ndarray]] = (), max_norm: float | None = None,
          logloss_margin: float = 0.05, min_paired: int = 500) -> Verdict:
    """``snapshot``: the trainer's (weights, step, metrics); ``served_metrics``: the manifest
    metrics of the version serving uses now, or None before the first version."""
    verdict = check_finite(snapshot["weights"], rows, max_norm)
    if not verdict.ok:
        return verdict
    metrics = snapshot.get("metrics", {})
    loss = metrics.get("loss")
    if snapshot.get("step", 0) > 0 and loss is not None and not _finite(loss):
        return Verdict.refuse(f"non-finite training loss ({loss})", integrity=True)
    shadow = metrics.get("shadow") or {}
    if shadow.get("n", 0) >= min_paired:
        return _paired(shadow, auc_margin, logloss_margin)
    if served_metrics is None:
        return PASS
    new, old = metrics.get("auc"), served_metrics.get("auc")
    if not _finite(old):
        return PASS
    if not _finite(new):
        return Verdict.refuse(f"no measurable progressive AUC (served version has {old:.4f})")
    if new < old - auc_margin:
        return Verdict.refuse(f"progressive AUC {new:.4f} is worse than the served version's "
                              f"{old:.4f} by more than {auc_margin}")
    return PASS


def _paired(s: dict[str, Any], auc_margin: float, logloss_margin: float) -> Verdict:
    """Candidate against the served version's shadow on the same ``s["n"]`` samples."""
    n = s["n"]
    new, old = s.get("auc_live"), s.get("auc_served")
    if _finite(old) and _finite(new) and new < old - auc_margin:
        return Verdict.refuse(f"AUC {new:.4f} is worse than the served version's {old:.4f} on the "
                              f"same {n} samples, by more than {auc_margin}")
    if _finite(old) and not _finite(new):
        return Verdict.refuse(f"no measurable AUC (served version has {old:.4f} on the same {n} samples)")
    ll_new, ll_old = s.get("logloss_live"), s.get("logloss_served")
    if _finite(ll_old) and _finite(ll_new) and ll_new > ll_old * (1 + logloss_margin):
        return Verdict.refuse(f"log-loss {ll_new:.4f} is above the served version's {ll_old:.4f} on "
                              f"the same {n} samples, by more than {logloss_margin:.0%}")
    return PASS
