"""The quality gate: whether a trainer snapshot may become a served version (or dense refresh).

A candidate passes when
1. every dense weight, and every embedding row it brings, is finite;
2. its last training loss is finite (once it has trained at all);
3. its recent progressive AUC (the trainer's sliding window: scored before training on each
   sample, so it is an honest hold-out figure) is not worse than the served version's by more
   than ``auc_margin``.  A candidate without a measurable AUC (one class seen so far) passes only
   while the served version has none either: losing a measured figure is a regression too.

Both AUCs are the trainer's window at export time; under strong drift a fresh window can be
harder than the served version's was.  ``odl publish --skip-gate`` is the operator's override.
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


def check_finite(weights: dict[str, np.ndarray],
                 rows: Iterable[tuple[str, np.ndarray]] = ()) -> Verdict:
    for k, v in weights.items():
        if not np.all(np.isfinite(v)):
            return Verdict.refuse(f"non-finite values in dense weight {k}")
    for table, vectors in rows:
        if len(vectors) and not np.all(np.isfinite(vectors)):
            bad = int(np.sum(~np.isfinite(vectors).all(axis=1)))
            return Verdict.refuse(f"{bad} non-finite embedding rows in table {table}")
    return PASS


def check(snapshot: dict[str, Any], served_metrics: dict[str, Any] | None, auc_margin: float,
          rows: Iterable[tuple[str, np.ndarray]] = ()) -> Verdict:
    """``snapshot``: the trainer's (weights, step, metrics); ``served_metrics``: the manifest
    metrics of the version serving uses now, or None before the first version."""
    verdict = check_finite(snapshot["weights"], rows)
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
