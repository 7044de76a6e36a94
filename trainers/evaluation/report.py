"""Figures of an `odl eval` run: overall and per time slice, the RESULT line, a table, a PNG."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from trainers.metrics import Figures


def figures(scores: dict[str, np.ndarray], labels: np.ndarray, warmup: float,
            slices: int = 10) -> tuple[dict[str, Figures], dict[str, list[Figures]]]:
    """Overall figures over the rows after the warm-up share, and per slice of those rows."""
    start = int(len(labels) * warmup)
    y = labels[start:]
    edges = np.linspace(0, len(y), slices + 1).astype(int)
    overall, per_slice = {}, {}
    for name, s in scores.items():
        s = s[start:]
        if np.isnan(s).any():
            raise ValueError(f"{name}: {int(np.isnan(s).sum())} rows were not scored")
        overall[name] = Figures.of(s, y)
        per_slice[name] = [Figures.of(s[a:b], y[a:b]) for a, b in zip(edges, edges[1:])]
    return overall, per_slice


def result_line(overall: dict[str, Figures]) -> str:
    parts = [f"auc_{n}={f.auc:.4f}" for n, f in overall.items()]
    parts += [f"logloss_{n}={f.logloss:.4f}" for n, f in overall.items()]
    parts += [f"calibration_{n}={f.calibration:.3f}" for n, f in overall.items()]
    return "RESULT eval " + " ".join(parts)


def table(overall: dict[str, Figures], seconds: dict[str, float]) -> str:
    lines = [f"{'model':<18} {'AUC':>7} {'log-loss':>9} {'calib.':>7} {'seconds':>8}"]
    for n, f in overall.items():
        lines.append(f"{n:<18} {f.auc:>7.4f} {f.logloss:>9.4f} {f.calibration:>7.3f} "
                     f"{seconds.get(n, math.nan):>8.1f}")
    return "\n".join(lines)


def plot(per_slice: dict[str, list[Figures]], title: str, path: Path) -> Path | None:
    """AUC and calibration per time slice; None (with no file) when matplotlib is absent."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, fs in per_slice.items():
        x = np.arange(1, len(fs) + 1)
        a1.plot(x, [f.auc for f in fs], marker="o", label=name)
        a2.plot(x, [f.calibration for f in fs], marker="o", label=name)
    a1.set(title="AUC per time slice", xlabel="slice of the scored rows", ylabel="AUC")
    a2.set(title="calibration (mean predicted / observed)", xlabel="slice of the scored rows")
    a2.axhline(1.0, color="grey", lw=0.8)
    a1.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
