"""The quality gate: whether a trainer snapshot may become a served version (or dense refresh).

A candidate passes when
1. every dense weight, and every embedding row it brings, is finite (rows also no longer than
   ``exporter.gate_max_row_norm``) -- and so is every row of every sparse delta, checked
   before it is written (``check_rows``);
2. its last training loss is finite (once it has trained at all);
3. its recent progressive AUC (the trainer's sliding window: scored before training on each
   sample, so it is an honest hold-out figure) is not worse than the served version's by more
   than ``auc_margin``.  A candidate without a measurable AUC (one class seen so far) passes only
   while the served version has none either: losing a measured figure is a regression too.

Both AUCs are the trainer's window at export time; under strong drift a fresh window can be
harder than the served version's was.

A refusal *freezes* the exporter (``ControlPlane.freeze``): sparse deltas and dense refreshes
are held, as under a pin, so nothing of the refused model reaches serving through the
per-second paths either; versions are still tried on schedule, and the first that passes
lifts the freeze.  ``odl publish --skip-gate`` (a version without the AUC test) and
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

    @staticmethod
    def refuse(reason: str) -> "Verdict":
        return Verdict(False, reason)


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
            return Verdict.refuse(f"{int((~finite).sum())} non-finite embedding rows in table {table}")
        if max_norm is not None:
            long = np.linalg.norm(vectors, axis=1) > max_norm
            if long.any():
                return Verdict.refuse(f"{int(long.sum())} embedding rows in table {table} longer "
                                      f"than exporter.gate_max_row_norm={max_norm:g}")
    return PASS


def check_finite(weights: dict[str, np.ndarray],
                 rows: Iterable[tuple[str, np.ndarray]] = (), max_norm: float | None = None) -> Verdict:
    for k, v in weights.items():
        if not np.all(np.isfinite(v)):
            return Verdict.refuse(f"non-finite values in dense weight {k}")
    return check_rows(rows, max_norm)


def check(snapshot: dict[str, Any], served_metrics: dict[str, Any] | None, auc_margin: float,
          rows: Iterable[tuple[str, np.ndarray]] = (), max_norm: float | None = None) -> Verdict:
    """``snapshot``: the trainer's (weights, step, metrics); ``served_metrics``: the manifest
    metrics of the version serving uses now, or None before the first version."""
    verdict = check_finite(snapshot["weights"], rows, max_norm)
    if not verdict.ok:
        return verdict
    metrics = snapshot.get("metrics", {})
    loss = metrics.get("loss")
    if snapshot.get("step", 0) > 0 and loss is not None and not _finite(loss):
        return Verdict.refuse(f"non-finite training loss ({loss})")
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
